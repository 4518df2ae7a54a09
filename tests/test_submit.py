"""submit: sbatch resources from the config, --dry-run submits nothing, changed configs and racing submits refused."""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid

import pytest

from hpcrollout import resume
from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from hpcrollout.submit import dry_run, sbatch_script, slurm_parameters, submit_run
from tests.conftest import make_config, make_prompts, write_input


def _config(tmp_path, model, **slurm):
    inp = write_input(tmp_path / "in.parquet", make_prompts(9))
    return make_config(
        tmp_path,
        model,
        inp,
        sharding={"num_shards": 3},
        executor={"type": "slurm", "num_tasks": 3},
        slurm={"cpus_per_task": 1, "gpus_per_task": 0, **slurm},
    )


def test_sbatch_script_carries_every_resource(tmp_path):
    model = tmp_path / "model"  # never loaded: only the script is built
    config = _config(
        tmp_path,
        model,
        partition="gpu",
        account="proj1",
        qos="high",
        time_min=90,
        nodes=1,
        gpus_per_task=4,
        cpus_per_task=16,
        mem_gb=64,
        constraint="a100",
        array_parallelism=2,
        exclusive=True,
        job_name="rollout",
        additional_parameters={"mail-type": "FAIL"},
        setup=["module load cuda/12.4", "source /opt/venv/bin/activate"],
        signal_delay_s=180,
    )
    params = slurm_parameters(config)
    assert params["gres"] == "gpu:4" and params["mem"] == "64GB" and params["time"] == 90
    script = sbatch_script(RunDir(config.run_dir), config, 3)
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --qos=high",
        "#SBATCH --time=90",
        "#SBATCH --nodes=1",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64GB",
        "#SBATCH --constraint=a100",
        "#SBATCH --array=0-2%2",
        "#SBATCH --exclusive",
        "#SBATCH --job-name=rollout",
        "#SBATCH --mail-type=FAIL",
        "#SBATCH --signal=USR2@180",
        "module load cuda/12.4",
        "source /opt/venv/bin/activate",
        "-m submitit.core._submit",
    ):
        assert line in script, f"{line!r} missing from:\n{script}"
    assert script.index("module load cuda/12.4") < script.index("submitit.core._submit")


def test_dry_run_submits_nothing(slurm_cluster, tiny_model, tmp_path):
    name = f"hpcr-dry-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, tiny_model, gpus_per_task=2, job_name=name)
    path = tmp_path / "big.yaml"
    path.write_text(config.to_yaml())
    proc = subprocess.run(
        [sys.executable, "-m", "hpcrollout.submit", "--config", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "nothing is written or submitted" in out and "would submit: 3 task(s) [0-2]" in out
    assert "#SBATCH --array=0-2%3" in out and "#SBATCH --gres=gpu:2" in out and f"--job-name={name}" in out
    assert "shards: 3 (3 to run)" in out
    assert not (tmp_path / "run").exists()  # not even the run directory
    queued = subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True, check=True).stdout
    accounted = subprocess.run(
        ["sacct", "-n", "-X", "--name", name, "--starttime", "now-1hours"], capture_output=True, text=True, check=True
    ).stdout
    assert queued.strip() == "" and accounted.strip() == ""


def _resume_args(run_dir, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    resume.add_cli_args(parser)
    return parser.parse_args([str(run_dir), *extra])


def test_changed_config_is_refused_on_resume_and_submit(tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model)
    rundir = prepare_run(config)
    with pytest.raises(HpcRolloutError, match=r"changed: sampling settings[\s\S]*sampling.temperature: 1.0 -> 0.5"):
        resume.main(_resume_args(rundir.root, "--set", "sampling.temperature=0.5"))
    changed = config.model_copy(deep=True)
    changed.model.path = str(tmp_path / "other-model")
    with pytest.raises(HpcRolloutError, match="model settings"):
        submit_run(changed)
    with pytest.raises(HpcRolloutError, match="model"):
        dry_run(changed)
    assert not (rundir.root / "jobs.json").exists()  # nothing was submitted


def test_racing_submit_gets_a_clear_error(tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model)
    holder = RunDir(config.run_dir).lock("submit")  # another submit holds the run directory
    with holder, pytest.raises(HpcRolloutError, match="locked by submit pid .* another submit is in progress"):
        submit_run(config)


def test_slurm_executor_without_slurm_client_says_so(tiny_model, tmp_path, monkeypatch):
    config = _config(tmp_path, tiny_model)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no srun/sbatch on PATH, as on a laptop
    with pytest.raises(HpcRolloutError, match="no SLURM client .* or set executor.type: local"):
        submit_run(config)
