"""Triton model repository: layout and config.pbtxt text for a tiny finished run."""

from __future__ import annotations

import json
import re

import pytest

from cascadec.backends.triton import write_model_repository
from cascadec.errors import UserError
from cascadec.prune.spec import read_spec


def parse_config(text: str) -> dict:
    """The key lines of a config.pbtxt: top-level scalars, and the tensors' name/type/dims in order."""
    top = dict(re.findall(r'^(name|platform|max_batch_size): "?([^"\n]+)"?$', text, re.M))
    tensors = [
        (n, t, [int(d) for d in dims.replace(" ", "").split(",")])
        for n, t, dims in re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[([^\]]*)\]', text)
    ]
    return {**top, "tensors": tensors, "dynamic_batching": "dynamic_batching { }" in text}


def test_onnx_repository_layout_and_config(copy_run, tmp_path):
    run = copy_run()
    spec = read_spec(run / "student.widths.json")
    c, h, w = spec["input_shape"]
    classes = spec["model_kwargs"]["num_classes"]
    written = write_model_repository(run)
    repo = run / "triton"
    assert sorted(p.relative_to(repo).as_posix() for p in written) == ["run_onnx/1/model.onnx", "run_onnx/config.pbtxt"]
    assert (repo / "run_onnx/1/model.onnx").read_bytes() == (run / "student.onnx").read_bytes()
    config = parse_config((repo / "run_onnx/config.pbtxt").read_text())
    assert config["name"] == "run_onnx" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == "2"  # the tiny recipe profiles batches 1 and 2
    assert config["tensors"] == [("input", "TYPE_FP32", [c, h, w]), ("logits", "TYPE_FP32", [classes])]
    assert config["dynamic_batching"]


def test_trt_model_when_an_engine_exists(copy_run, tmp_path):
    run = copy_run()
    (run / "student.plan").write_bytes(b"PLAN")
    (run / "student.plan.json").write_text(json.dumps({"max_batch": 16}))
    out = tmp_path / "repo"
    write_model_repository(run, out)
    assert (out / "run_trt/1/model.plan").read_bytes() == b"PLAN"
    config = parse_config((out / "run_trt/config.pbtxt").read_text())
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == "16"
    assert parse_config((out / "run_onnx/config.pbtxt").read_text())["max_batch_size"] == "16"


def test_missing_onnx_is_a_user_error(copy_run):
    run = copy_run()
    (run / "student.onnx").unlink()
    with pytest.raises(UserError, match="student.onnx: missing"):
        write_model_repository(run)


@pytest.mark.slow
def test_cli_export_triton(cli, copy_run, tmp_path):
    run = copy_run()
    result = cli("export", run, "--triton", "--triton-dir", tmp_path / "models")
    assert result.code == 0, result.err
    assert (tmp_path / "models/run_onnx/config.pbtxt").is_file()
    assert not (tmp_path / "models/run_trt").exists()
    result = cli("export", run, "--triton-dir", tmp_path / "x")
    assert result.code == 2 and "--triton" in result.err
