"""The run directory: creation, refusal to overwrite, resume rules, stage records, and
manifest writes that never leave half a file behind."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest
import yaml
from helpers.cli import kill_writer_midway

from cascadec.errors import UserError
from cascadec.recipe import load_recipe, recipe_to_yaml
from cascadec.run import MANIFEST_FORMAT, RunDir, recipe_digest, write_json_atomic


@pytest.fixture
def recipe():
    return load_recipe("fmnist_quick")


def on_disk(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_create_writes_recipe_and_manifest(tmp_path, recipe):
    path = tmp_path / "runs" / "a"  # parents are created
    run = RunDir.create(path, recipe, command=["cascadec", "compress"])
    assert run.path == path
    assert (path / "recipe.yaml").read_text() == recipe_to_yaml(recipe)
    manifest = on_disk(path)
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["status"] == "running"
    assert manifest["recipe"] == "fmnist_quick"
    assert manifest["recipe_digest"] == recipe_digest(recipe)
    assert manifest["command"] == ["cascadec", "compress"]
    assert manifest["stages"] == {} and manifest["metrics"] == {}
    assert "torch" in manifest["versions"] and "python" in manifest["versions"]
    assert RunDir.open(path).recipe() == recipe


def test_create_in_an_existing_empty_directory(tmp_path, recipe):
    RunDir.create(tmp_path, recipe)
    assert (tmp_path / "manifest.json").is_file()


def test_refuses_a_directory_that_is_not_a_run(tmp_path, recipe):
    (tmp_path / "precious.txt").write_text("keep me")
    message = user_error(RunDir.create, tmp_path, recipe)
    assert "not a cascadec run directory" in message and str(tmp_path) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_refuses_to_overwrite_a_finished_run(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    run.finish()
    before = (tmp_path / "r" / "manifest.json").read_bytes()
    message = user_error(RunDir.create, tmp_path / "r", recipe)
    assert "finished run" in message and "--out" in message
    assert (tmp_path / "r" / "manifest.json").read_bytes() == before


def test_refuses_to_overwrite_an_unfinished_run(tmp_path, recipe):
    RunDir.create(tmp_path / "r", recipe)
    message = user_error(RunDir.create, tmp_path / "r", recipe)
    assert "unfinished run" in message and "--resume" in message


def test_resume_continues_with_the_same_recipe(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    with run.stage("teacher"):
        pass
    run.record("teacher.accuracy", 0.9)
    run.finish("failed")
    resumed = RunDir.create(tmp_path / "r", load_recipe("fmnist_quick"), resume=True)
    manifest = on_disk(tmp_path / "r")
    assert manifest["status"] == "running" and len(manifest["resumed"]) == 1
    assert resumed.is_done("teacher") and resumed.metric("teacher.accuracy") == 0.9


def test_resume_with_a_different_recipe_is_refused(tmp_path, recipe):
    RunDir.create(tmp_path / "r", recipe)
    changed = load_recipe("fmnist_quick", ["train.lr=0.5"])
    message = user_error(RunDir.create, tmp_path / "r", changed, resume=True)
    assert "different recipe" in message
    assert on_disk(tmp_path / "r")["recipe_digest"] == recipe_digest(recipe)


def test_recipe_digest_is_stable_through_yaml(recipe):
    from cascadec.recipe import validate_recipe

    assert recipe_digest(validate_recipe(yaml.safe_load(recipe_to_yaml(recipe)))) == recipe_digest(recipe)
    assert recipe_digest(load_recipe("fmnist_quick", ["train.lr=0.5"])) != recipe_digest(recipe)


def test_stage_timing_and_info_are_recorded(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    with run.stage("teacher") as info:
        assert on_disk(run.path)["stages"]["teacher"]["status"] == "running"  # visible while it runs
        time.sleep(0.05)
        info["source"] = "random init"
    stage = on_disk(run.path)["stages"]["teacher"]
    assert stage["status"] == "done" and stage["source"] == "random init"
    assert 0.05 <= stage["seconds"] < 5
    assert stage["started"]
    assert RunDir.open(run.path).is_done("teacher")


def test_failed_and_interrupted_stages_are_recorded(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    with pytest.raises(ValueError):
        with run.stage("prune"):
            raise ValueError("the first line\nand a second one")
    with pytest.raises(KeyboardInterrupt):
        with run.stage("export"):
            raise KeyboardInterrupt
    stages = on_disk(run.path)["stages"]
    assert stages["prune"]["status"] == "failed" and stages["prune"]["error"] == "the first line"
    assert stages["export"]["status"] == "interrupted"
    assert "seconds" in stages["prune"] and "seconds" in stages["export"]
    reopened = RunDir.open(run.path)
    assert not reopened.is_done("prune") and not reopened.is_done("export")


def test_metrics_and_finish_persist(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    run.record("student.flops", 123)
    run.record("parity", {"backends": {"onnxruntime": {"passed": True}}})
    run.finish()
    again = RunDir.open(run.path)
    assert again.metric("student.flops") == 123
    assert again.metric("parity")["backends"]["onnxruntime"]["passed"] is True
    assert again.metric("absent", "default") == "default"
    assert again.manifest["status"] == "finished" and again.manifest["finished"]


def test_manifest_writes_leave_no_temp_files(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    for i in range(5):
        run.record(f"m{i}", i)
        with run.stage(f"s{i}"):
            pass
    assert not [p.name for p in run.path.iterdir() if p.name.endswith(".tmp")]
    assert on_disk(run.path)["metrics"] == {f"m{i}": i for i in range(5)}


_MANIFEST_WRITER = textwrap.dedent("""
    import sys
    from cascadec.recipe import load_recipe
    from cascadec.run import RunDir
    run = RunDir.create(sys.argv[1], load_recipe("fmnist_quick"))
    i = 0
    while True:  # a manifest of a few MB per write, so a kill often lands in the middle of one
        run.record("big", [i] * 300_000)
        run.record("i", i)
        i += 1
