"""cascadec.prune.cascade + methods: Eq. 5 routing, weight sharing in the hierarchy, and a full
tiny run of every method through ``prune_model``."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.nets import Chain
from helpers.tiny_prune import prune_recipe, tiny_data

from cascadec.distill.losses import DistillLoss
from cascadec.models import create_model
from cascadec.prune.cascade import CascadeTrainer, build_hierarchy, own_parameter_names
from cascadec.prune.cost import CostModel
from cascadec.prune.groups import build_groups
from cascadec.prune.masks import masked
from cascadec.prune.methods import prune_model
from cascadec.prune.shrink import shrink
from cascadec.prune.targets import Budget, MaskSolver
from cascadec.recipe import Recipe

CPU = torch.device("cpu")
EX = torch.randn(1, 1, 16, 16)


def _make_trainer(net: str, *, num_tas: int, cascade_update: bool, seed: int = 0, flops_reduction: float = 0.5):
    torch.manual_seed(seed)
    model = Chain() if net == "chain" else create_model("cifar_resnet8", num_classes=10, in_channels=1)
    model.eval()
    index = build_groups(model, EX)
    cost = CostModel.build(model, index, EX)
    solver = MaskSolver(index, cost)
    budget = Budget.from_target(cost, flops_reduction=flops_reduction)
    scores = torch.rand(index.num_units) + 0.1
    teacher = copy.deepcopy(model)
    trainer = CascadeTrainer(
        copy.deepcopy(model),
        teacher,
        index,
        solver,
        budget,
        scores,
        num_tas=num_tas,
        ta_ratios=None,
        cascade_update=cascade_update,
        loss=DistillLoss(),
        device=CPU,
    )
    for m in trainer.models:
        m.train()
    return trainer


def _batch(seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *EX.shape[1:], generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------- Eq. 5 routing


@pytest.mark.parametrize("net", ["chain", "resnet8"])
def test_cascade_update_revives_units_masked_out_of_the_student(net) -> None:
    trainer = _make_trainer(net, num_tas=1, cascade_update=True)
    assert trainer.state.fractions == [0.5, 1.0]
    assert trainer.scores[1] is None  # the unpruned top model has no scores
    student_mask, ta_mask = trainer.state.hard_masks
    assert bool((ta_mask == 1).all())
    dead = torch.nonzero((student_mask == 0) & (ta_mask == 1)).flatten()
    assert len(dead) > 0
    x, y = _batch()
    losses = trainer.joint_step(x, y)
    assert len(losses) == 2 and all(value > 0 for value in losses)
    grad = trainer.scores[0].grad
    assert grad is not None
    # every unit masked out of the student but alive in its TA still learns (Eq. 5)
    assert bool((grad[dead] != 0).all()), grad[dead]

    # and the gradient is exactly the TA's Taylor term: d L_1 / d m at m = TA's hard mask (all ones),
    # L_1 = CE + KD from the pretrained teacher, computed on the TA's own forward pass
    ta = trainer.models[1]
    m = torch.ones(trainer.index.num_units, requires_grad=True)
    trainer.masks[1].set(m)
    with torch.no_grad():
        t_logits = trainer.teacher(x)
    (taylor_ta,) = torch.autograd.grad(trainer.loss(ta(x), y, t_logits), m)
    torch.testing.assert_close(grad, taylor_ta, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("net", ["chain", "resnet8"])
def test_without_cascade_update_masked_units_get_no_gradient(net) -> None:
    trainer = _make_trainer(net, num_tas=1, cascade_update=False)
    student_mask = trainer.state.hard_masks[0]
    dead = torch.nonzero(student_mask == 0).flatten()
    alive = torch.nonzero(student_mask == 1).flatten()
    x, y = _batch()
    trainer.joint_step(x, y)
    grad = trainer.scores[0].grad
    assert grad is not None
    # The student's scores now learn only from the student's own straight-through pass. A unit
    # whose mask is 0 has output Y*0 = 0 after its BN; the next op is a ReLU (directly, or after a
    # residual add of two masked, hence zero, BN outputs), and ReLU'(0) = 0 in PyTorch, so
    # dL/d(masked output) = 0 and dL/dm = sum dL/d(out) * Y = 0 exactly: a pruned unit can never
    # come back. That is what Eq. 5's routing through the TA's pass fixes.
    assert bool((grad[dead] == 0).all()), grad[dead]
    assert bool((grad[alive] != 0).any())
    # the student's own Taylor term at its hard mask is what it got
    m = student_mask.clone().requires_grad_(True)
    trainer.masks[0].set(m)
    with torch.no_grad():
        upper = trainer.models[1](x)  # the student's teacher in the chain is the TA above it
    (own,) = torch.autograd.grad(trainer.loss(trainer.models[0](x), y, upper), m)
    torch.testing.assert_close(grad, own, rtol=1e-4, atol=1e-8)


def test_cascade_with_two_tas_routes_each_models_scores_to_the_model_above() -> None:
    trainer = _make_trainer("chain", num_tas=2, cascade_update=True, flops_reduction=0.75)
    f = trainer.state.fractions
    assert len(f) == 3 and f[0] == pytest.approx(0.25) and f[-1] == 1.0
    assert trainer.scores[0] is not None and trainer.scores[1] is not None and trainer.scores[2] is None
    hard = trainer.state.hard_masks
    x, y = _batch()
    trainer.joint_step(x, y)
    # scores of T_0 learn from T_1's pass: units dead in T_0 but alive in T_1 get a gradient;
    # units dead in T_1 get none from T_1's pass (ReLU'(0) = 0), and nothing else trains s_0
    g0 = trainer.scores[0].grad
    d0 = (hard[0] == 0) & (hard[1] == 1)
    assert d0.any()
    assert bool((g0[d0] != 0).all())
    assert bool((g0[hard[1] == 0] == 0).all())
    # scores of T_1 learn from the unpruned T_2's pass: every unit gets a gradient
    assert bool((trainer.scores[1].grad != 0).all())
    assert int((hard[1] == 0).sum()) > 0  # the middle model is really pruned


# --------------------------------------------------------------------------- shared weights


def test_hierarchy_shares_conv_weights_and_owns_bn_head_stem() -> None:
    trainer = _make_trainer("resnet8", num_tas=1, cascade_update=True)
    m0, m1 = trainer.models
    owned = own_parameter_names(m0, trainer.index)
    assert "conv1.weight" in owned and "fc.weight" in owned and "fc.bias" in owned
    assert "layer2.0.bn1.weight" in owned and "layer2.0.conv1.weight" not in owned
    p0, p1 = dict(m0.named_parameters()), dict(m1.named_parameters())
    assert p0.keys() == p1.keys()
    shared = [n for n in p0 if n not in owned]
    assert shared and all(".conv" in n or "shortcut.0" in n for n in shared)
    for n in shared:  # one tensor, not a copy
        assert p0[n] is p1[n], n
        assert p0[n].data_ptr() == p1[n].data_ptr()
    for n in owned:  # own copies
        assert p0[n] is not p1[n] and p0[n].data_ptr() != p1[n].data_ptr(), n
    b0, b1 = dict(m0.named_buffers()), dict(m1.named_buffers())
    for n in b0:
        assert b0[n].data_ptr() != b1[n].data_ptr(), n
    # the optimiser sees every shared tensor once
    weights, scores = trainer.parameters()
    assert len({id(p) for p in weights}) == len(weights) == len(shared) + 2 * len(owned)
    assert len(scores) == 1


def test_joint_step_updates_one_shared_tensor_and_separate_bn_stats() -> None:
    trainer = _make_trainer("chain", num_tas=1, cascade_update=True)
    m0, m1 = trainer.models
    assert torch.equal(m0.bn3.running_mean, m1.bn3.running_mean)
    x, y = _batch()
    trainer.joint_step(x, y)
    # the shared conv's gradient holds both models' contributions
    g = m0.conv3.weight.grad.clone()
    assert m1.conv3.weight.grad is m0.conv3.weight.grad
    grads = []
    for j in (0, 1):
        trainer.models[0].zero_grad(set_to_none=True)
        trainer.models[1].zero_grad(set_to_none=True)
        trainer.masks[j].set(trainer.state.hard_masks[j])
        with torch.no_grad():
            upper = trainer.teacher(x) if j == 1 else m1(x)
        trainer.loss(trainer.models[j](x), y, upper).backward()
        grads.append(trainer.models[j].conv3.weight.grad.clone())
    torch.testing.assert_close(g, grads[0] + grads[1], rtol=1e-4, atol=1e-7)
    # an optimiser step on the shared tensor is seen by both models
    with torch.no_grad():
        m0.conv2.weight.add_(1.0)
    assert torch.equal(m0.conv2.weight, m1.conv2.weight)
    # BN statistics are per model: the student's masked conv2 group changes what bn3 sees
    assert not torch.equal(m0.bn3.running_mean, m1.bn3.running_mean)
    assert m0.bn3.running_mean.data_ptr() != m1.bn3.running_mean.data_ptr()


def test_build_hierarchy_leaves_first_conv_and_classifier_distinct() -> None:
    torch.manual_seed(0)
    model = Chain()
    index = build_groups(model, EX)
    models = build_hierarchy(model, index, 3)
    for name in ("conv1.weight", "fc.weight", "fc.bias", "bn2.weight", "bn2.bias"):
        ptrs = {dict(m.named_parameters())[name].data_ptr() for m in models}
        assert len(ptrs) == 3, name
    for name in ("conv2.weight", "conv3.weight"):
        objs = [dict(m.named_parameters())[name] for m in models]
        assert objs[0] is objs[1] is objs[2] is model.get_parameter(name)


def test_frozen_model_and_extract_student_are_independent_copies() -> None:
    trainer = _make_trainer("chain", num_tas=1, cascade_update=True)
    x, y = _batch()
    trainer.joint_step(x, y)
    ta = trainer.frozen_model(1)
    student, mask = trainer.extract_student()
    assert student.conv2.weight is not trainer.models[0].conv2.weight
    assert ta.conv2.weight is not trainer.models[1].conv2.weight
    assert all(not m._forward_hooks for m in trainer.models[0].modules())  # released
    assert all(not m._forward_hooks for m in student.modules())
    assert not any(p.requires_grad for p in ta.parameters())
    assert torch.equal(mask, trainer.state.hard_masks[0])


# --------------------------------------------------------------------------- full tiny runs


def _recipe(method: str, **over) -> Recipe:
    """``section__field=value`` overrides on the shared tiny recipe."""
    nested: dict = {}
    for key, value in over.items():
        section, _, field = key.partition("__")
        nested.setdefault(section, {})[field] = value
    return prune_recipe(method, nested)


@pytest.fixture(scope="module")
def tiny_setup():
    return tiny_data()


RUNS = [
    ("oneshot", {"distill__kd": True}),
    ("oneshot", {"distill__kd": False, "prune__importance": "l1", "prune__target": {"params_reduction": 0.6}}),
    ("cascade", {"cascade__num_tas": 0}),
    ("cascade", {"cascade__num_tas": 1}),
    ("cascade", {"cascade__num_tas": 2, "prune__target": {"keep_ratio": 0.4}, "cascade__score_optimizer": "rmsprop"}),
    ("cascade", {"cascade__num_tas": 1, "cascade__cascade_update": False}),
]


@pytest.mark.parametrize(
    "method, over", RUNS, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in RUNS]
)
@pytest.mark.slow
def test_prune_model_tiny_run(method, over, tiny_setup) -> None:
    teacher, loader, val = tiny_setup
    teacher_state = copy.deepcopy(teacher.state_dict())
    recipe = _recipe(method, **over)
    result = prune_model(teacher, recipe, loader, val, EX, CPU)
    a = result.analysis
    mask = result.mask
    assert mask.shape == (a.index.num_units,)
    assert 0 < mask.sum() < a.index.num_units
    # the target is met within 2 % (and never exceeded)
    achieved = a.cost.metric(a.budget.metric, mask) / a.cost.base(a.budget.metric)
    assert abs(achieved - a.budget.keep_fraction) <= 0.02, (achieved, a.budget.keep_fraction)
    assert achieved <= a.budget.keep_fraction + 1e-9
    # the returned student carries no hooks; masked student == extracted (shrunk) student
    student = result.student.eval()
    assert all(not m._forward_hooks for m in student.modules())
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad(), masked(student, a.index, mask):
        y_masked = student(x)
    small = shrink(student, a.index, mask, EX)
    with torch.no_grad():
        y_small = small(x)
    assert (y_masked - y_small).abs().max().item() < 1e-5
    assert torch.isfinite(y_small).all()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters())
    # the pretrained teacher is never trained
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    # the student was trained (it is not the teacher's weights any more)
    assert any(not torch.equal(v, teacher_state[k]) for k, v in student.state_dict().items() if v.is_floating_point())

    h = result.history
    if method == "oneshot":
        assert set(h) == {"fine_tune", "seconds"}
        epochs = recipe.train.joint_epochs + recipe.train.student_epochs
        assert [r["epoch"] for r in h["fine_tune"]] == list(range(-1, epochs))  # the start, then each epoch
        expected_teacher = "teacher" if recipe.distill.kd else "none"
        assert all(r["teacher"] == expected_teacher for r in h["fine_tune"][1:])
        assert sum(r["kept"] for r in h["fine_tune"]) == 1  # exactly one epoch ships
        record = h["fine_tune"][1]
    else:
        num_tas = recipe.cascade.num_tas
        assert set(h) == {
            "fractions",
            "joint",
            "joint_seconds",
            "mask_changed_units",
            "student",
            "seconds",
            "ladder",
            "freeze_step",
            "joint_steps",
        }
        assert [r["model"] for r in h["ladder"]["rungs"]] == ["student", *(f"TA{j}" for j in range(1, num_tas + 1))]
        assert len(h["fractions"]) == num_tas + 1
        assert h["fractions"][0] == pytest.approx(a.budget.keep_fraction)
        if num_tas:
            assert h["fractions"][-1] == 1.0
        assert len(h["joint"]) == recipe.train.joint_epochs
        j = h["joint"][0]
        assert j["steps"] == 2 and len(j["losses"]) == num_tas + 1
        assert all(value > 0 for value in j["losses"])
        assert isinstance(h["mask_changed_units"], int) and h["mask_changed_units"] >= 0
        assert [r["epoch"] for r in h["student"]] == list(range(-1, recipe.train.student_epochs))
        record = h["student"][1]
        # the student's first teacher is the lowest rung of the chain that beats it (random data here:
        # which one that is depends on the run, but it is one of the chain's names)
        assert record["teacher"].startswith("TA") or record["teacher"] == "teacher"
        if num_tas == 0:
            assert record["teacher"] == "teacher"
    assert set(record) >= {"epoch", "teacher", "teacher_accuracy", "student_accuracy", "loss", "seconds"}
    assert 0.0 <= record["student_accuracy"] <= 1.0


_BAD_HIERARCHY = [
    ({"prune__target": {"keep_ratio": 1.0}, "cascade__num_tas": 1}, "keep_ratio 1.0 with TAs"),
    ({"cascade__num_tas": 2, "cascade__ta_ratios": [0.3, 1.0]}, "TA below the student"),
    ({"cascade__num_tas": 1, "cascade__ta_ratios": [0.8]}, "top TA below 1.0"),
]


@pytest.mark.parametrize("over, why", _BAD_HIERARCHY, ids=[w for _, w in _BAD_HIERARCHY])
def test_invalid_ta_chain_is_a_user_error(over, why, tiny_setup) -> None:
    from pydantic import ValidationError

    from cascadec.errors import UserError

    teacher, loader, val = tiny_setup
    # refused either by the recipe schema (load_recipe turns that into a UserError) or at run time
    with pytest.raises((UserError, ValidationError)):
        recipe = _recipe("cascade", **{"train__max_steps_per_epoch": 1, "train__student_epochs": 0, **over})
        prune_model(teacher, recipe, loader, val, EX, CPU)


def test_a_refined_student_budget_runs_before_the_freeze_and_survives_a_resume() -> None:
    """A latency target's re-solves (prune/latency_refine.py) set the student's budget just
    before the masks freeze; the joint checkpoint carries it, so a run resumed past the freeze
    solves the same student mask, and the TAs keep their budgets."""
    trainer = _make_trainer("resnet8", num_tas=1, cascade_update=True)
    solver, budget = trainer.solver, trainer.budgets[0]
    calls = []

    def before_freeze() -> None:
        calls.append(1)
        trainer.set_student_budget(budget.scaled(0.3, solver.cost))

    trainer.before_freeze = before_freeze
    ta_budget = trainer.budgets[1].keep_fraction
    trainer.freeze()
    assert calls == [1] and trainer.budgets[0].keep_fraction == pytest.approx(0.3)
    assert trainer.budgets[1].keep_fraction == ta_budget
    assert solver.cost.macs(trainer.state.hard_masks[0]) <= 0.3 * solver.cost.base_macs
    state = trainer.checkpoint_state()
    resumed = _make_trainer("resnet8", num_tas=1, cascade_update=True)
    resumed.load_checkpoint_state(state)
    resumed.before_freeze = lambda: calls.append(2)
    resumed.freeze(callback=False)  # as a resumed run does: no callback, the budget from the checkpoint
    assert calls == [1] and resumed.budgets[0].keep_fraction == pytest.approx(0.3)
    assert torch.equal(resumed.state.hard_masks[0], trainer.state.hard_masks[0])


def _joint_phase(seed: int):
    from cascadec.prune.cascade_method import JointPhase
    from cascadec.prune.scores import make_score_optimizer, score_schedule
    from cascadec.recipe import CascadeSection
    from cascadec.train.loop import cosine_schedule, make_optimizer

    c = CascadeSection()
    trainer = _make_trainer("chain", num_tas=1, cascade_update=True, seed=seed)
    weights, score_params = trainer.parameters()
    weight_opt = make_optimizer(weights, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    score_opt = make_score_optimizer(score_params, signal=c.score_signal, optimizer=c.score_optimizer, lr=c.score_lr)
    sched = cosine_schedule(weight_opt, 10)
    trainer.freeze_at = 8
    score_sched = score_schedule(score_opt, trainer.freeze_at) if score_opt is not None else None
    return JointPhase(trainer, weight_opt, score_opt, sched, score_sched, 1.0, None)


def _phase_step(phase, seed: int) -> None:
    for opt in (phase.weight_opt, phase.score_opt):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
    phase.trainer.joint_step(*_batch(seed))
    for opt, sched in ((phase.weight_opt, phase.sched), (phase.score_opt, phase.score_sched)):
        if opt is not None:
            opt.step()
            sched.step()


def test_the_joint_phase_resumes_from_its_state_dict_as_if_never_stopped() -> None:
    """``JointPhase.state_dict`` / ``load_state_dict`` (issue 29): a phase whose weights, scores
    and optimisers have moved elsewhere, loaded from a running one's state, takes the next step exactly as the
    running one does (weights, scores, momentum, both schedules) and reports the same records."""
    running = _joint_phase(seed=0)
    for step in range(3):
        _phase_step(running, seed=10 + step)
    running.epoch, running.step, running.partial = 1, 3, {"loss": 1.5}
    running.history.append({"epoch": 0, "losses": [1.0, 2.0]})
    running.ladder[:] = [0.5, 0.6]
    running.latency_refine[:] = [{"fraction": 0.4}]
    state = copy.deepcopy(running.state_dict())

    resumed = _joint_phase(seed=0)  # the same teacher (a resumed run's), trained elsewhere since
    for step in range(2):
        _phase_step(resumed, seed=30 + step)
    assert not torch.equal(resumed.trainer.scores[0], running.trainer.scores[0])
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.step, resumed.partial) == (1, 3, {"loss": 1.5})
    assert resumed.history == running.history and resumed.ladder == [0.5, 0.6]
    assert resumed.latency_refine == [{"fraction": 0.4}]
    assert torch.equal(resumed.initial_mask, running.initial_mask)
    for phase in (running, resumed):
        _phase_step(phase, seed=20)
    for a, b in zip(running.trainer.parameters()[0], resumed.trainer.parameters()[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(running.trainer.scores, resumed.trainer.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.sched.last_epoch == running.sched.last_epoch == 4
    assert resumed.weight_opt.param_groups[0]["lr"] == running.weight_opt.param_groups[0]["lr"]
