"""The run directory: the only truth about a run. Layout, atomic writes, markers.

RUN_DIR/
  config.yaml                  resolved config (later stages read this, not the user's file)
  manifest.json                input fingerprint, config fingerprint, shard table
  shards/00000.parquet         shard inputs: the input rows + _hpcr_row, _hpcr_uid
  parts/00000/part-*.parquet   committed results of a running shard (atomic, one file per commit)
  outputs/00000.parquet        a finished shard's results, one row per prompt, sorted by row
  done/00000.json              completion marker, written last (counts, timings); the shard is done while
                               both it and its output exist
  quarantine/parts/00000/...   part files found unreadable or foreign, set aside (never deleted); their prompts
                               are generated again
  heartbeats/00000.json        progress of the shard's current attempt
  scores/00000.parquet         hpcrollout score: a finished shard's scores (uid, scores, score_details)
  logs/score/                  hpcrollout score --slurm: the scoring array's submitit logs
  logs/ray/00000/              slurm.nodes > 1: the task's Ray cluster (raycluster.py): cluster.json (nodes,
                               address, state, the node that failed) and one NODE.log per node
  jobs.json                    every submission: executor, job ids, task ids (executors/jobs.py)
  cache/vllm/                  vLLM's compile cache with engine.compile_cache: run
  claims/                      dynamic mode: who works on which shard
  claims/static/00000/ATTEMPT/ static mode, engines_per_task > 1: how one task attempt's engines share its shards
  tasks/00000.engine-01.json   engines_per_task > 1: engine 1 of task 0 (host, pid, GPUs, exit code)
  logs/engines/00000-01.log    that engine's log
  tasks/00000.json             SLURM task records (executors/slurm_task.py)
  tasks/local-00000.{lock,json} local executor: held while the task is queued or runs; its pid, host, exit code
  logs/slurm/JOB/              SLURM executor: submitit's pickles and stdout/stderr per task
  logs/local-task-0.log        local executor: the task's log
  lock                         held while a submit is in progress
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpcrollout.errors import HpcRolloutError, WriteError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; rename is still atomic there
        pass
    finally:
        os.close(fd)


# Why a write fails that the user, not the code, must fix; the error then names the path (WriteError).
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_error(path: Path, exc: OSError) -> WriteError | OSError:
    """A WriteError naming the path, the problem and the next step, for the failures in WRITE_FAILURES."""
    reason = WRITE_FAILURES.get(exc.errno or 0)
    if reason is None:
        return exc
    run = next((p for p in [path, *path.parents][:5] if (p / "manifest.json").is_file()), None)
    again = f"hpcrollout resume {run}" if run else "the command again"
    fix = (
        "free space there"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make it writable (or copy the run elsewhere)"
    )
    return WriteError(
        f"cannot write {path}: {reason} ({exc.strerror or exc}); {fix}, then run {again} (committed results are kept)"
    )


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path in dest's directory; on success fsync it and rename it over dest.

    A reader never sees a half-written file; a crash leaves at most a ``.tmp`` file, which is ignored. A write
    that fails for want of space or permission raises WriteError naming dest.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise write_error(dest, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        if isinstance(exc, WriteError) or exc.errno not in WRITE_FAILURES:
            raise
        raise write_error(dest, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def write_atomic(dest: str | Path, data: str | bytes) -> None:
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    write_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, next_step: str = "delete it to redo that step") -> Any:
    """A JSON file of the run directory; FileNotFoundError if absent, HpcRolloutError naming it if damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise HpcRolloutError(f"{path} is unreadable or not valid JSON ({exc}); {next_step}") from None


def read_record(path: str | Path) -> dict[str, Any]:
    """A JSON object of the run directory (a task, engine or cluster record), or {} if it is absent, unreadable
    or not an object: for records that a process writes as it goes and another reads whenever it likes."""
    try:
        record = read_json(path)
    except (FileNotFoundError, HpcRolloutError):
        return {}
    return record if isinstance(record, dict) else {}


