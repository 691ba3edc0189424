"""Hostile input: random/garbage recipes, --set overrides, argument lists and corrupted run
artifacts must end in a Recipe / exit 0, or one line and exit 2 (3 where a parity gate
legitimately fails) -- never a traceback, never exit 1 ("internal error").

Bugs this file found (deep nesting, line breaks in keys, non-UTF-8 run recipes, data/student
shape mismatch, unchecked batch sizes, damaged manifests and width specs) are fixed; each has
an explicit regression test next to its section, and the property tests cover them too.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cascadec.errors import UserError
from cascadec.recipe import Recipe, load_recipe

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CORRUPT_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- the schema's own vocabulary

TOP_KEYS = sorted(Recipe.model_fields)


def _section_fields() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, field in Recipe.model_fields.items():
        ann = field.annotation
        fields = getattr(ann, "model_fields", None)
        if fields:
            out[name] = sorted(fields)
    return out


SECTION_FIELDS = _section_fields()
NESTED_KEYS = sorted(
    {k for keys in SECTION_FIELDS.values() for k in keys} | {"flops_reduction", "params_reduction", "keep_ratio"}
)
DOTTED_KEYS = sorted(
    {f"{s}.{k}" for s, keys in SECTION_FIELDS.items() for k in keys}
    | {f"prune.target.{k}" for k in ("flops_reduction", "params_reduction", "keep_ratio")}
    | set(TOP_KEYS)
)

# Characters str.splitlines() breaks on: a key containing one of them makes a multi-line
# error (known bug, pinned below), so the property tests' junk keys leave them out.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
safe_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=LINE_BREAKS), max_size=10)

REAL_WORDS = [
    "cascade",
    "oneshot",
    "taylor",
    "l1",
    "sgd",
    "rmsprop",
    "fashion_mnist",
    "synthetic",
    "digits",
    "cifar10",
    "imagefolder",
    "cifar_resnet8",
    "IMAGENET1K_V1",
    "builtin:cifar_resnet8_fmnist",
]

# Large numbers too: an image or batch size one digit too long must be refused with a memory
# estimate before anything is allocated (cascadec.memory), never crash or swap.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 64),
    st.sampled_from([10**5, 10**9, 2**40]),
    st.floats(-2, 2) | st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 1.0, 1e-9]),
    safe_text,
    st.sampled_from(REAL_WORDS),
)
junk_keys = st.one_of(st.sampled_from(TOP_KEYS + NESTED_KEYS), safe_text, st.integers(-3, 3), st.booleans())
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(junk_keys, c, max_size=4), max_leaves=12
)
section_values = st.dictionaries(st.sampled_from(NESTED_KEYS) | safe_text, values, max_size=6) | values
recipe_like = st.dictionaries(st.sampled_from(TOP_KEYS) | junk_keys, section_values, max_size=8)
documents = st.one_of(recipe_like, values)

VALID_TEXT = (Path(__file__).resolve().parents[1] / "recipes" / "fmnist_quick.yaml").read_text()
YAML_ALPHABET = "abc :-,[]{}'\"\t\n #&*!|>%@`?\\0123456789.\x00\x7f\u00e9\u2603\ufeff"


@st.composite
def garbage(draw) -> bytes:
    kind = draw(st.sampled_from(["binary", "yamlish", "mutated", "truncated"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "yamlish":
        return draw(st.text(st.sampled_from(YAML_ALPHABET), max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "truncated":
        return VALID_TEXT.encode()[: draw(st.integers(0, len(VALID_TEXT)))]
    # insert a tab / quote / bracket / byte somewhere into the shipped recipe
    raw = bytearray(VALID_TEXT.encode())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(raw)))
        raw[pos:pos] = draw(
            st.sampled_from(
                [
                    b"\t",
                    b"'",
                    b'"',
                    b"[",
                    b"{",
                    b":",
                    b"- ",
                    b"\xff",
                    b"\x00",
                    b"&a",
                    b"*b",
                    b"!!python/name:os.system ",
                    b"\n  ",
                ]
            )
        )
    return bytes(raw)


def _dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


_counter = itertools.count()


def _fresh_file(tmp_path: Path, content: bytes | str, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"recipe_{next(_counter)}{suffix}"
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def _check_load(path: Path) -> None:
    try:
        recipe = load_recipe(str(path))
    except UserError as exc:
        message = str(exc)
        assert message, "empty user error"
        assert len(message.splitlines()) == 1, f"multi-line user error: {message!r}"
        assert path.name in message, f"the error does not name the file: {message!r}"
    else:
        assert isinstance(recipe, Recipe)


def _check_cli(result, allowed=(0, 2)) -> None:
    assert "Traceback" not in result.err + result.out, result.err
    assert result.code in allowed, f"exit {result.code}: {result.err!r}"
    if result.code == 2:
        lines = result.err_lines
        if not lines and "Usage" in result.out:
            return  # a bare group (`cascadec`, `cascadec recipes`): click's no_args_is_help prints help, exit 2
        assert len(lines) == 1 and lines[0].startswith("error: "), f"exit 2 must print one line, got {result.err!r}"


@pytest.fixture
def no_training(monkeypatch):
    """Belt and braces: the CLI tests must never start a real compress."""
    from cascadec import stages

    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("a test started a real compress run")

    monkeypatch.setattr(stages, "compress", refuse)
    return calls


# ---------------------------------------------------------------- 1. random recipes


@pytest.mark.slow
@FAST
@given(doc=documents)
@example(doc={"model": {"name": "cifar_resnet8"}, "prune": {"target": {}}})
@example(doc={"model": None})
@example(doc=[1, 2])
@example(doc={1: 2, None: True})
def test_random_yaml_documents_load_or_fail_in_one_line(tmp_path, doc):
    _check_load(_fresh_file(tmp_path, _dump(doc)))


@FAST
@given(raw=garbage())
@example(raw=b"\xff\xfe\x00\x01")
@example(raw=b"model:\n\tname: x\n")
@example(raw=b"name: 'unterminated\n")
@example(raw=b"a: \x00\n")
@example(raw=b"")
@example(raw=b"a: &a [*a]\n")
@example(raw=b"data: {options: {? [1, 2] : 3}}\n")
@example(raw=b"%YAML 9.9\n---\na: 1\n")
@example(raw=b"a: 1\n---\nb: 2\n")
def test_garbage_recipe_files_load_or_fail_in_one_line(tmp_path, raw):
    _check_load(_fresh_file(tmp_path, raw))


@pytest.mark.slow
@CLI_SETTINGS
@given(content=st.one_of(documents.map(_dump), garbage()))
@example(content=b"\xff\xfe")
@example(content="prune: {target: {keep_ratio: 1.0}}\ndata: {image_size: 8}\n")
def test_random_recipes_through_compress_dry_run(cli, no_training, tmp_path, content):
    path = _fresh_file(tmp_path, content)
    result = cli("compress", "cifar_resnet8", "--recipe", str(path), "--dry-run")
    _check_cli(result)
    if result.code == 2:
        assert len(result.err_lines) == 1, result.err
        assert path.name in result.err, result.err
    assert not no_training


@pytest.mark.parametrize("text", ['model: {name: x}\n"a\\nb": 1\n', 'model: {name: x, "q\\u2028r": 1}\n'])
def test_unknown_key_with_a_line_break_still_gives_one_line(tmp_path, text):
    _check_load(_fresh_file(tmp_path, text))


@pytest.mark.slow
def test_deeply_nested_recipe_is_a_user_error(cli, no_training, tmp_path):
    path = _fresh_file(tmp_path, "a: " + "[" * 2000 + "]" * 2000 + "\n")
    result = cli("compress", "cifar_resnet8", "--recipe", str(path), "--dry-run")
    _check_cli(result, allowed=(2,))


# ---------------------------------------------------------------- 2. --set overrides

key_parts = st.one_of(
    st.sampled_from(TOP_KEYS + NESTED_KEYS + ["target", "options"]),
    safe_text.filter(lambda s: "=" not in s),
    st.just(""),
)
override_keys = st.one_of(st.sampled_from(DOTTED_KEYS), st.lists(key_parts, min_size=1, max_size=4).map(".".join))
override_values = st.one_of(
    st.sampled_from(
        [
            "0.5",
            "1",
            "0",
            "-3",
            "true",
            "null",
            "",
            "x",
            "[1, 8]",
            "[-1]",
            "[]",
            "{a: 1}",
            "{}",
            "[",
            "{",
            "'unterminated",
            "1e999",
            "nan",
            "!!python/object/apply:os.system [true]",
            "\u2603",
            "1,,2",
            "{flops_reduction: 0.3}",
            "{keep_ratio: 2}",
            "[0.5, 1.0]",
            "cascade",
            "rmsprop",
        ]
    ),
    safe_text,
)


@st.composite
def overrides(draw) -> str:
    key, value = draw(override_keys), draw(override_values)
    sep = draw(st.sampled_from(["=", "=", "=", "", "==", " = "]))
    return f"{key}{sep}{value}"


@FAST
@given(sets=st.lists(overrides(), min_size=1, max_size=3))
@example(sets=["a"])
@example(sets=["="])
@example(sets=["a..b=1"])
@example(sets=["model.name.x=1"])
@example(sets=["prune.target=5"])
@example(sets=["prune.target.keep_ratio="])
@example(sets=["data.options.a.b=1"])
@example(sets=["\u00e9.\u2603=\u2603"])
def test_set_overrides_give_a_recipe_or_one_line(sets):
    try:
        recipe = load_recipe("fmnist_quick", sets)
    except UserError as exc:
        assert len(str(exc).splitlines()) == 1, f"multi-line user error: {str(exc)!r}"
    else:
        assert isinstance(recipe, Recipe)


@pytest.mark.slow
def test_deeply_nested_set_value_is_a_user_error():
    with pytest.raises(UserError, match="nested too deeply"):
        load_recipe("fmnist_quick", ["data.options=" + "[" * 2000 + "]" * 2000])


@pytest.mark.parametrize("value", ["[0]", "[-1]", "[]"])
def test_nonpositive_profile_batches_are_refused(value):
    with pytest.raises(UserError):
        load_recipe("fmnist_quick", [f"profile.batches={value}"])


# ---------------------------------------------------------------- 3. argument lists

JUNK = [
    "",
    "0",
    "1",
    "-3",
    "x",
    "1,,2",
    "-",
    "--",
    "1e3",
    "nan",
    "\u2603",
    "/nonexistent/run",
    "missing.onnx",
    "missing.yaml",
    ".yaml",
    "--junk",
    "-x",
]
PATH_TOKENS = ["/nonexistent/run", "", "missing.onnx", "EMPTY_DIR", "A_FILE", "A_FILE.onnx", "x.yaml"]
BATCH_TOKENS = ["1", "1,,2", "-3", "x", "", "0", ",", "1,8", " 1 ", "1.5", "\u0661", "1000000000", "1,100000"]
INT_TOKENS = ["1", "8", "16", "0", "-3", "x", "", "1e3", "3.0", "100000", "1000000000"]


def _opt(draw, name: str, tokens) -> list[str]:
    return [name, draw(st.sampled_from(tokens))] if draw(st.booleans()) else []


# what the oracle of test_random_argument_lists knows: every PATH_TOKEN names no run, no ONNX
# file a backend can load and no data set (arg_paths below makes them), so a command that needs
# one must refuse; the inspect and compress values that can never be valid
BAD_MODELS = {"junk", "", "-3"}
BAD_IMAGE_SIZES = {"0", "-3", "x", "", "1e3", "3.0", "1000000000", "100000"}
BAD_NUM_CLASSES = {"0", "-3", "x", "", "1e3", "3.0", "1000000000"}
BAD_IN_CHANNELS = {"0", "-1", "x"}
MISSING_DATA = {"/nonexistent/run", "missing.onnx", "x.yaml"}


@st.composite
def argument_lists(draw) -> tuple[list[str], int | None]:
    """A command line and the exit it must give: 2 where it can only be refused, 0 where it
    can only succeed, None where this oracle does not decide (random ``--set`` values, a
    dry run's unchecked data folder, junk tokens sprinkled into a command that could succeed)."""
    cmd = draw(
        st.sampled_from(
            ["help", "models", "recipes", "verify", "profile", "export", "report", "inspect", "compress", "junk"]
        )
    )
    path = draw(st.sampled_from(PATH_TOKENS))
    expected: int | None
    always = False  # refused whatever junk is sprinkled in: it names no run, or no command
    if cmd == "help":
        args = draw(
            st.sampled_from([["--help"], ["verify", "--help"], ["compress", "--help"], [], ["recipes"], ["models"]])
        )
        expected = 0 if "--help" in args else 2  # a bare group prints its usage and exits 2
    elif cmd == "models":
        args = ["models", "list"] + draw(st.lists(st.sampled_from(["vgg", "", "\u2603", "resnet"]), max_size=1))
        expected = 0  # a filter that matches nothing is an empty list, not an error
    elif cmd == "recipes":
        args = draw(st.sampled_from([["recipes", "list"], ["recipes", "show"]]))
        expected = 0
        if args[-1] == "show":
            names = draw(st.lists(st.sampled_from(["fmnist_quick", "junk", "", "missing.yaml", "A_FILE"]), max_size=2))
            args += names
            expected = 0 if names == ["fmnist_quick"] else 2
    elif cmd in ("verify", "profile", "export"):
        if cmd == "verify":
            args = (
                ["verify", path]
                + _opt(draw, "--samples", INT_TOKENS)
                + _opt(draw, "--backend", ["onnxruntime", "", "junk", "trt"])
            )
        elif cmd == "profile":
            args = (
                ["profile", path]
                + _opt(draw, "--batch", BATCH_TOKENS)
                + _opt(draw, "--backend", ["onnxruntime", "junk", ""])
            )
        else:
            args = ["export", path] + _opt(draw, "--calib-images", INT_TOKENS)
            args += draw(st.lists(st.sampled_from(["--fp16", "--int8", "--trt", "--triton"]), max_size=2, unique=True))
            args += _opt(draw, "--triton-dir", PATH_TOKENS)
        expected, always = 2, True
    elif cmd == "report":
        args = (
            ["report"]
            + draw(st.lists(st.sampled_from(PATH_TOKENS), max_size=2))
            + _opt(draw, "--out", ["x.png", "x.txt", ""])
        )
        expected, always = 2, True  # no run directory, or none given
    elif cmd == "inspect":
        model = draw(st.sampled_from(["cifar_resnet8", "junk", "", "-3"]))
        size, channels = _opt(draw, "--image-size", INT_TOKENS), _opt(draw, "--in-channels", ["1", "3", "0", "-1", "x"])
        classes = _opt(draw, "--num-classes", INT_TOKENS)
        recipe = _opt(draw, "--recipe", ["fmnist_quick", "junk", "missing.yaml", ""])
        args = ["inspect", model, *size, *channels, *classes, *recipe]
        args += draw(st.lists(st.just("--json"), max_size=1))
        bad = (
            model in BAD_MODELS
            or (size and size[1] in BAD_IMAGE_SIZES)
            or (channels and channels[1] in BAD_IN_CHANNELS)
            or (classes and classes[1] in BAD_NUM_CLASSES)
            or (recipe and recipe[1] != "fmnist_quick")
        )
        expected = 2 if bad else None  # small images and odd widths: the model decides, not the oracle
        if not bad and (not size or size[1] in {"8", "16"}) and (not classes or classes[1] in {"1", "8", "16"}):
            expected = 0  # cifar_resnet8 takes any image of 8 pixels or more and any class count
    elif cmd == "compress":
        # option/value pairs only, --dry-run last: no junk token can swallow it as a value
        model = draw(st.sampled_from(["cifar_resnet8", "junk", "", "-3"]))
        recipe = draw(st.sampled_from(["fmnist_quick", "junk", "missing.yaml", "", "A_FILE"]))
        args = ["compress", model, "--recipe", recipe]
        data, weights = (
            _opt(draw, "--data", PATH_TOKENS),
            _opt(draw, "--weights", ["nonexistent.pt", "IMAGENET1K_V1", ""]),
        )
        device = _opt(draw, "--device", ["cpu", "cuda", "junk", ""])
        args += data + weights + device
        sets = [draw(overrides()) for _ in range(draw(st.integers(0, 2)))]
        for value in sets:
            args += ["--set", value]
        args.append("--dry-run")
        bad = (
            model in BAD_MODELS
            or recipe != "fmnist_quick"
            or (data and data[1] in MISSING_DATA)
            or (weights and weights[1] == "nonexistent.pt")
            or (device and device[1] in {"junk", ""})
        )
        expected = 2 if bad else (0 if not (sets or data or weights or device) else None)
        return args, expected
    else:
        args = [draw(st.sampled_from(["junk", "--junk", "compres", "-3", ""]))]
        expected, always = 2, True
    # sprinkle junk tokens (never into compress, see above)
    for _ in range(draw(st.integers(0, 2))):
        args.insert(draw(st.integers(1 if args else 0, max(len(args), 1))), draw(st.sampled_from(JUNK)))
        expected = expected if always else None
    return args, expected


def test_the_argument_oracle_decides_most_draws() -> None:
    """The oracle must name an exit for most command lines, or the property test checks little."""
    from hypothesis import find

    decided = []

    @given(drawn=argument_lists())
    @settings(max_examples=300, deadline=None, database=None)
    def collect(drawn):
        decided.append(drawn[1] is not None)

    collect()
    assert len(decided) >= 100 and sum(decided) / len(decided) >= 0.6, (sum(decided), len(decided))
    assert find(argument_lists(), lambda d: d[1] == 0) and find(argument_lists(), lambda d: d[1] == 2)


@pytest.fixture
def arg_paths(tmp_path):
    (tmp_path / "EMPTY_DIR").mkdir()
    (tmp_path / "A_FILE").write_text("not a run\n")
    (tmp_path / "A_FILE.onnx").write_bytes(b"\x00garbage onnx")
    return tmp_path


@pytest.mark.slow
@CLI_SETTINGS
@given(drawn=argument_lists())
@example(drawn=(["profile", "/nonexistent/run", "--batch", "1,,2"], 2))
@example(drawn=(["profile", "A_FILE.onnx", "--batch", "1"], 2))
@example(drawn=(["verify", "/nonexistent/run", "--samples", "-3"], 2))
@example(drawn=(["export", "EMPTY_DIR", "--calib-images", "-3"], 2))
@example(drawn=(["report", "", "--out", "x.txt"], 2))
@example(drawn=(["inspect", "cifar_resnet8", "--image-size", "8", "--in-channels", "1"], 0))
@example(drawn=(["inspect", "cifar_resnet8", "--image-size", "100000"], 2))
@example(drawn=(["compress", "cifar_resnet8", "--recipe", "fmnist_quick", "--data", "x.yaml", "--dry-run"], 2))
@example(drawn=(["recipes", "show", "fmnist_quick", "fmnist_quick"], 2))
def test_random_argument_lists_exit_as_the_oracle_says(cli, no_training, arg_paths, monkeypatch, drawn):
    """Exit 0 or 2 and never a traceback, and exactly the exit the oracle names where it names one."""
    args, expected = drawn
    monkeypatch.chdir(arg_paths)
    result = cli(*args)
    _check_cli(result, allowed=(0, 2) if expected is None else (expected,))
    assert not no_training


# ---------------------------------------------------------------- 4. corrupted run artifacts

# which commands read which artifact (profile never reads the student's weights; export rewrites the ONNX)
READERS = {
    "student.safetensors": [("verify",), ("export",)],
    "student.widths.json": [("verify",), ("profile", "--batch", "1"), ("export",)],
    "student.onnx": [("verify",), ("profile", "--batch", "1")],
    "manifest.json": [("verify",), ("profile", "--batch", "1"), ("export",)],
    "recipe.yaml": [("verify",), ("profile", "--batch", "1")],
}


@st.composite
def corruptions(draw, size: int, text: bool = False):
    """``text``: keep the file valid UTF-8 (recipe.yaml: invalid UTF-8 is a known bug, pinned below)."""
    kind = draw(st.sampled_from(["truncate", "flip", "replace", "empty"]))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, max(size - 1, 0))))
    if kind == "flip":
        mask = st.integers(1, 127) if text else st.integers(1, 255)
        flips = draw(st.lists(st.tuples(st.integers(0, max(size - 1, 0)), mask), min_size=1, max_size=4))
        return ("flip", flips)
    if kind == "replace":
        blob = (
            st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")) if text else st.binary(max_size=64)
        )
        return ("replace", draw(blob))
    return ("empty", None)


