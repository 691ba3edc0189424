"""Recipes: shipped ones validate, ``--set`` overrides parse as a user expects, errors name
the file and the dotted key, and a resolved recipe round-trips through YAML."""

from __future__ import annotations

import pytest
import yaml

from cascadec.data.registry import list_datasets
from cascadec.errors import UserError
from cascadec.models import list_models
from cascadec.recipe import (
    Recipe,
    list_recipes,
    load_recipe,
    parse_override,
    recipe_to_yaml,
    recipes_dir,
    validate_recipe,
)

SHIPPED = list_recipes()


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"a user error must be one line: {message!r}"
    return message


def test_the_documented_recipes_ship():
    assert {
        "fmnist_quick",
        "imagenet_50pct",
        "cifar10_vgg16_ours03",
        "cifar10_vgg16_ours06",
        "cifar10_vgg16_ours08",
    } <= set(SHIPPED)


# the measured winner at each shipped budget (docs/benchmarks.md, "At equal training time"): a
# recipe that runs another method says why in its "# method:" line (issue 32 item 5)
MEASURED_WINNER = "cap"
WINNER_RECIPES = {"fmnist_quick", "fmnist_cap_kd", "imagenet_50pct"}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_says_why_it_runs_its_method(name):
    text = (recipes_dir() / f"{name}.yaml").read_text()
    why = [line for line in text.splitlines() if line.startswith("# method: ")]
    assert len(why) == 1, f"{name}: one '# method: ...' line says why this method"
    recipe = load_recipe(name)
    assert why[0].startswith(f"# method: {_METHOD_WORDS[recipe.prune.method]}"), (name, why[0])
    if name in WINNER_RECIPES:
        assert recipe.prune.method == MEASURED_WINNER and recipe.train.student_epochs > 0, name
        assert "measured winner" in why[0]
    elif recipe.prune.method != MEASURED_WINNER or recipe.train.student_epochs + recipe.train.joint_epochs == 0:
        assert (
            "measured winner" in why[0]
            or "not a static network" in why[0]
            or "coverage" in why[0]
            or ("no training" in why[0])
        ), f"{name} runs {recipe.prune.method}: its '# method:' line must say why not the measured winner"


_METHOD_WORDS = {"cascade": "the cascade", "cap": "CaP", "fbs": "FBS", "oneshot": "one-shot"}


def test_the_demo_and_the_first_example_run_the_measured_winner():
    """README's first commands name these recipes; the cascade has its own."""
    for name in ("fmnist_quick", "imagenet_50pct"):
        assert load_recipe(name).prune.method == MEASURED_WINNER
    for name in ("fmnist_cascade", "imagenet_50pct_cascade"):
        assert load_recipe(name).prune.method == "cascade"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.description
    assert recipe.model.name in list_models()
    assert recipe.data.name in list_datasets()
    target = recipe.prune.target
    given = [v for v in (target.flops_reduction, target.params_reduction, target.keep_ratio) if v is not None]
    assert len(given) == 1
    assert target.describe()
    # by path gives the same recipe as by name
    assert load_recipe(str(recipes_dir() / f"{name}.yaml")) == recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_to_yaml_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    text = recipe_to_yaml(recipe)
    assert validate_recipe(yaml.safe_load(text)) == recipe
    path = tmp_path / "copy.yaml"
    path.write_text(text)
    assert load_recipe(str(path)) == recipe
    assert recipe_to_yaml(load_recipe(str(path))) == text


def test_round_trip_keeps_overrides(tmp_path):
    recipe = load_recipe("fmnist_quick", ["prune.target.keep_ratio=0.4", "profile.batches=[1, 2]", "distill.kd=false"])
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe_to_yaml(recipe))
    again = load_recipe(str(path))
    assert again == recipe
    assert again.prune.target.keep_ratio == 0.4 and again.prune.target.flops_reduction is None
    assert again.profile.batches == [1, 2] and again.distill.kd is False


