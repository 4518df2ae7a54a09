"""hpcrollout score --slurm on the project's test SLURM cluster: one CPU array task per shard, then assembly."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hpcrollout import cli
from hpcrollout.rundir import RunDir
from hpcrollout.scoring.score import Settings, score_file, score_run_dir
from hpcrollout.scoring.slurm import submit_scoring
from tests.slurm_fixtures import wait_for_jobs

pytestmark = pytest.mark.slurm

RULE = "def has_e(response, row):\n    return 'e' in response\n"


@pytest.fixture
def finished_run(tmp_path: Path, tiny_model: Path) -> RunDir:
    """A run generated here (not on SLURM): 8 prompts in 3 shards, n=3."""
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_task
    from tests.conftest import make_config, make_prompts, write_input

    inp = write_input(tmp_path / "in.parquet", make_prompts(8))
    config = make_config(
        tmp_path,
        tiny_model,
        inp,
        sharding={"num_shards": 3},
        slurm={"cpus_per_task": 1, "gpus_per_task": 2, "time_min": 10, "job_name": "hpcr-test-score"},
    )
    rundir = prepare_run(config)
    run_task(rundir.root, 0)
    return rundir


def test_scoring_array_then_assembly(slurm_cluster, finished_run: RunDir, tmp_path: Path) -> None:
    rd = finished_run
    (tmp_path / "rule.py").write_text(RULE)
    settings = Settings(f"python:{tmp_path / 'rule.py'}:has_e", workers=1)
    score_run_dir(rd.root, None, settings, shards="1")  # one shard scored here already: the array skips it
    shards, jobs = submit_scoring(rd.root, settings, cpus=2, time_min=5)
    assert shards == [0, 2] and len(jobs) == 2
    wait_for_jobs([jobs[0].job_id.split("_")[0]])
    for job in jobs:
        assert job.result()["shards_scored"] in ([0], [2])
    assert all(rd.shard_scores(s).is_file() for s in range(3))
    assert submit_scoring(rd.root, settings) == ([], [])  # nothing left to submit
    out = tmp_path / "scored.parquet"
    r = score_run_dir(rd.root, out, settings)
    assert (r.shards_scored, r.shards_reused, r.rows_out) == ([], [0, 1, 2], 8)
    from hpcrollout.merge import merge_run

    merge_run(rd.root, tmp_path / "merged.parquet")
    score_file(tmp_path / "merged.parquet", tmp_path / "direct.parquet", Settings(settings.verifier, workers=0))
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "direct.parquet"))
    # The CLI's --slurm --wait: resubmits everything with --rescore, waits, assembles.
    argv = [
        "score",
        str(rd.root),
        "--verifier",
        settings.verifier,
        "--slurm",
        "--rescore",
        "--wait",
        "--slurm_cpus",
        "1",
        "-o",
        str(tmp_path / "cli.parquet"),
    ]
    assert cli.main(argv) == 0
    assert pq.read_table(tmp_path / "cli.parquet").equals(pq.read_table(out))
    logs = list((rd.score_logs_dir).rglob("*_log.err"))
    assert logs and any("scored shard 00002" in p.read_text() for p in logs)