def _corrupt(path: Path, how) -> bytes:
    raw = bytearray(path.read_bytes())
    kind, arg = how
    if kind == "truncate":
        raw = raw[:arg]
    elif kind == "flip":
        for pos, mask in arg:
            raw[pos] ^= mask
    elif kind == "replace":
        raw = bytearray(arg)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    return bytes(raw)


def _run_commands(cli, run: Path, name: str, commands, original: bytes, corrupted: bytes) -> None:
    """Every reader of the damaged artifact exits 0 (or 3: a gate that now fails), or 2 with one
    line that points into the run; an artifact the corruption left intact changes nothing."""
    for command in commands:
        result = cli(command[0], str(run), *command[1:])
        _check_cli(result, allowed=(0, 2, 3))
        if corrupted == original:
            assert result.code == 0, f"{command} on an intact {name}: {result.err!r}"
        if result.code == 2:
            assert str(run) in result.err_lines[0], f"{command}: the error does not name the run: {result.err!r}"


def _make_corruption_test(name: str):
    @pytest.mark.slow  # hypothesis runs every reader of the run on several corruptions
    @CORRUPT_SETTINGS
    @given(data=st.data())
    def test(cli, copy_run, finished_run, data):
        size = (finished_run.path / name).stat().st_size
        how = data.draw(corruptions(size, text=name == "recipe.yaml"), label="corruption")
        run = copy_run(f"run{next(_counter)}")
        target = run / name
        original = target.read_bytes()
        corrupted = _corrupt(target, how)
        _run_commands(cli, run, name, READERS[name], original, corrupted)
        shutil.rmtree(run, ignore_errors=True)

    test.__name__ = f"test_corrupted_{name.replace('.', '_')}_fails_cleanly"
    return test


