"""cascadec's training loop against a plain PyTorch KD loop (issue 30, item 4): the same shrunk
student, the same teacher, batches, AMP and channels_last, on the same device.

    python bench/kd_loop_speed.py RUN_DIR [--device cuda] [--steps 200] [--amp bf16] [--channels-last] [--out FILE.md]

The student of a finished run (``student.widths.json`` + ``student.safetensors``) learns by KD from
the run's teacher on random images of the run's input shape, at the recipe's batch size:

* ``cascadec``: ``cascadec.train.loop.train_epoch``, the loop the student phase runs (its
  Runtime: AMP, channels_last, the per-step NaN/stop agreement, the progress line);
* ``plain``: the loop a user would write: autocast, teacher under no_grad, KD loss, backward,
  SGD step; nothing else.

Each runs ``--steps`` steps after 20 warm-up steps, twice, alternating; reported: images per
second of each (the best of the two runs) and cascadec's over plain (goal on a GPU: >= 0.9).
Written to ``--out`` (Markdown, with the device named) and printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from cascadec.distill.losses import DistillLoss
from cascadec.models import create_model
from cascadec.prune.spec import load_student
from cascadec.run import RunDir
from cascadec.train.loop import make_optimizer, train_epoch
from cascadec.train.runtime import AMP_DTYPES, Runtime

WARMUP = 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--amp", choices=["none", *AMP_DTYPES], default="none")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    with RunDir.open(args.run, writable=False) as run:
        recipe = run.recipe()
        student, spec = load_student(run.path)
        teacher = create_model(spec["model"], **spec["model_kwargs"]).eval()
        from safetensors.torch import load_file

        teacher.load_state_dict(load_file(str(run.file("teacher.safetensors"))))
    shape, batch = spec["input_shape"], recipe.data.batch_size
    g = torch.Generator().manual_seed(0)
    total = batch * (args.steps + WARMUP)
    images = torch.randn(total, *shape, generator=g)
    labels = torch.randint(0, int(spec["model_kwargs"].get("num_classes", 10)), (total,), generator=g)
    loader = DataLoader(
        TensorDataset(images, labels), batch_size=batch, drop_last=True, pin_memory=device.type == "cuda"
    )
    runtime = Runtime(device, amp=args.amp, channels_last=args.channels_last)
    teacher = runtime.prepare_model(teacher.to(device))
    loss_fn = DistillLoss(recipe.distill.ce_weight, recipe.distill.kd_weight, recipe.distill.temperature)

    def cascadec_loop() -> float:
        model = runtime.prepare_model(copy.deepcopy(student))
        opt = make_optimizer(model.parameters(), lr=recipe.train.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
        train_epoch(
            model, loader, opt, None, loss_fn, device=device, teacher=teacher, runtime=runtime, max_steps=WARMUP
        )
        _sync(device)
        record = train_epoch(
            model, loader, opt, None, loss_fn, device=device, teacher=teacher, runtime=runtime, max_steps=args.steps
        )
        return record["images_per_s"]

    def plain_loop() -> float:
        model = runtime.prepare_model(copy.deepcopy(student))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=recipe.train.lr, momentum=0.9, nesterov=True)

        def steps(n: int) -> None:
            for i, (x, y) in enumerate(loader):
                if i >= n:
                    break
                x, y = runtime.batch(x, y)
                with runtime.autocast():
                    with torch.no_grad():
                        t = teacher(x).float()
                    loss = loss_fn(model(x).float(), y, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        steps(WARMUP)
        _sync(device)
        start = time.perf_counter()
        steps(args.steps)
        _sync(device)
        return args.steps * batch / (time.perf_counter() - start)

    results: dict[str, list[float]] = {"cascadec": [], "plain": []}
    for _ in range(2):
        results["cascadec"].append(cascadec_loop())
        results["plain"].append(plain_loop())
    best = {k: max(v) for k, v in results.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    row = {
        "device": name,
        "run": str(args.run),
        "batch": batch,
        "input_shape": shape,
        "amp": runtime.amp,  # as applied: off the GPU, AMP and channels_last are switched off
        "channels_last": runtime.channels_last,
        "steps": args.steps,
        "images_per_s": results,
        "ratio": best["cascadec"] / best["plain"],
        "torch": torch.__version__,
    }
    text = "\n".join(
        [
            "# cascadec's training loop against a plain KD loop",
            "",
            f"`python bench/kd_loop_speed.py RUN --device {args.device} --steps {args.steps} --amp {args.amp}"
            + (" --channels-last" if args.channels_last else "")
            + "`",
            "",
            "| device | batch | input | amp | channels_last | cascadec images/s | plain images/s | cascadec / plain |",
            "|---|---|---|---|---|---|---|---|",
            f"| {name} | {batch} | {'x'.join(map(str, shape))} | {runtime.amp} | {runtime.channels_last} | "
            f"{best['cascadec']:.0f} | {best['plain']:.0f} | {row['ratio']:.2f} |",
            "",
            "```json",
            json.dumps(row, indent=2),
            "```",
            "",
        ]
    )
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
