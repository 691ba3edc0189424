"""One rank of a tiny data-parallel QAT + KD run (tests/test_qat_resume.py).

Run as ``torchrun --nproc-per-node N tests/helpers/qat_ddp_worker.py OUT_DIR``: every rank
fine-tunes the same random ResNet-8 under fake quantization on its slices of 40 images through
:func:`cascadec.quantize.qat.qat_finetune` with a distributed Runtime, and saves the tuned
weights as OUT_DIR/rank<R>.safetensors. The same function with one process is the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadec.quantize.qat import qat_finetune, qat_loader  # noqa: E402
from cascadec.train.distributed import SINGLE, Dist, init_from_env, shutdown  # noqa: E402
from cascadec.train.runtime import Runtime  # noqa: E402
from helpers.tiny_prune import tiny_data  # noqa: E402

BATCH = 8  # global: 4 images a rank on two ranks


def tuned_weights(dist: Dist = SINGLE) -> dict[str, torch.Tensor]:
    """QAT + KD of a copy of the teacher, 2 epochs of 5 global batches, on this process's ranks."""
    import copy

    teacher, plain, _ = tiny_data(images=40)
    loader = qat_loader(plain.dataset, BATCH, seed=0, dist=dist)
    images = plain.dataset.tensors[0][:16].numpy()
    torch.manual_seed(0)
    tuned, _ = qat_finetune(
        copy.deepcopy(teacher),
        teacher,
        loader,
        images,
        signed=True,
        epochs=2,
        lr=0.05,
        runtime=Runtime(torch.device("cpu"), dist=dist),
    )
    return {k: v.contiguous() for k, v in tuned.state_dict().items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist, _ = init_from_env(torch.device("cpu"))
    try:
        weights = tuned_weights(dist)
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / f"rank{dist.rank}.safetensors"))
    finally:
        shutdown(dist)
