"""Run shards: generate, commit finished results in atomic part files, finish with one output and a marker.

Exactly-once, whatever kills the process:
- a part file appears whole or not at all (temp file, fsync, rename), and holds only finished prompts;
- on restart the rows found in committed parts are skipped, so at most the uncommitted work is redone;
- if parts overlap (a flush from a signal handler racing a commit, or a stale task and its replacement on the
  same shard) the shard's output keeps the first committed copy of each row: one row per prompt, always;
- the shard output is linked into place create-if-absent, so of two tasks finishing the same shard exactly
  one output wins, and the completion marker is written after it, last.

Usage (what executors run): python -m hpcrollout.worker RUN_DIR --task N
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout.config import RunConfig
from hpcrollout.engines import Engine, PromptRequest, PromptResult, create_engine, prompt_seed
from hpcrollout.errors import HpcRolloutError
from hpcrollout.prompts import BadPrompt, normalize_prompt
from hpcrollout.rundir import RunDir, atomic_path, fsync_dir, write_json_atomic
from hpcrollout.schema import PART_ROW, ROW, UID, result_schema, results_to_table

log = logging.getLogger("hpcrollout")

_current: ShardRun | None = None  # the shard being generated in this process, for flush_now()


def flush_now() -> None:
    """Commit the finished, not yet committed results of the running shard. Safe from a signal handler."""
    if _current is not None:
        _current.commit(force=True)


_crash_counts: dict[str, int] = {}


def _maybe_crash(point: str) -> None:
    """Fault injection for the crash tests: HPCROLLOUT_CRASH_AT=point[:k] kills the process the k-th time there."""
    want, _, nth = os.environ.get("HPCROLLOUT_CRASH_AT", "").partition(":")
    if want != point:
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] == int(nth or 1):
        log.warning("HPCROLLOUT_CRASH_AT=%s: killing the process", os.environ["HPCROLLOUT_CRASH_AT"])
        os._exit(137)


def read_rows(paths: list[Path]) -> list[int]:
    rows: list[int] = []
    for p in paths:
        rows += pq.read_table(p, columns=[PART_ROW]).column(0).to_pylist()
    return rows


def committed_parts(rundir: RunDir, shard: int) -> list[Path]:
    d = rundir.parts_dir(shard)
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


class ShardRun:
    """One attempt at one shard."""

    def __init__(self, rundir: RunDir, shard: int, config: RunConfig, engine: Engine) -> None:
        self.rundir, self.shard, self.config, self.engine = rundir, shard, config, engine
        self.schema = result_schema(logprobs=config.sampling.logprobs, token_ids=config.sampling.return_token_ids)
        self.pending: list[PromptResult] = []
        self.inflight: list[PromptResult] = []
        self.attempt = uuid.uuid4().hex[:8]
        self.seq = 0
        self.last_commit = time.monotonic()
        self.last_heartbeat = 0.0
        self.started = time.time()
        self.done_before = 0
        self.done_now = 0
        self.samples_now = 0
        self.tokens_now = 0
        self.errors_now = 0
        self.total = 0

    # committing
    def commit(self, force: bool = False) -> None:
        """Write the pending results as one part file (atomic)."""
        if not force:
            due = len(self.pending) >= self.config.checkpoint.every_prompts or (
                time.monotonic() - self.last_commit >= self.config.checkpoint.every_seconds
            )
            if not due:
                return
        # A signal handler may call this while a commit is being written: it writes that batch again too, and
        # the duplicate rows are dropped when the shard is finished (first copy wins).
        batch = self.inflight + self.pending
        self.inflight, self.pending = batch, []
        if batch:
            self.seq += 1
            name = f"part-{time.time_ns():020d}-{self.attempt}-{self.seq:05d}.parquet"
            with atomic_path(self.rundir.parts_dir(self.shard) / name) as tmp:
                pq.write_table(results_to_table(batch, self.schema), tmp, compression="zstd")
            _maybe_crash("after_part")
        self.inflight = []
        self.last_commit = time.monotonic()
        self.heartbeat(force=True)

    def heartbeat(self, force: bool = False, state: str = "running") -> None:
        now = time.monotonic()
        if not force and now - self.last_heartbeat < self.config.checkpoint.heartbeat_seconds:
            return
        self.last_heartbeat = now
        elapsed = max(time.time() - self.started, 1e-9)
        tps = self.tokens_now / elapsed
        done = self.done_before + self.done_now
        remaining = self.total - done
        eta = remaining / (self.done_now / elapsed) if self.done_now else None
        self.rundir.write_heartbeat(
            self.shard,
            state=state,
            attempt=self.attempt,
            started=self.started,
            prompts_total=self.total,
            prompts_done=done,
            prompts_done_this_attempt=self.done_now,
            samples_done_this_attempt=self.samples_now,
            output_tokens_this_attempt=self.tokens_now,
            tokens_per_s=round(tps, 1),
            eta_s=None if eta is None else round(eta, 1),
        )
        if state == "running":
            log.info(
                "shard %05d: %d/%d prompts, %.0f output tok/s%s",
                self.shard,
                done,
                self.total,
                tps,
                "" if eta is None else f", eta {eta / 60:.1f} min",
            )

    # generating
    def requests(self, skip: set[int]) -> Iterator[PromptRequest]:
        """The shard's prompts not yet committed; malformed ones go straight to pending as error records."""
        data = self.config.data
        pf = pq.ParquetFile(self.rundir.shard_input(self.shard))
        seed = self.config.sampling.seed
        for batch in pf.iter_batches(batch_size=1024, columns=[data.prompt_column, ROW, UID]):
            cells, rows, uids = (batch.column(i).to_pylist() for i in range(3))
            for cell, row, uid in zip(cells, rows, uids):
                if row in skip:
                    continue
                request = PromptRequest(uid=uid, row=row, messages=None, text=None, seed=prompt_seed(seed, uid))
                try:
                    messages, text = normalize_prompt(cell, data.max_prompt_chars)
                except BadPrompt as exc:
                    self.add(PromptResult.failed(request, f"bad prompt: {exc}"))
                    continue
                yield PromptRequest(uid=uid, row=row, messages=messages, text=text, seed=request.seed)

    def add(self, result: PromptResult) -> None:
        self.pending.append(result)
        self.done_now += 1
        self.samples_now += len(result.samples)
        self.tokens_now += sum(s.num_tokens for s in result.samples)
        self.errors_now += result.error is not None

    def run(self, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        global _current
        meta = pq.ParquetFile(self.rundir.shard_input(self.shard)).metadata
        self.total = meta.num_rows
        skip = set(read_rows(committed_parts(self.rundir, self.shard)))
        self.done_before = len(skip)
        log.info("shard %05d: %d prompts, %d already committed", self.shard, self.total, len(skip))
        _current = self
        stopped = False
        try:
            self.heartbeat(force=True)
            results = self.engine.generate(self.requests(skip))
            try:
                for result in results:
                    self.add(result)
                    self.commit()
                    self.heartbeat()
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
            finally:
                close = getattr(results, "close", None)
                if close:
                    close()
            self.commit(force=True)
        finally:
            _current = None
        if stopped:
            self.heartbeat(force=True, state="stopped")
            return {"shard": self.shard, "state": "stopped"}
        return finish_shard(self.rundir, self.shard, self.schema, self.summary())

    def summary(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "started": self.started,
            "elapsed_s": round(time.time() - self.started, 3),
            "prompts_this_attempt": self.done_now,
            "output_tokens_this_attempt": self.tokens_now,
            "engine": self.engine.describe(),
        }


def finish_shard(rundir: RunDir, shard: int, schema: pa.Schema, attempt: dict[str, Any]) -> dict[str, Any]:
    """Compact the parts into the shard output (first copy of each row wins), then write the done marker."""
    output = rundir.shard_output(shard)
    expected = pq.read_table(rundir.shard_input(shard), columns=[ROW, UID])
    if not output.exists():
        parts = committed_parts(rundir, shard)
        table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else schema.empty_table()
        table = _first_copy_per_row(table).sort_by(PART_ROW)
        rows = table.column(PART_ROW)
        if not rows.equals(expected.column(ROW)):
            missing = len(set(expected.column(ROW).to_pylist()) - set(rows.to_pylist()))
            raise RuntimeError(
                f"shard {shard:05d}: parts cover {len(rows)} of {expected.num_rows} rows ({missing} missing)"
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        staged = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.staged")
        with atomic_path(staged) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=1024)
        try:
            os.link(staged, output)  # create-if-absent: of two finishers, exactly one output wins
            fsync_dir(output.parent)
        except FileExistsError:
            log.warning("shard %05d was finished by another task meanwhile; keeping its output", shard)
        finally:
            staged.unlink(missing_ok=True)
    _maybe_crash("after_output")
    table = pq.read_table(output, columns=[PART_ROW, "uid", "response_tokens", "error"])
    if not table.column(PART_ROW).equals(expected.column(ROW)):
        raise RuntimeError(f"shard {shard:05d}: {output} does not match its shard input row for row")
    ntok = pc.list_value_length(table.column("response_tokens"))
    marker = {
        "shard": shard,
        "prompts": table.num_rows,
        "samples": int(pc.sum(ntok).as_py() or 0),
        "errors": table.num_rows - table.column("error").null_count,
        "output_tokens": int(pc.sum(pc.list_flatten(table.column("response_tokens"))).as_py() or 0),
        "finished": time.time(),
        "host": socket.gethostname(),
        **attempt,
    }
    if not rundir.is_done(shard):
        write_json_atomic(rundir.done_marker(shard), marker)
    rundir.write_heartbeat(shard, state="done", prompts_total=marker["prompts"], prompts_done=marker["prompts"])
    parts_dir = rundir.parts_dir(shard)
    for p in committed_parts(rundir, shard):
        p.unlink(missing_ok=True)
    if parts_dir.is_dir() and not any(parts_dir.iterdir()):
        parts_dir.rmdir()
    log.info(
        "shard %05d done: %d prompts, %d samples, %d errors",
        shard,
        marker["prompts"],
        marker["samples"],
        marker["errors"],
    )
    return {**marker, "state": "done"}


def _first_copy_per_row(table: pa.Table) -> pa.Table:
    rows = table.column(PART_ROW).to_numpy()
    if len(rows) == 0:
        return table
    import numpy as np

    _, first = np.unique(rows, return_index=True)
    if len(first) == len(rows):
        return table
    log.warning("dropping %d duplicate row(s) committed twice", len(rows) - len(first))
    return table.take(pa.array(np.sort(first)))


def run_shard(
    rundir: RunDir,
    shard: int,
    engine: Engine,
    config: RunConfig | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run one shard to completion (or until should_stop() says so); a done shard returns at once."""
    if rundir.is_done(shard):
        return {"shard": shard, "state": "done", "skipped": True}
    config = config or rundir.load_config()
    if rundir.shard_output(shard).exists():  # died between output and marker: only the marker is missing
        schema = result_schema(logprobs=config.sampling.logprobs, token_ids=config.sampling.return_token_ids)
        return finish_shard(rundir, shard, schema, {"engine": engine.describe(), "recovered": True})
    return ShardRun(rundir, shard, config, engine).run(should_stop)


def task_shards(rundir: RunDir, task_id: int, num_tasks: int | None = None) -> list[int]:
    """Static assignment: task i runs shards i, i + T, i + 2T, ... that are not done yet."""
    manifest = rundir.manifest()
    num_tasks = num_tasks or manifest["num_tasks"]
    if not 0 <= task_id < num_tasks:
        raise HpcRolloutError(f"task {task_id} is out of range: the run has {num_tasks} tasks")
    done = rundir.done_shards()
    return [s["shard"] for s in manifest["shards"] if s["shard"] % num_tasks == task_id and s["shard"] not in done]


def run_task(
    run_dir: str | Path,
    task_id: int,
    *,
    shards: list[int] | None = None,
    num_tasks: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """What one array task does: create the engine once, then run its shards."""
    rundir = RunDir(run_dir)
    config = rundir.load_config()
    if config.sharding.mode == "dynamic" and shards is None:
        return run_dynamic(rundir, config, task_id, should_stop)
    todo = (
        [s for s in shards if not rundir.is_done(s)] if shards is not None else task_shards(rundir, task_id, num_tasks)
    )
    summary: dict[str, Any] = {"task": task_id, "shards": todo, "results": []}
    if not todo:
        log.info("task %d: nothing to do", task_id)
        return summary
    log.info("task %d: shards %s on %s", task_id, todo, socket.gethostname())
    with create_engine(config) as engine:
        log.info("task %d: engine ready: %s", task_id, engine.describe())
        for shard in todo:
            result = run_shard(rundir, shard, engine, config, should_stop)
            summary["results"].append(result)
            if result.get("state") == "stopped":
                break
    return summary


def run_dynamic(
    rundir: RunDir, config: RunConfig, task_id: int, should_stop: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Dynamic mode: claim shards (longest expected work first) until none is left, renewing the lease meanwhile.

    The engine starts only once a shard is claimed, so a task that finds nothing to do frees its GPUs at once.
    """
    from hpcrollout.claims import ClaimBoard

    board = ClaimBoard(rundir, lease_s=config.sharding.lease_seconds)
    summary: dict[str, Any] = {"task": task_id, "shards": [], "results": [], "owner": board.owner}
    engine: Engine | None = None
    try:
        while (claim := board.wait_for_claim()) is not None:
            summary["shards"].append(claim.shard)
            try:
                if engine is None:
                    engine = create_engine(config)
                    log.info("task %d: engine ready: %s", task_id, engine.describe())
                with board.keeper(claim):
                    stop = lambda: claim.lost or bool(should_stop and should_stop())  # noqa: E731
                    result = run_shard(rundir, claim.shard, engine, config, stop)
            finally:
                board.release(claim)
            if claim.lost:
                log.warning("task %d: lost the claim on shard %05d to another task; moving on", task_id, claim.shard)
            summary["results"].append(result)
            if result.get("state") == "stopped" and not claim.lost:
                break
    finally:
        if engine is not None:
            engine.close()
    if not summary["shards"]:
        log.info("task %d: no shard left to claim", task_id)
    return summary


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--task", type=int, default=None, help="array task index (default: SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument("--shard", type=int, action="append", default=None, help="run these shards instead")


def main(args: argparse.Namespace) -> int:
    task = args.task
    if task is None:
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    summary = run_task(args.run_dir, task, shards=args.shard)
    done = [r["shard"] for r in summary["results"] if r.get("state") == "done"]
    print(f"task {task}: {len(done)} shard(s) done: {done}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
