"""The SLURM test helpers, and the executor's reading of squeue, against stand-in squeue/sacct scripts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.slurm_fixtures import wait_for_jobs

SQUEUE = "#!/bin/sh\nexit 0\n"  # the job has left the queue
# slurmdbd lags: the first two reads still show the requeued attempt running, then the final state
SACCT = """#!/bin/sh
n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "{count}"
echo "7|REQUEUED"
if [ "$n" -le 2 ]; then echo "7|RUNNING"; else echo "7|COMPLETED"; fi
"""


def _tool(bin_dir: Path, name: str, text: str) -> None:
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_wait_for_jobs_waits_for_accounting_not_only_the_queue(tmp_path, monkeypatch):
    """The CI failure of issue 10: the job left squeue, and sacct was read once while it still said RUNNING."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "squeue", SQUEUE)
    _tool(bin_dir, "sacct", SACCT.format(count=tmp_path / "count"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert wait_for_jobs(["7"], timeout=60) == {"7": ["REQUEUED", "COMPLETED"]}
    assert int((tmp_path / "count").read_text()) == 3  # it read accounting until the final state showed


def test_a_failing_squeue_is_retried_and_never_read_as_an_empty_queue(tmp_path, monkeypatch):
    """squeue timing out on a busy slurmctld must not let submit or resume launch running tasks a second time."""
    from hpcrollout.errors import HpcRolloutError
    from hpcrollout.executors.jobs import record_submission
    from hpcrollout.executors.slurm import active_tasks
    from hpcrollout.rundir import RunDir

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    count = tmp_path / "count"
    # fails twice (slurmctld busy), then shows task 1 running
    _tool(
        bin_dir,
        "squeue",
        f'#!/bin/sh\nn=$(cat "{count}" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "{count}"\n'
        'if [ "$n" -le 2 ]; then echo "slurm_load_jobs error: Socket timed out" >&2; exit 1; fi\n'
        'echo "7_1 RUNNING None 0"\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rundir = RunDir(tmp_path / "run")
    rundir.root.mkdir()
    record_submission(rundir, {"executor": "slurm", "command": "submit", "tasks": [0, 1], "job_id": "7"})
    assert active_tasks(rundir, retries_s=(0.01, 0.01, 0.01)) == {1: "7_1"}
    assert int(count.read_text()) == 3

    _tool(bin_dir, "squeue", "#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    with pytest.raises(
        HpcRolloutError, match=r"squeue failed 3 times for the jobs of .*run \(7\).*nothing was submitted"
    ):
        active_tasks(rundir, retries_s=(0.01, 0.01))
    # a run whose jobs SLURM has purged ("Invalid job id") has none active
    _tool(bin_dir, "squeue", "#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    assert active_tasks(rundir, retries_s=()) == {}