""")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_sigkill_during_manifest_writes_leaves_a_whole_manifest(tmp_path, delay):
    """Atomicity tested as it matters: a writer killed -9 at an arbitrary moment leaves, under
    manifest.json, one whole manifest consistent with itself, and a run that resumes."""
    path = tmp_path / "r" / "manifest.json"
    kill_writer_midway(_MANIFEST_WRITER, path.parent, lambda: path.exists() and "big" in path.read_text(), delay)
    manifest = json.loads(path.read_text())
    big = manifest["metrics"]["big"]
    assert len(big) == 300_000 and len(set(big)) == 1 and manifest["format"] == MANIFEST_FORMAT
    resumed = RunDir.create(path.parent, load_recipe("fmnist_quick"), resume=True)  # the lock died with it
    resumed.finish("finished")


def test_a_failed_manifest_write_keeps_the_previous_manifest(tmp_path, recipe, monkeypatch):
    run = RunDir.create(tmp_path / "r", recipe)
    run.record("kept", 1)
    before = (run.path / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    message = user_error(run.record, "lost", 2)
    assert "cannot write" in message and "manifest.json" in message
    monkeypatch.undo()
    assert (run.path / "manifest.json").read_text() == before
    assert json.loads(before)["metrics"] == {"kept": 1}


def test_write_json_atomic_into_a_missing_directory(tmp_path):
    message = user_error(write_json_atomic, tmp_path / "gone" / "x.json", {"a": 1})
    assert "cannot write" in message


def test_run_under_a_regular_file_is_a_user_error(tmp_path, recipe):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    message = user_error(RunDir.create, blocker / "run", recipe)
    assert str(blocker / "run") in message
    assert blocker.read_text() == "x"


def test_read_only_parent_is_a_user_error(tmp_path, recipe, monkeypatch):
    """As root (how CI runs) chmod does not stop writes, so the kernel's answer is simulated:
    the same EACCES a read-only parent gives an unprivileged user."""
    import errno
    import pathlib

    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            real_mkdir = pathlib.Path.mkdir

            def refused(self, *args, **kwargs):
                if parent in self.parents:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real_mkdir(self, *args, **kwargs)

            monkeypatch.setattr(pathlib.Path, "mkdir", refused)
        message = user_error(RunDir.create, parent / "run", recipe)
        assert str(parent / "run") in message
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_out_pointing_at_a_regular_file_is_a_user_error(tmp_path, recipe):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    message = user_error(RunDir.create, blocker, recipe)
    assert str(blocker) in message
    assert blocker.read_text() == "x"


def test_open_rejects_what_is_not_a_run(tmp_path):
    assert "run directory not found" in user_error(RunDir.open, tmp_path / "missing")
    assert "no manifest.json" in user_error(RunDir.open, tmp_path)
    (tmp_path / "manifest.json").write_text("{ half a manif")
    assert "corrupted manifest" in user_error(RunDir.open, tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert "not a cascadec manifest" in user_error(RunDir.open, tmp_path)


def test_recipe_of_a_run_is_validated(tmp_path, recipe):
    run = RunDir.create(tmp_path / "r", recipe)
    data = yaml.safe_load((run.path / "recipe.yaml").read_text())
    data["verify"]["sampels"] = 3
    (run.path / "recipe.yaml").write_text(yaml.safe_dump(data))
    message = user_error(run.recipe)
    assert str(run.path / "recipe.yaml") in message and "verify.sampels: unknown key" in message
    (run.path / "recipe.yaml").unlink()
    assert "missing" in user_error(run.recipe)
