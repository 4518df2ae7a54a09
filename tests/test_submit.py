"""submit: sbatch resources from the config, --dry-run submits nothing, changed configs and racing submits refused."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hpcrollout import resume
from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.slurm import sbatch_script, slurm_parameters
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from hpcrollout.submit import dry_run, submit_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input
from tests.slurm_fixtures import slurm_output

REPO = Path(__file__).resolve().parent.parent


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
    queued = slurm_output(["squeue", "-h", "-n", name])
    accounted = slurm_output(["sacct", "-n", "-X", "--name", name, "--starttime", "now-1hours"])
    assert queued.strip() == "" and accounted.strip() == ""


def _resume_args(run_dir, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    resume.add_cli_args(parser)
    return parser.parse_args([str(run_dir), *extra])


def test_changed_config_is_refused_on_resume_and_submit(tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model)
    rundir = prepare_run(config)
    run_task(rundir.root, 0)  # samples committed: from now on they decide the settings
    with pytest.raises(HpcRolloutError, match=r"changed: sampling settings[\s\S]*sampling.temperature: 1.0 -> 0.5"):
        resume.main(_resume_args(rundir.root, "--set", "sampling.temperature=0.5"))
    changed = config.model_copy(deep=True)
    changed.model.tokenizer = str(tiny_model)
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


def test_missing_model_paths_are_refused_before_a_run_directory_exists(tiny_model, tmp_path):
    """A path that does not exist is named as such, at submit time, and nothing is left on disk."""
    config = _config(tmp_path, tmp_path / "models" / "Qwen3-4B")
    for call in (submit_run, dry_run):
        with pytest.raises(HpcRolloutError, match=r"model.path: \S+/models/Qwen3-4B does not exist"):
            call(config)
    config = _config(tmp_path, tiny_model)
    config.model.chat_template = str(tmp_path / "chatml.jinja")
    with pytest.raises(HpcRolloutError, match=r"model.chat_template: \S+chatml.jinja does not exist"):
        submit_run(config)
    config = _config(tmp_path, tiny_model)
    config.model.tokenizer = str(tmp_path / "tok")
    with pytest.raises(HpcRolloutError, match=r"model.tokenizer: \S+tok does not exist"):
        submit_run(config)
    assert not (tmp_path / "run").exists()


def test_a_failed_submit_leaves_nothing_behind(tiny_model, tmp_path):
    """Bad input found while preparing: no lock file, no half run directory (not even its parent directories)."""
    inp = write_input(tmp_path / "in.parquet", [{"question": "no prompt column"}])
    config = make_config(tmp_path, tiny_model, inp, executor={"type": "local"})
    config.run_dir = str(tmp_path / "runs" / "demo" / "run")
    with pytest.raises(HpcRolloutError, match="has no 'prompt' column"):
        submit_run(config)
    assert not (tmp_path / "runs").exists()


def test_any_setting_may_change_on_resume_while_nothing_is_committed(tmp_path, tiny_model):
    """Every task failed on a wrong model path: resume --set model.path=... is accepted without --force."""
    config = _config(tmp_path, tiny_model)
    rundir = prepare_run(config)
    resume.main(_resume_args(rundir.root, "--dry-run", "--set", "model.path=" + str(tiny_model.parent)))  # no refusal
    config.model.tokenizer = str(tiny_model)
    config.executor.type = "local"
    submit_run(config)
    assert rundir.load_config().model.tokenizer == str(tiny_model) and len(rundir.done_shards()) == 3


def test_demo_config_runs_from_any_directory_with_no_earlier_step(tmp_path):
    """configs/demo.yaml as it is (copied, so its relative paths land in tmp_path), from another working directory:
    it builds its model and input beside the config, runs, and merges."""
    configs = tmp_path / "checkout" / "configs"
    configs.mkdir(parents=True)
    demo = configs / "demo.yaml"
    demo.write_text((REPO / "configs" / "demo.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "hpcrollout.submit", "--config", str(demo)],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "checkout" / "runs" / "demo" / "run"
    assert "ran 2 local task(s); 0 failed" in proc.stdout and str(run_dir) in proc.stdout
    assert (tmp_path / "checkout" / "runs" / "demo" / "model" / "config.json").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
    merged = tmp_path / "merged.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "hpcrollout", "merge", str(run_dir), "--output", str(merged)],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(merged)
    assert table.num_rows == 24 and all(len(r) == 4 for r in table.column("responses").to_pylist())


def test_dry_run_does_not_list_queued_or_running_shards_as_to_run(tiny_model, tmp_path, monkeypatch):
    import hpcrollout.executors.slurm as slurm

    config = _config(tmp_path, tiny_model)
    prepare_run(config)
    monkeypatch.setattr(slurm, "active_tasks", lambda rundir: {1: "77_1"})  # squeue: task 1 is running
    text = dry_run(config)
    assert "shards: 3 (2 to run, 1 queued or running)" in text
    (row,) = [ln for ln in text.splitlines() if ln.split()[:1] == ["1"]]
    assert row.endswith("queued or running (job 77_1)")
    assert "would submit: 2 task(s) [0,2]" in text


def test_a_task_pickled_under_the_old_module_path_still_loads(tmp_path):
    """A run submitted before slurm_task.py moved to executors/ and requeued by SLURM after an upgrade: submitit
    unpickles ``hpcrollout.slurm_task.SlurmTask``, which must still be the task (same state, same class)."""
    import pickle

    from hpcrollout.executors.slurm_task import SlurmTask

    new = pickle.dumps(SlurmTask(tmp_path), protocol=0)  # protocol 0 names the class as text
    assert b"hpcrollout.executors.slurm_task" in new
    old = new.replace(b"hpcrollout.executors.slurm_task", b"hpcrollout.slurm_task")
    task = pickle.loads(old)
    assert type(task) is SlurmTask
    assert (task.run_dir, task._requeued) == (str(tmp_path), False)
