"""The multi-node launch files in deploy/ (issue 30, item 1): they are not run here (no SLURM,
no Kubernetes), so this checks what can be checked without a cluster: each one launches torchrun
with a c10d rendezvous and restarts, its cascadec command line parses with cascadec's own CLI
(options, recipe and model names), the run directory and data sit on the storage every node
shares, and a requeued or restarted job resumes the run."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
import yaml

from cascadec.cli import app
from cascadec.models import list_models
from cascadec.recipe import load_recipe

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _cascadec_args(argv: list[str]) -> list[str]:
    """What follows ``-m cascadec`` in a torchrun command line."""
    at = argv.index("-m")
    assert argv[at + 1] == "cascadec", argv
    return argv[at + 2 :]


def _parses(args: list[str], env: dict[str, str]) -> dict:
    """``args`` through cascadec's CLI parser (nothing runs): the options it would call with."""
    args = [env.get(a[2:-1], a) if a.startswith("${") else a for a in args]
    command = typer.main.get_command(app)
    with command.make_context("cascadec", list(args)) as ctx:
        sub = command.get_command(ctx, args[0])
        with sub.make_context(args[0], list(args[1:]), parent=ctx) as sub_ctx:
            return dict(sub_ctx.params)


def _sbatch_command() -> tuple[list[str], dict[str, str]]:
    text = (DEPLOY / "slurm" / "cascadec.sbatch").read_text()
    defaults = {}
    for line in text.splitlines():  # NAME=${NAME:-default}
        if "=${" in line and ":-" in line and not line.startswith("#"):
            name, default = line.split("=", 1)[0], line.split(":-", 1)[1].rstrip("}")
            defaults[name.replace("export ", "").strip()] = default
    srun = text[text.index("srun torchrun") :].replace("\\\n", " ")
    argv = shlex.split(srun.split("\n", 1)[0])
    expanded = []
    for a in argv:
        for name, value in defaults.items():
            a = a.replace(f'"${name}"', value).replace(f"${name}", value)
        expanded.append(a)
    return expanded, defaults


def test_the_slurm_script_launches_torchrun_across_nodes_and_resumes() -> None:
    argv, defaults = _sbatch_command()
    assert argv[:2] == ["srun", "torchrun"]
    flags = " ".join(argv[: argv.index("-m")])
    for needed in ("--nnodes", "--rdzv-backend c10d", "--rdzv-endpoint", "--rdzv-id", "--max-restarts"):
        assert needed in flags, needed
    params = _parses(_cascadec_args(argv), defaults)
    assert params["resume"] is True and params["device"] == "cuda"
    assert params["data"].startswith("/shared/") and params["out_dir"].startswith("/shared/")
    assert params["model"] in list_models() and load_recipe(params["recipe"]).name == params["recipe"]
    text = (DEPLOY / "slurm" / "cascadec.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text  # one torchrun agent per node


def test_the_pytorchjob_is_elastic_and_runs_a_command_cascadec_accepts() -> None:
    job = yaml.safe_load((DEPLOY / "kubernetes" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and policy["maxRestarts"] >= 1
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == policy["minReplicas"] == policy["maxReplicas"] >= 2
    pod = worker["template"]["spec"]
    container = pod["containers"][0]
    argv = container["command"]
    assert argv[0] == "torchrun"
    params = _parses(_cascadec_args(argv), {})
    assert params["resume"] is True and params["device"] == "cuda"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert params["data"].startswith("/shared/") and params["out_dir"].startswith("/shared/") and "/shared" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/shared"]]  # storage every pod shares
    assert params["model"] in list_models() and load_recipe(params["recipe"]).name == params["recipe"]