def _manifest_problem(m: Any) -> str | None:
    """Why this is not a manifest prepare_run writes, or None."""
    if not isinstance(m, dict):
        return f"a {type(m).__name__}, not an object"
    for key in ("shards", "num_rows", "num_tasks"):
        if key not in m:
            return f"no {key!r}"
    if not isinstance(m["num_rows"], int) or not isinstance(m["num_tasks"], int) or m["num_tasks"] < 1:
        return "num_rows and num_tasks must be integers"
    shards = m["shards"]
    if not isinstance(shards, list) or not shards:
        return "'shards' must be a non-empty list"
    end = 0
    for i, s in enumerate(shards):
        rows = s.get("rows") if isinstance(s, dict) else None
        if not (
            isinstance(s, dict)
            and s.get("shard") == i
            and isinstance(rows, list)
            and len(rows) == 2
            and all(isinstance(r, int) for r in rows)
        ):
            return f"shard entry {i} is not {{'shard': {i}, 'rows': [start, end], ...}}"
        if rows[0] != end or rows[1] <= rows[0]:
            return f"shard {i} covers rows {rows[0]}-{rows[1]}, but the previous shard ended at row {end}"
        end = rows[1]
    if end != m["num_rows"]:
        return f"the shards cover {end} rows, but num_rows is {m['num_rows']}"
    return None


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

    def ray_dir(self, task: int) -> Path:
        """slurm.nodes > 1: the Ray cluster of an array task: cluster.json and one NODE.log per node."""
        return self.logs_dir / "ray" / shard_name(task)

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

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    def task_record(self, task: int) -> Path:
        """SLURM executor: the array task's record (job id, attempts, requeues, failures, last error, logs)."""
        return self.tasks_dir / f"{shard_name(task)}.json"

    @property
    def jobs_path(self) -> Path:
        """Every submission of the run (executor, job ids, task ids in array order): the jobs registry."""
        return self.root / "jobs.json"

    @property
    def submitit_folder(self) -> Path:
        """Where submitit keeps each array task's pickles and logs: logs/slurm/<array>_<index>/ (%j: the job id)."""
        return self.logs_dir.resolve() / "slurm" / "%j"

    def local_task_log(self, task: int) -> Path:
        """Local executor: the task's stdout and stderr."""
        return self.logs_dir / f"local-task-{task}.log"

    @property
    def vllm_cache_dir(self) -> Path:
        """vLLM's compile cache with engine.compile_cache: run."""
        return self.root / "cache" / "vllm"

    def local_task_lock(self, task: int) -> Path:
        """Local executor: flock-ed for as long as the task is queued in its submit or its worker runs."""
        return self.tasks_dir / f"local-{shard_name(task)}.lock"

    def local_task_record(self, task: int) -> Path:
        """Local executor: the task's worker (pid, host, start time) and, once it ended, its exit code."""
        return self.tasks_dir / f"local-{shard_name(task)}.json"

    def engine_record(self, task: int, engine: int) -> Path:
        """executor.engines_per_task > 1: one engine of a task (host, pid, GPUs, CPUs; its exit code once ended)."""
        return self.tasks_dir / f"{shard_name(task)}.engine-{engine:02d}.json"

    def engine_records(self) -> list[Path]:
        """Every engine record of the run, in task and engine order."""
        return sorted(self.tasks_dir.glob("[0-9]*.engine-*.json")) if self.tasks_dir.is_dir() else []

    def engine_log(self, task: int, engine: int) -> Path:
        """One engine's stdout and stderr (the task's own log says when each engine started and ended)."""
        return self.logs_dir / "engines" / f"{shard_name(task)}-{engine:02d}.log"

    def task_engine_claims(self, task: int, attempt: str) -> Path:
        """Static mode, several engines per task: the claims through which one attempt's engines share the task's
        shards (a new attempt starts a new board: nothing of an ended attempt is waited for)."""
        return self.claims_dir / "static" / shard_name(task) / attempt

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def quarantine(self, path: Path, why: str) -> Path:
        """Move a damaged run file aside under quarantine/ (same relative path), with a note saying why."""
        dest = self.quarantine_dir / path.relative_to(self.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest = dest.with_name(f"{dest.name}.{time.time_ns()}")
        os.replace(path, dest)
        dest.with_name(dest.name + ".why").write_text(why + "\n")
        return dest

    def quarantined(self) -> list[Path]:
        """Files set aside so far."""
        q = self.quarantine_dir
        return sorted(p for p in q.rglob("*") if p.is_file() and p.suffix != ".why") if q.is_dir() else []

    def shard_scores(self, shard: int) -> Path:
        """hpcrollout score's output for one finished shard, written atomically (its existence = scored)."""
        return self.root / "scores" / f"{shard_name(shard)}.parquet"

    @property
    def score_logs_dir(self) -> Path:
        return self.logs_dir / "score"

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
        """manifest.json, checked for the shape every stage relies on; damaged, it names the way out."""
        self.require()
        path = self.manifest_path
        restore = (
            "restore it from a backup, or start a new run_dir (do not delete it: sharding again would put new "
            "shards beside this run's results)"
        )
        manifest = read_json(path, restore)
        problem = _manifest_problem(manifest)
        if problem:
            raise HpcRolloutError(f"{path} is not a run manifest ({problem}); {restore}")
        return manifest

    def results_present(self) -> list[Path]:
        """The folders holding results of shards (outputs, markers, parts, claims) that are not empty."""
        names = ("outputs", "done", "parts", "claims")
        return [self.root / n for n in names if (self.root / n).is_dir() and any((self.root / n).iterdir())]

    def num_shards(self) -> int:
        return len(self.manifest()["shards"])

    def is_done(self, shard: int) -> bool:
        """Done = its marker and its output exist. The one rule status, resume, the worker and merge share:
        a shard whose output was deleted is redone, whatever its marker says."""
        return self.done_marker(shard).is_file() and self.shard_output(shard).is_file()

    def _stems(self, folder: str, suffix: str) -> set[int]:
        d = self.root / folder
        if not d.is_dir():
            return set()
        return {int(p.stem) for p in d.glob(f"*{suffix}") if p.stem.isdigit()}

    def marked_shards(self) -> set[int]:
        """Shards with a done marker (whether or not their output still exists)."""
        return self._stems("done", ".json")

    def done_shards(self) -> set[int]:
        return self.marked_shards() & self._stems("outputs", ".parquet")

    def lost_outputs(self) -> list[int]:
        """Shards marked done whose output is gone (deleted by hand): resume redoes them."""
        return sorted(self.marked_shards() - self._stems("outputs", ".parquet"))

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
        path = self.root / "lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise write_error(path, exc) from None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise HpcRolloutError(
                    f"{self.root} is locked by {holder}: another {what} is in progress on this run directory"
                ) from None
            with contextlib.suppress(OSError):  # who holds it is only for the message; a full disk may refuse it
                f.seek(0)
                f.truncate()
                f.write(f"{what} pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    f.seek(0)
                    f.truncate()
                if not self.exists():  # unlinked while still held: a racing submit fails on it or makes a new one
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                    for d in made:
                        try:
                            d.rmdir()  # only if empty: whatever else is there stays
                        except OSError:
                            break
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
