"""QAT + KD checkpoints (issue 27, item 3): an interrupted QAT run resumes mid-epoch to the same
weights as one that was never interrupted, and a checkpoint trained from other inputs is ignored."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny_prune import tiny_data

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
