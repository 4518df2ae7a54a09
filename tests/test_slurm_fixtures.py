"""The SLURM test helpers themselves, against stand-in squeue/sacct scripts: waits end on the state asserted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