test_corrupted_student_safetensors_fails_cleanly = _make_corruption_test("student.safetensors")
test_corrupted_student_widths_json_fails_cleanly = _make_corruption_test("student.widths.json")
test_corrupted_student_onnx_fails_cleanly = _make_corruption_test("student.onnx")
test_corrupted_manifest_json_fails_cleanly = _make_corruption_test("manifest.json")
test_corrupted_recipe_yaml_fails_cleanly = _make_corruption_test("recipe.yaml")


def _edit_json(path: Path, **changes) -> None:
    import json

    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_non_utf8_run_recipe_is_a_user_error(cli, copy_run):
    run = copy_run()
    (run / "recipe.yaml").write_bytes(b"name: x\xff\n")
    _check_cli(cli("verify", str(run)), allowed=(2,))


def test_run_recipe_with_other_channels_is_a_user_error(cli, copy_run):
    run = copy_run()
    path = run / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["options"] = {"in_channels": 1}  # the synthetic data now gives 1-channel images
    path.write_text(yaml.safe_dump(recipe))
    _check_cli(cli("verify", str(run)), allowed=(2,))


@pytest.mark.parametrize(
    "changes", [{"stages": None}, {"stages": []}, {"metrics": []}], ids=["no-stages", "stages-list", "metrics-list"]
)
def test_manifest_with_wrong_sections_is_a_user_error(cli, copy_run, changes):
    run = copy_run()
    _edit_json(run / "manifest.json", **changes)
    _check_cli(cli("verify", str(run)), allowed=(2,))