def test_paper_operating_points():
    # BMVC 2020 Table 1: 1 - 134/313, 1 - 83/313, 1 - 52/313 of VGG16-BN's FLOPs
    for name, kept in (("cifar10_vgg16_ours03", 134), ("cifar10_vgg16_ours06", 83), ("cifar10_vgg16_ours08", 52)):
        assert load_recipe(name).prune.target.flops_reduction == pytest.approx(1 - kept / 313, abs=1e-3)


# ---------------------------------------------------------------- --set parsing


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("train.lr=0.5", ["train", "lr"], 0.5),
        ("train.max_steps_per_epoch=3", ["train", "max_steps_per_epoch"], 3),
        ("distill.kd=false", ["distill", "kd"], False),
        ("distill.kd=true", ["distill", "kd"], True),
        ("profile.batches=[1, 8, 32]", ["profile", "batches"], [1, 8, 32]),
        ("cascade.ta_ratios=[0.5, 1.0]", ["cascade", "ta_ratios"], [0.5, 1.0]),
        ("prune.target={keep_ratio: 0.5}", ["prune", "target"], {"keep_ratio": 0.5}),
        ("model.weights=IMAGENET1K_V1", ["model", "weights"], "IMAGENET1K_V1"),
        ("model.weights=a=b.pt", ["model", "weights"], "a=b.pt"),
        ("data.root=", ["data", "root"], None),
        ("data.root=null", ["data", "root"], None),
        ("prune.round_to=8", ["prune", "round_to"], 8),
        (" train.lr = 0.1", ["train", "lr"], 0.1),
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize(
    "text, needle",
    [("train.lr", "key.sub=value"), ("=1", "empty key"), ("train..lr=1", "empty key"), (".lr=1", "empty key")],
)
def test_parse_override_rejects_malformed(text, needle):
    assert needle in user_error(parse_override, text)


def test_overrides_reach_the_recipe():
    r = load_recipe(
        "fmnist_quick",
        [
            "train.lr=0.1",
            "train.lr=0.2",  # last one wins
            "profile.batches=[1, 2]",
            "distill.kd=false",
            "verify.max_abs_diff=1e-5",  # YAML 1.1 reads 1e-5 as a string
            "cascade.num_tas=2",
            "prune.round_to=8",
            "data.train_limit=100",
        ],
    )
    assert r.train.lr == 0.2
    assert r.profile.batches == [1, 2]
    assert r.distill.kd is False
    assert r.verify.max_abs_diff == pytest.approx(1e-5)
    assert (r.cascade.num_tas, r.prune.round_to, r.data.train_limit) == (2, 8, 100)


def test_override_creates_a_missing_section():
    assert "teacher" not in yaml.safe_load((recipes_dir() / "imagenet_50pct.yaml").read_text())
    assert load_recipe("imagenet_50pct", ["teacher.train_epochs=2"]).teacher.train_epochs == 2


@pytest.mark.parametrize(
    "override, field",
    [
        ("prune.target.params_reduction=0.3", "params_reduction"),
        ("prune.target.keep_ratio=0.7", "keep_ratio"),
        ("prune.target.flops_reduction=0.6", "flops_reduction"),
        ("prune.target={keep_ratio: 0.7}", "keep_ratio"),
    ],
)
def test_a_new_target_replaces_the_old_one(override, field):
    base = load_recipe("fmnist_quick")
    assert base.prune.target.flops_reduction == 0.5
    target = load_recipe("fmnist_quick", [override]).prune.target
    values = target.model_dump()
    assert values.pop(field) is not None
    assert all(v is None for v in values.values()), f"old target survived: {target}"


def test_target_override_leaves_the_rest_of_prune_alone():
    r = load_recipe("fmnist_quick", ["prune.round_to=16", "prune.target.keep_ratio=0.5"])
    assert r.prune.round_to == 16 and r.prune.method == "cap"


