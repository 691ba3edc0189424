"""One rank of a tiny data-parallel cascade run (tests/test_distributed.py).

Run as ``torchrun --nproc-per-node N tests/helpers/ddp_worker.py OUT_DIR``: each rank prunes
the same tiny network on its shards of synthetic data through the library (prune_model with
a distributed Runtime) and saves its final mask, its student weights and its history as
OUT_DIR/rank<R>.safetensors, so the test can compare ranks with each other and with a
single-process run (N = 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cascadec.data import build_data
from cascadec.data.loaders import make_loaders
from cascadec.models import create_model
from cascadec.prune.methods import prune_model
from cascadec.recipe import Recipe
from cascadec.train.distributed import init_from_env, shutdown
from cascadec.train.runtime import Runtime

RECIPE = {
    "name": "ddp_tiny",
    "model": {"name": "cifar_resnet8"},
    "data": {"name": "synthetic", "train_limit": 128, "val_limit": 32, "batch_size": 16, "image_size": 16},
    "prune": {"method": "cascade", "target": {"flops_reduction": 0.5}, "importance_batches": 2},
    "cascade": {"num_tas": 1},
    "train": {"joint_epochs": 2, "student_epochs": 1, "max_steps_per_epoch": 6, "lr": 0.02},
}


def gradient_check(dist) -> float:
    """Max |averaged shard gradient - full-batch gradient| for a BatchNorm-free model, where
    data parallelism must reproduce the single-process gradient exactly (up to rounding)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    share = 8 // dist.world_size
    rows = slice(dist.rank * share, (dist.rank + 1) * share)
    torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
    dist.sync_grads(model.parameters())
    return max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), full))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    recipe = Recipe.model_validate(RECIPE)
    dist, device = init_from_env(torch.device("cpu"))
    d = recipe.data
    bundle = build_data(
        d.name, None, image_size=d.image_size, train_limit=d.train_limit, val_limit=d.val_limit, seed=0, download=False
    )
    torch.manual_seed(0)  # the same "pretrained" teacher on every rank
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=3).eval()
    train, _, val = make_loaders(bundle, recipe, device, dist)  # val: the selection split
    runtime = Runtime(device=device, dist=dist, grad_bucket_mb=0.01)  # overlapped, ~30 buckets of the 0.3 MB
    torch.manual_seed(0)
    result = prune_model(teacher, recipe, train, val, torch.zeros(1, 3, 16, 16), device, runtime)
    tensors = {"mask": result.mask.float().contiguous()}
    tensors.update({f"student.{k}": v.detach().contiguous() for k, v in result.student.state_dict().items()})
    history = {
        "joint": result.history["joint"],
        "student": result.history["student"],
        "world_size": dist.world_size,
        "gradient_check": gradient_check(dist),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{dist.rank}.safetensors"), metadata={"history": json.dumps(history)})
    shutdown(dist)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