@pytest.mark.parametrize(
    "changes",
    [{"model_kwargs": {"num_clases": 10}}, {"input_shape": [3, "a", 32]}, {"input_shape": [3, -1, 32]}],
    ids=["kwarg-typo", "shape-str", "shape-negative"],
)
def test_width_spec_with_bad_fields_is_a_user_error(cli, copy_run, changes):
    run = copy_run()
    _edit_json(run / "student.widths.json", **changes)
    _check_cli(cli("verify", str(run)), allowed=(2,))


# ---------------------------------------------------------------- 5. YAML safety

PWN_TAGS = [
    '!!python/object/apply:os.system ["touch {marker}"]\n',
    'model:\n  name: !!python/object/apply:os.system ["touch {marker}"]\n',
    'data:\n  options:\n    x: !!python/object/apply:subprocess.call [["touch", "{marker}"]]\n',
    "name: !!python/name:os.system\n",
]


@pytest.mark.parametrize("template", PWN_TAGS)
def test_python_tags_in_a_recipe_are_refused_not_executed(cli, no_training, tmp_path, template):
    marker = tmp_path / "pwned"
    path = _fresh_file(tmp_path, template.format(marker=marker))
    result = cli("compress", "cifar_resnet8", "--recipe", str(path), "--dry-run")
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1 and "Traceback" not in result.err
    assert not marker.exists(), "the recipe's python tag was executed"
    with pytest.raises(UserError):
        load_recipe(str(path))
    assert not marker.exists()


