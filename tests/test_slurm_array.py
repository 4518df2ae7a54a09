"""A real SLURM job array (the project's local test cluster): complete, exactly once, fake GPUs set tensor parallelism."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir
from hpcrollout.status import format_status, run_status
from hpcrollout.submit import submit_run
from tests.conftest import make_config, make_prompts, write_input
from tests.slurm_fixtures import sample_keys, wait_for_jobs

pytestmark = pytest.mark.slurm

N_PROMPTS = 24
N_SAMPLES = 3


def slurm_config(tmp_path, model, inp, name: str, **sections):
    """A config for the test cluster: 1 CPU per task, short time limit, the SLURM executor."""
    slurm = {"cpus_per_task": 1, "gpus_per_task": 0, "time_min": 10, "job_name": f"hpcr-test-{name}", "max_retries": 0}
    slurm.update(sections.pop("slurm", {}))
    executor = {"type": "slurm", "num_tasks": 1, **sections.pop("executor", {})}
    return make_config(tmp_path, model, inp, slurm=slurm, executor=executor, **sections)


def test_array_completes_exactly_once_with_gpu_tensor_parallel(slurm_cluster, tiny_model, tmp_path):
    """3 tasks x 2 shards each, 2 fake GPUs per task: all done, every (uid, sample) once, tensor parallel 2."""
    inp = write_input(tmp_path / "in.parquet", make_prompts(N_PROMPTS))
    config = slurm_config(
        tmp_path,
        tiny_model,
        inp,
        "array",
        sharding={"num_shards": 6},
        executor={"num_tasks": 3},
        slurm={"gpus_per_task": 2, "additional_parameters": {"hold": True}},  # queued until released below
    )
    result = submit_run(config)
    try:
        assert result["tasks"] == [0, 1, 2] and result["job_id"]
        # Submitting again while the array is queued submits nothing (no task runs twice). The array is held,
        # so it is queued for certain, however fast the tasks would have been.
        again = submit_run(config)
        assert again["tasks"] == []
        assert sorted(again["active"]) == [0, 1, 2]
    finally:
        subprocess.run(["scontrol", "release", result["job_id"]], check=True)

    history = wait_for_jobs([result["job_id"]])
    assert sorted(history) == [f"{result['job_id']}_{i}" for i in range(3)]
    assert all(states == ["COMPLETED"] for states in history.values()), history
    rundir = RunDir(config.run_dir)
    assert rundir.done_shards() == set(range(6))
    for shard in range(6):
        marker = json.loads(rundir.done_marker(shard).read_text())
        assert marker["engine"]["tensor_parallel_size"] == 2, marker["engine"]

    merge_run(rundir.root, tmp_path / "merged.parquet")
    merged = pq.read_table(tmp_path / "merged.parquet")
    keys = sample_keys(merged)
    assert merged.num_rows == N_PROMPTS
    assert len(keys) == len(set(keys)) == N_PROMPTS * N_SAMPLES

    st = run_status(rundir.root)
    assert st["complete"] and st["counts"] == {"done": 6}
    assert st["samples"] == {"done": N_PROMPTS * N_SAMPLES, "total": N_PROMPTS * N_SAMPLES}
    assert "complete; merge with" in format_status(st)

    # Every shard done: a further submit has nothing to do.
    assert submit_run(config)["tasks"] == []
