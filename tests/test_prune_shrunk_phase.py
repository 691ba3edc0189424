"""The student phase trains the physically shrunk network (issue 32, item 1): the same result as
the masked full-width one, written back into the full-width student, at less compute."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny_prune import tiny_data

from cascadec.distill.losses import DistillLoss
from cascadec.models import create_model
from cascadec.prune.cost import CostModel
from cascadec.prune.finetune import PhaseSettings, student_phase
from cascadec.prune.groups import build_groups
from cascadec.prune.masks import ChannelMasks
from cascadec.prune.shrink import shrink, shrink_positions, write_back
from cascadec.prune.targets import Budget, MaskSolver

CPU = torch.device("cpu")
EX = torch.zeros(1, 1, 16, 16)


def _half_mask(model):
    index = build_groups(model, EX)
    cost = CostModel.build(model, index, EX)
    scores = torch.rand(index.num_units, generator=torch.Generator().manual_seed(3))
    return index, MaskSolver(index, cost).solve(scores, Budget.from_target(cost, flops_reduction=0.5))


def _masked_out(model, index, mask, x):
    hooks = ChannelMasks(model, index).install()
    hooks.set(mask)
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        hooks.remove()


def test_a_shrunk_networks_weights_write_back_into_the_masked_one_exactly():
    torch.manual_seed(0)
    full = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    for m in full.modules():  # non-trivial BatchNorm statistics, so a misplaced buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    index, mask = _half_mask(full)
    positions = shrink_positions(full, index, mask, EX)
    assert positions is not None and set(positions) >= {n for n, _ in full.named_parameters()}
    small = shrink(full, index, mask, EX)
    with torch.no_grad():  # "train" it: every floating tensor of the shrunk network changes
        for name, t in list(small.named_parameters()) + list(small.named_buffers()):
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
                if name.endswith("running_var"):
                    t.abs_().add_(0.1)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = small.eval()(x)
    write_back(full, small, positions)
    assert torch.allclose(_masked_out(full, index, mask, x), expected, atol=1e-5)
    # and the full network shrinks back to the trained one
    again = shrink(full, index, mask, EX)
    for (name, a), (_, b) in zip(again.state_dict().items(), small.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_shrink_that_changes_values_is_refused(monkeypatch):
    """Weight standardisation folded or a response norm rescaled: not a selection, so no write-back."""
    import cascadec.prune.shrink as shrink_mod

    torch.manual_seed(0)
    full = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    index, mask = _half_mask(full)
    real = shrink_mod.shrink

    def scaling(model, *args):
        out = real(model, *args)
        with torch.no_grad():
            next(out.parameters()).mul_(1.5)
        return out

    monkeypatch.setattr(shrink_mod, "shrink", scaling)
    assert shrink_positions(full, index, mask, EX) is None


def _phase(student, mask, index, teacher, loader, *, shrunk: bool):
    torch.manual_seed(1)
    return student_phase(
        student,
        mask,
        index,
        [("teacher", teacher)],
        loader,
        loader,
        DistillLoss(),
        PhaseSettings(epochs=1, lr=0.05, weight_decay=4e-4, max_steps=3, select_best=False, shrunk=shrunk),
        device=CPU,
        example=EX,
    )


def test_the_shrunk_phase_trains_the_same_student_as_the_masked_one():
    teacher, loader, _ = tiny_data()
    index, mask = _half_mask(teacher)
    masked_student, shrunk_student = copy.deepcopy(teacher), copy.deepcopy(teacher)
    masked = _phase(masked_student, mask, index, teacher, loader, shrunk=False)
    shrunk = _phase(shrunk_student, mask, index, teacher, loader, shrunk=True)
    assert [r["student_accuracy"] for r in masked] == [r["student_accuracy"] for r in shrunk]
    for a, b in zip(masked[1:], shrunk[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    x = torch.randn(8, 1, 16, 16)
    out_masked = _masked_out(masked_student, index, mask, x)
    out_shrunk = _masked_out(shrunk_student, index, mask, x)
    assert torch.allclose(out_masked, out_shrunk, atol=1e-4), (out_masked - out_shrunk).abs().max()
    # the weights moved (it trained), and the shrunk phase left no hook behind
    assert not torch.allclose(_masked_out(teacher, index, mask, x), out_shrunk, atol=1e-3)
    assert not any(m._forward_hooks for m in shrunk_student.modules())


def test_a_masked_checkpoint_resumes_masked(tmp_path):
    """A checkpoint written before this change (no layout, full-width weights) still resumes."""
    from cascadec.train.runtime import Runtime

    teacher, loader, _ = tiny_data()
    index, mask = _half_mask(teacher)
    runtime = Runtime(CPU, checkpoint_dir=tmp_path)
    student = copy.deepcopy(teacher)
    student_phase(
        student, mask, index, [("teacher", teacher)], loader, loader, DistillLoss(),
        PhaseSettings(epochs=1, lr=0.05, max_steps=2, shrunk=False), device=CPU, runtime=runtime, example=EX,
    )  # fmt: skip
    state = runtime.load("student")
    assert state["layout"] == "masked"
    state.pop("layout")
    again = copy.deepcopy(teacher)
    history = student_phase(
        again, mask, index, [("teacher", teacher)], loader, loader, DistillLoss(),
        PhaseSettings(epochs=2, lr=0.05, max_steps=2, shrunk=True), device=CPU,
        runtime=Runtime(CPU, checkpoint_dir=tmp_path / "b"), resume=state, example=EX,
    )  # fmt: skip
    assert [r["epoch"] for r in history] == [-1, 0, 1]


def test_a_shrunk_checkpoint_the_phase_cannot_train_shrunk_is_one_line(tmp_path):
    from cascadec.errors import UserError
    from cascadec.train.runtime import Runtime

    teacher, loader, _ = tiny_data()
    index, mask = _half_mask(teacher)
    runtime = Runtime(CPU, checkpoint_dir=tmp_path)
    student_phase(
        copy.deepcopy(teacher), mask, index, [("teacher", teacher)], loader, loader, DistillLoss(),
        PhaseSettings(epochs=1, lr=0.05, max_steps=1, shrunk=True), device=CPU, runtime=runtime, example=EX,
    )  # fmt: skip
    state = runtime.load("student")
    assert state["layout"] == "shrunk"
    with pytest.raises(UserError, match="holds the shrunk student"):
        student_phase(
            copy.deepcopy(teacher), mask, index, [("teacher", teacher)], loader, loader, DistillLoss(),
            PhaseSettings(epochs=2, lr=0.05, max_steps=1, shrunk=False), device=CPU, resume=state, example=EX,
        )  # fmt: skip
