"""executor.engines_per_task on the real test cluster: gres gpu:4 with tensor_parallel_size 2 runs 2 engines."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir, read_json
from hpcrollout.status import run_status
from hpcrollout.submit import submit_run
from tests.conftest import make_config, make_prompts, write_input
from tests.slurm_fixtures import sample_keys, wait_for_jobs

pytestmark = pytest.mark.slurm

N_PROMPTS = 8


def test_four_gpus_tensor_parallel_two_runs_two_engines_on_their_own_gpus(slurm_cluster, tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.parquet", make_prompts(N_PROMPTS))
    config = make_config(
        tmp_path, tiny_model, inp,
        sharding={"num_shards": 2},
        engine={"tensor_parallel_size": 2},
        executor={"type": "slurm", "num_tasks": 1, "engines_per_task": "auto"},
        slurm={"cpus_per_task": 2, "gpus_per_task": 4, "time_min": 10, "job_name": "hpcr-test-engines",
               "max_retries": 0},
    )
    result = submit_run(config)
    history = wait_for_jobs([result["job_id"]])
    assert all(states == ["COMPLETED"] for states in history.values()), history
    rundir = RunDir(config.run_dir)
    assert rundir.done_shards() == {0, 1}

    # auto: 4 GPUs / tensor parallel 2 = 2 engines, each on its own 2 of the task's GPUs
    records = [read_json(rundir.engine_record(0, e)) for e in (0, 1)]
    assert [r["gpus"] for r in records] == [["0", "1"], ["2", "3"]]
    assert [r["exit_code"] for r in records] == [0, 0]
    assert not rundir.engine_record(0, 2).exists()
    slices = {0: ["0", "1"], 1: ["2", "3"]}
    for shard in (0, 1):
        marker = json.loads(rundir.done_marker(shard).read_text())
        assert marker["gpus"] == slices[marker["engine_index"]], marker
        assert marker["engine"]["tensor_parallel_size"] == 2, marker["engine"]
        assert marker["pid"] == records[marker["engine_index"]]["pid"]

    st = run_status(rundir.root)
    assert st["complete"] and [(e["engine"], e["gpus"], e["state"]) for e in st["engines"]] == [
        (0, ["0", "1"], "exited"), (1, ["2", "3"], "exited")
    ]
    merge_run(rundir.root, tmp_path / "merged.parquet")
    keys = sample_keys(pq.read_table(tmp_path / "merged.parquet"))
    assert len(keys) == len(set(keys)) == N_PROMPTS * config.sampling.n
