"""QAT + KD checkpoints and ranks (issue 27, item 3): an interrupted QAT run resumes mid-epoch to
the same weights as one that was never interrupted, a checkpoint trained from other inputs is
ignored, and two torchrun ranks train the same weights as one process (BatchNorms are folded
before QAT, so averaging half-batch gradients reproduces the full batch's exactly)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers.cli import REPO_ROOT
from helpers.tiny_prune import tiny_data
from safetensors.torch import load_file

from cascadec.distill.losses import DistillLoss
from cascadec.quantize.qat import qat_finetune, qat_loader
from cascadec.train.runtime import Runtime

CPU = torch.device("cpu")


def _qat(teacher, loader, images, runtime, *, key="k", loss=None, lr=0.05):
    torch.manual_seed(0)
    return qat_finetune(
        copy.deepcopy(teacher),
        teacher,
        loader,
        images,
        signed=False,
        epochs=2,
        lr=lr,
        runtime=runtime,
        checkpoint="qat.onnxruntime",
        key=key,
        loss=loss,
    )


class _StopAt:
    """The KD loss, with a Ctrl-C arriving at the n-th step."""

    def __init__(self, runtime: Runtime, step: int) -> None:
        self.runtime, self.step, self.calls, self.loss = runtime, step, 0, DistillLoss()

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.step:
            self.runtime.stop.requested = True
        return self.loss(*args)


@pytest.fixture
def setup():
    teacher, plain, _ = tiny_data(images=40)
    loader = qat_loader(plain.dataset, 8, seed=0)  # 5 steps an epoch
    images = plain.dataset.tensors[0][:16].numpy()
    return teacher, loader, images


def test_an_interrupted_qat_run_resumes_to_the_same_weights(setup, tmp_path):
    teacher, loader, images = setup
    reference, ref_record = _qat(teacher, loader, images, Runtime(CPU, checkpoint_dir=tmp_path / "a"))
    stopped = Runtime(CPU, checkpoint_dir=tmp_path / "b", checkpoint_every_steps=2)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in epoch 1's third step: saved there, then stop
        _qat(teacher, loader, images, stopped, loss=_StopAt(stopped, 5 + 3))
    state = Runtime(CPU, checkpoint_dir=tmp_path / "b").load("qat.onnxruntime")
    assert (state["epoch"], state["step"]) == (1, 3) and len(state["records"]) == 1
    again = Runtime(CPU, checkpoint_dir=tmp_path / "b")
    counting = _StopAt(again, step=0)
    resumed, record = _qat(teacher, loader, images, again, loss=counting)
    assert counting.calls == 2  # only epoch 1's last two steps were trained again
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [r["images"] for r in record["epochs"]] == [r["images"] for r in ref_record["epochs"]]
    assert record["epochs"][1]["loss"] == pytest.approx(ref_record["epochs"][1]["loss"], rel=1e-5)


def test_a_checkpoint_from_other_inputs_is_not_resumed(setup, tmp_path):
    teacher, loader, images = setup
    fresh, _ = _qat(teacher, loader, images, Runtime(CPU))
    stopped = Runtime(CPU, checkpoint_dir=tmp_path, checkpoint_every_steps=1)
    with pytest.raises(KeyboardInterrupt):
        _qat(teacher, loader, images, stopped, key="other student", loss=_StopAt(stopped, 7), lr=0.5)
    again, _ = _qat(teacher, loader, images, Runtime(CPU, checkpoint_dir=tmp_path))
    for a, b in zip(fresh.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_fine_tune_the_same_weights_as_one_process(tmp_path):
    from helpers.qat_ddp_worker import tuned_weights

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CASCADEC_NO_PROGRESS": "1", "PYTHONPATH": str(REPO_ROOT)}
    worker = REPO_ROOT / "tests" / "helpers" / "qat_ddp_worker.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(worker),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    reference = tuned_weights()
    start = tiny_data(images=40)[0]  # QAT moved the weights: the comparison below is not vacuous
    assert (rank0["fc.weight"] - start.state_dict()["fc.weight"]).abs().max() > 1e-3
    for name, value in reference.items():
        assert torch.equal(rank0[name], rank1[name]), name  # the epoch-end broadcast
        assert torch.allclose(rank0[name], value, atol=1e-6), name  # the averaged gradients
