"""The run directory: the only truth about a run. Layout, atomic writes, markers.

RUN_DIR/
  config.yaml                  resolved config (later stages read this, not the user's file)
  manifest.json                input fingerprint, config fingerprint, shard table
  shards/00000.parquet         shard inputs: the input rows + _hpcr_row, _hpcr_uid
  parts/00000/part-*.parquet   committed results of a running shard (atomic, one file per commit)
  outputs/00000.parquet        a finished shard's results, one row per prompt, sorted by row
  done/00000.json              completion marker, written last (counts, timings)
  heartbeats/00000.json        progress of the shard's current attempt
  claims/                      dynamic mode: who works on which shard
  logs/                        executor logs (submitit's stdout/stderr per task)
  lock                         held while a submit is in progress
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpcrollout.errors import HpcRolloutError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; rename is still atomic there
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path in dest's directory; on success fsync it and rename it over dest.

    A reader never sees a half-written file; a crash leaves at most a ``.tmp`` file, which is ignored.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_atomic(dest: str | Path, data: str | bytes) -> None:
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    write_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise HpcRolloutError(f"{path} is unreadable or not valid JSON ({exc}); delete it to redo that step") from None


def static_task(shard: int, num_tasks: int) -> int:
    """Static mode's one assignment rule: task i runs shards i, i + T, i + 2T, ..."""
    return shard % num_tasks


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


class RunDir:
    """Paths and small state files of one run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    def shard_input(self, shard: int) -> Path:
        return self.root / "shards" / f"{shard_name(shard)}.parquet"

    def parts_dir(self, shard: int) -> Path:
        return self.root / "parts" / shard_name(shard)

    def shard_output(self, shard: int) -> Path:
        return self.root / "outputs" / f"{shard_name(shard)}.parquet"

    def done_marker(self, shard: int) -> Path:
        return self.root / "done" / f"{shard_name(shard)}.json"

    def heartbeat(self, shard: int) -> Path:
        return self.root / "heartbeats" / f"{shard_name(shard)}.json"

    # state
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def require(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise HpcRolloutError(
                f"{self.root} is a file, not a run directory; give the run directory (run_dir of the config)"
            )
        if not self.root.is_dir():
            raise HpcRolloutError(f"run directory {self.root} does not exist")
        if not self.exists():
            raise HpcRolloutError(
                f"{self.root} is not a prepared run directory (no manifest.json); "
                "start it with: hpcrollout submit --config FILE"
            )

    def manifest(self) -> dict[str, Any]:
        self.require()
        return read_json(self.manifest_path)

    def num_shards(self) -> int:
        return len(self.manifest()["shards"])

    def is_done(self, shard: int) -> bool:
        return self.done_marker(shard).is_file()

    def done_shards(self) -> set[int]:
        done = self.root / "done"
        if not done.is_dir():
            return set()
        return {int(p.stem) for p in done.glob("*.json") if p.stem.isdigit()}

    def has_committed_samples(self) -> bool:
        """Whether any sample is on disk: a done marker, a shard output or a committed part of a running shard."""
        if self.done_shards():
            return True
        outputs, parts = self.shard_output(0).parent, self.parts_dir(0).parent
        return any(outputs.glob("*.parquet")) or any(parts.glob("*/part-*.parquet"))

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.num_shards()) if s not in done]

    def load_config(self):  # -> RunConfig
        from hpcrollout.config import build_config, read_yaml

        return build_config(read_yaml(self.config_path), str(self.config_path))

    def write_heartbeat(self, shard: int, **fields: Any) -> None:
        fields.update(shard=shard, host=socket.gethostname(), pid=os.getpid(), time=time.time())
        for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
            if var in os.environ:
                fields[var.lower()] = os.environ[var]
        write_json_atomic(self.heartbeat(shard), fields)

    @contextlib.contextmanager
    def lock(self, what: str = "submit") -> Iterator[None]:
        """An exclusive, non-blocking lock on the run directory: a second submit gets a clear error.

        A run directory that is still not prepared when the lock is released (the submit failed: bad input, a
        missing model) is left as it was found: the lock file and the directories made for it are removed.
        """
        made = [d for d in (self.root, *self.root.parents) if not d.exists()]  # deepest first
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise HpcRolloutError(
                    f"{self.root} is locked by {holder}: another {what} is in progress on this run directory"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"{what} pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                if not self.exists():  # unlinked while still held: a racing submit fails on it or makes a new one
                    path.unlink(missing_ok=True)
                    for d in made:
                        try:
                            d.rmdir()  # only if empty: whatever else is there stays
                        except OSError:
                            break
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
