"""What issue 10 pins: a TA ladder that holds, masks that stop moving, BatchNorm recalibration
that touches only running statistics, the Taylor-magnitude score update, the student-phase
teacher rule, and splits that keep every reported figure away from selection."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from cascadec.data import build_data
from cascadec.data.loaders import make_loaders
from cascadec.errors import UserError
from cascadec.models import create_model
from cascadec.prune.cascade_method import check_ladder
from cascadec.prune.finetune import first_better
from cascadec.prune.methods import prune_model
from cascadec.prune.scores import TaylorMagnitude, freeze_step, score_schedule
from cascadec.recipe import Recipe
from cascadec.teacher import train_teacher
from cascadec.train.bn import recalibrate_batchnorm, recalibration_loader

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name, limit", [("digits", None), ("digits", 300), ("synthetic", None)])
def test_selection_split_is_disjoint_from_training_and_balanced(name, limit) -> None:
    bundle = build_data(name, train_limit=limit, seed=3)
    train, select = set(bundle.train_indices), set(bundle.selection_indices)
    assert train and select and not train & select
    assert len(bundle.train) == len(train) and len(bundle.selection) == len(select)
    if limit:
        assert len(train) == limit
    # class-balanced: per-class counts differ by at most one
    labels = [int(bundle.selection[i][1]) for i in range(len(bundle.selection))]
    counts = [labels.count(c) for c in set(labels)]
    assert max(counts) - min(counts) <= 1


def test_selection_split_does_not_move_with_the_seed_or_the_train_limit() -> None:
    a = build_data("digits", seed=0)
    b = build_data("digits", seed=7, train_limit=200)
    assert a.selection_indices == b.selection_indices
    assert set(b.train_indices) <= set(a.train_indices)


def test_selection_size_is_a_recipe_key_and_is_bounded() -> None:
    bundle = build_data("digits", selection_size=50)
    assert len(bundle.selection) == 50
    with pytest.raises(UserError, match="selection_size"):
        build_data("digits", selection_size=100_000)


def test_augmenting_training_sets_select_without_augmentation(tmp_path) -> None:
    from cascadec.data.tensors import RandomCropFlip, TensorImageDataset, eval_view

    images = torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(6) % 2, mean=[0.5], std=[0.5], augment=RandomCropFlip(2))
    view = eval_view(ds)
    assert view.augment is None and ds.augment is not None
    assert torch.equal(view[3][0], view[3][0])  # deterministic


@pytest.mark.slow
def test_no_decision_is_taken_on_the_reported_split(monkeypatch) -> None:
    """Every evaluation inside the prune stage runs on the selection split; the test split is
    only read afterwards, for the reported accuracy."""
    import cascadec.prune.cascade as cascade_mod
    import cascadec.prune.cascade_method as methods_mod
    import cascadec.prune.finetune as finetune_mod

    bundle = build_data("digits", train_limit=128, seed=0)
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "model": {"name": "cifar_resnet8"},
            "data": {"name": "digits", "batch_size": 32},
            "prune": {"method": "cascade", "target": {"flops_reduction": 0.5}, "importance_batches": 1},
            "cascade": {"num_tas": 1},
            "train": {"joint_epochs": 1, "student_epochs": 2, "max_steps_per_epoch": 2},
        }
    )
    loaders = make_loaders(bundle, recipe, CPU)
    seen: list[object] = []
    real = finetune_mod.evaluate

    def spy(model, loader, **kw):
        seen.append(loader.dataset)
        return real(model, loader, **kw)

    for mod in (cascade_mod, finetune_mod, methods_mod):
        monkeypatch.setattr(mod, "evaluate", spy)
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=1).eval()
    prune_model(teacher, recipe, loaders.train, loaders.selection, torch.zeros(1, 1, 16, 16), CPU)
    assert seen and all(ds is bundle.selection for ds in seen)
    assert not set(bundle.selection_indices) & set(bundle.train_indices)


# --------------------------------------------------------------------------- BatchNorm recalibration


def test_recalibration_changes_running_statistics_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    with torch.no_grad():  # statistics that do not match the data
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(9.0)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    data = TensorDataset(torch.randn(64, 1, 16, 16), torch.zeros(64, dtype=torch.long))
    used = recalibrate_batchnorm(model, recalibration_loader(data, 16, batches=3, seed=0), device=CPU, limit=3)
    assert used == 3
    assert not model.training  # the mode is restored
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_recalibration_loader_is_fixed_and_random_order() -> None:
    data = TensorDataset(torch.arange(100).float().view(100, 1), torch.arange(100))
    a = [y.tolist() for _, y in recalibration_loader(data, 10, batches=3, seed=5)]
    b = [y.tolist() for _, y in recalibration_loader(data, 10, batches=3, seed=5)]
    assert a == b and len(a) == 3
    assert sum(a, []) != sorted(sum(a, []))  # not class-ordered, even for sorted data


# --------------------------------------------------------------------------- score updates and schedule


def test_taylor_magnitude_is_a_running_average_of_the_absolute_term() -> None:
    score = nn.Parameter(torch.tensor([1.0, 1.0, 0.0]))
    opt = TaylorMagnitude([score], lr=0.5)
    score.grad = torch.tensor([-3.0, 1.0, 2.0])
    opt.step()
    assert torch.allclose(score.detach(), torch.tensor([2.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        TaylorMagnitude([score], lr=1.5)


def test_score_step_anneals_to_zero_at_the_freeze_step() -> None:
    score = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([score], lr=0.1)
    sched = score_schedule(opt, 4)
    rates = []
    for _ in range(6):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.1) and rates[2] == pytest.approx(0.05)
    assert rates[4:] == [0.0, 0.0]
    assert freeze_step(100, 0.25) == 75 and freeze_step(100, 0.0) == 100


# --------------------------------------------------------------------------- the ladder, end to end


@pytest.fixture(scope="module")
def digits_run():
    """A teacher trained briefly on digits, then a cascade with 2 TAs and a frozen tail."""
    torch.manual_seed(0)
    bundle = build_data("digits", seed=0)
    recipe = Recipe.model_validate(
        {
            "name": "ladder",
            "model": {"name": "cifar_resnet8"},
            "data": {"name": "digits", "batch_size": 64},
            "teacher": {"train_epochs": 6, "lr": 0.05},
            "prune": {"method": "cascade", "target": {"flops_reduction": 0.6}, "importance_batches": 4},
            "cascade": {"num_tas": 2, "freeze_fraction": 0.5},
            "train": {"joint_epochs": 4, "student_epochs": 1, "lr": 0.01, "bn_recalibration_batches": 5},
        }
    )
    loaders = make_loaders(bundle, recipe, CPU)
    teacher = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    train_teacher(teacher, recipe, loaders.train, CPU)
    result = prune_model(teacher.eval(), recipe, loaders.train, loaders.selection, torch.zeros(1, 1, 16, 16), CPU)
    return recipe, result


@pytest.mark.slow
def test_ta_ladder_holds_after_a_short_joint_phase(digits_run) -> None:
    _, result = digits_run
    ladder = result.history["ladder"]
    accuracies = [r["accuracy"] for r in ladder["rungs"]]
    assert len(accuracies) == 3
    assert ladder["healthy"] and not ladder["broken"], ladder
    assert all(b >= a for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] > 0.5  # the unpruned model is a real teacher, not a collapsed one


@pytest.mark.slow
def test_masks_do_not_change_in_the_frozen_tail(digits_run) -> None:
    recipe, result = digits_run
    h = result.history
    steps_per_epoch = h["joint_steps"] // recipe.train.joint_epochs
    assert h["freeze_step"] == h["joint_steps"] // 2
    for record in h["joint"]:
        first_step = record["epoch"] * steps_per_epoch
        if first_step >= h["freeze_step"]:  # the whole epoch ran on frozen masks
            assert record["frozen"] and record["mask_changes"] == [0, 0, 0], record
    assert h["joint"][-1]["frozen"]
    assert all(r["accuracies"] is not None and len(r["accuracies"]) == 3 for r in h["joint"])


# --------------------------------------------------------------------------- student-phase teachers


def test_student_starts_at_the_lowest_teacher_that_beats_it() -> None:
    assert first_better([0.5, 0.8, 0.9], 0.6) == 1
    assert first_better([0.5, 0.8, 0.9], 0.4) == 0
    assert first_better([0.5, 0.8, 0.9], 0.95) == 2  # none beats it: the top of the ladder
    assert first_better([0.5, 0.8, 0.9], 0.6, start=2) == 2


def test_broken_ladder_warns_or_stops(capsys) -> None:
    names, fractions = ["student", "TA1", "TA2"], [0.5, 0.75, 1.0]
    ok = check_ladder(names, fractions, [0.80, 0.85, 0.90], "warn")
    assert ok["healthy"] and not ok["broken"]
    bad = check_ladder(names, fractions, [0.80, 0.33, 0.90], "warn")
    assert not bad["healthy"] and "TA1 0.3300 < student 0.8000" in bad["broken"][0]
    assert "WARNING: TA ladder broken" in capsys.readouterr().err
    with pytest.raises(UserError, match="ladder_check: stop"):
        check_ladder(names, fractions, [0.80, 0.33, 0.90], "stop")
    assert not check_ladder(names, fractions, [0.80, 0.33, 0.90], "off")["healthy"]


def test_student_phase_never_distils_from_a_worse_teacher() -> None:
    """A student already better than the nearest TA skips it; its history says which teacher it used."""
    from cascadec.distill.losses import DistillLoss
    from cascadec.prune.finetune import PhaseSettings, student_phase
    from cascadec.prune.groups import build_groups

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=8)
    student = create_model("cifar_resnet8", num_classes=10, in_channels=1)
    index = build_groups(student, torch.zeros(1, 1, 16, 16))
    weak, strong = copy.deepcopy(student).eval(), copy.deepcopy(student).eval()
    history = student_phase(
        student,
        torch.ones(index.num_units),
        index,
        [("weak", weak), ("strong", strong)],
        loader,
        loader,
        DistillLoss(),
        PhaseSettings(epochs=1, lr=0.01, promote=True, max_steps=2),
        device=CPU,
        teacher_accuracy=[-1.0, 2.0],  # 'weak' below anything the student can score, 'strong' above
    )
    assert [r["teacher"] for r in history if r["epoch"] >= 0] == ["strong"]