def test_model_on_the_command_line_drops_the_recipes_weights():
    assert load_recipe("imagenet_50pct", model="resnet50").model.weights == "IMAGENET1K_V1"
    other = load_recipe("imagenet_50pct", model="resnet18")
    assert other.model.name == "resnet18" and other.model.weights is None


# ---------------------------------------------------------------- errors name the file and the key


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=abc", "train.lr"),
        ("prune.target.flops_reduction=1.5", "prune.target.flops_reduction"),
        ("profile.batches=[1, x]", "profile.batches.1"),
        ("profile.batches=[1, 8", "profile.batches"),  # not YAML: kept as a string, then refused
        ("cascade.score_optimizer=adam", "cascade.score_optimizer"),
        ("data.batch_size=0", "data.batch_size"),
        ("prune.target={flops_reduction: 0.5, keep_ratio: 0.5}", "prune.target"),
    ],
)
def test_invalid_values_name_file_and_key(override, key):
    message = user_error(load_recipe, "fmnist_quick", [override])
    assert message.startswith(str(recipes_dir() / "fmnist_quick.yaml")), message
    assert f": {key}:" in message, message


@pytest.mark.parametrize(
    "override, key", [("prune.bogus=1", "prune.bogus"), ("cascade.tas=2", "cascade.tas"), ("bogus=1", "bogus")]
)
def test_unknown_keys_are_refused(override, key):
    message = user_error(load_recipe, "fmnist_quick", [override])
    assert f"{key}: unknown key" in message and "fmnist_quick.yaml" in message


def test_two_targets_say_which_keys(tmp_path):
    message = user_error(load_recipe, "fmnist_quick", ["prune.target={flops_reduction: 0.5, keep_ratio: 0.5}"])
    assert "exactly one of flops_reduction, params_reduction, keep_ratio" in message


def test_override_into_a_scalar_is_refused():
    assert "'description' is not a section" in user_error(load_recipe, "fmnist_quick", ["description.x=1"])


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_file_errors_name_the_file(tmp_path):
    unknown = _write(tmp_path, "unknown.yaml", "name: u\nmodel:\n  name: resnet18\ntrain:\n  lr: 0.1\n  epochz: 3\n")
    message = user_error(load_recipe, unknown)
    assert message.startswith(unknown) and "train.epochz: unknown key" in message

    wrong = _write(tmp_path, "wrong.yaml", "name: w\nmodel:\n  name: resnet18\nverify:\n  samples: many\n")
    message = user_error(load_recipe, wrong)
    assert message.startswith(wrong) and "verify.samples" in message

    no_model = _write(tmp_path, "no_model.yaml", "name: n\ndata:\n  name: synthetic\n")
    message = user_error(load_recipe, no_model)
    assert message.startswith(no_model) and ": model:" in message

    malformed = _write(tmp_path, "malformed.yaml", "name: m\nmodel:\n  name: [resnet18\n")
    message = user_error(load_recipe, malformed)
    assert message.startswith(malformed) and "malformed YAML" in message and "line" in message

    listing = _write(tmp_path, "list.yaml", "- a\n- b\n")
    assert "must be a YAML mapping" in user_error(load_recipe, listing)


def test_a_yaml_file_without_a_model_accepts_one_from_the_command_line(tmp_path):
    path = _write(tmp_path, "no_model.yaml", "data:\n  name: synthetic\n")
    recipe = load_recipe(path, model="cifar_resnet8")
    assert recipe.model.name == "cifar_resnet8" and recipe.name == "no_model"


def test_unknown_recipe_names_close_matches():
    assert "did you mean fmnist_quick" in user_error(load_recipe, "fmnist_quik")
    message = user_error(load_recipe, "zzzz")
    assert all(name in message for name in SHIPPED)


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "absent.yaml"
    assert str(missing) in user_error(load_recipe, str(missing))