def test_python_tag_in_a_set_value_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    try:
        load_recipe("fmnist_quick", [f'model.name=!!python/object/apply:os.system ["touch {marker}"]'])
    except UserError:
        pass
    assert not marker.exists()


def test_python_tag_in_a_run_recipe_is_refused_not_executed(cli, copy_run, tmp_path):
    marker = tmp_path / "pwned"
    run = copy_run()
    (run / "recipe.yaml").write_text(PWN_TAGS[1].format(marker=marker))
    for command in (("verify",), ("profile", "--batch", "1")):
        result = cli(command[0], str(run), *command[1:])
        assert result.code == 2, result.err
        assert len(result.err_lines) == 1
        assert not marker.exists()


def test_an_onnx_graph_that_loads_but_cannot_run_is_a_user_error(tmp_path):
    """A damaged student.onnx whose kernels reject its own shapes at run time (found by the
    corruption test above: ORT's nchwc conv 'output and sum shape must match') exits 2 naming
    the file, not 1 with an internal error."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from cascadec.backends.onnxruntime_backend import OrtRunner

    # Add of an input of symbolic width and a (1, 4) initializer: ORT loads it (shape inference
    # cannot tell), and the kernel fails at run time on a (1, 3) input
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("b", TensorProto.FLOAT, [1, 4], [0.0] * 4)],
    )
    path = tmp_path / "student.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    runner = OrtRunner(path)
    with pytest.raises(UserError, match="cannot run .*student.onnx"):
        runner(np.zeros((1, 3), dtype=np.float32))
