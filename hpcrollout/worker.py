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
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout.claims import expected_work
from hpcrollout.config import RunConfig, exact_budgets
from hpcrollout.engines import NOTHING_NOW, Engine, PromptRequest, PromptResult, create_engine, prompt_seed
from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.engine_group import engine_identity
from hpcrollout.images import BadImage, image_base, prompt_images
from hpcrollout.prompts import BadPrompt, normalize_prompt
from hpcrollout.rundir import RunDir, atomic_path, fsync_dir, static_task, write_json_atomic
from hpcrollout.schema import PART_ROW, ROW, UID, results_to_table, run_result_schema
from hpcrollout.structured import constraint_of_cell

log = logging.getLogger("hpcrollout")

_active: dict[int, ShardRun] = {}  # shards being generated in this process, for flush_now()
_IDENTITY = engine_identity()  # this process's engine index and GPUs, named in its heartbeats


def flush_now() -> None:
    """Commit the finished, not yet committed results of the running shards. Safe from a signal handler."""
    for run in list(_active.values()):
        run.commit(force=True)


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


def _maybe_pause(point: str) -> None:
    """Fault injection for the engine tests: HPCROLLOUT_PAUSE_AT=point stops the process (SIGSTOP) the first time
    there, so a test can kill it, or let it go on, at a known place."""
    if os.environ.get("HPCROLLOUT_PAUSE_AT") == point and not _crash_counts.get(f"pause:{point}"):
        _crash_counts[f"pause:{point}"] = 1
        import signal

        log.warning("HPCROLLOUT_PAUSE_AT=%s: stopping the process", point)
        os.kill(os.getpid(), signal.SIGSTOP)


def read_rows(paths: list[Path]) -> list[int]:
    rows: list[int] = []
    for p in paths:
        rows += pq.read_table(p, columns=[PART_ROW]).column(0).to_pylist()
    return rows


def committed_parts(rundir: RunDir, shard: int) -> list[Path]:
    d = rundir.parts_dir(shard)
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


def shard_prompts(rundir: RunDir, shard: int) -> pa.Table:
    """The shard's (row, uid) pairs, from its shard input; a clear error if that file is gone.

    An unreadable one raises as it is: on a shared filesystem that may pass, and SLURM retries the task.
    """
    path = rundir.shard_input(shard)
    try:
        return pq.read_table(path, columns=[ROW, UID])
    except FileNotFoundError:
        raise HpcRolloutError(
            f"shard {shard:05d}: its input {path} is missing; restore it from a backup, or start a new run_dir"
        ) from None


def _check_part(path: Path, schema: pa.Schema, uid_of_row: dict[int, str], full: bool) -> tuple[str | None, pa.Table]:
    """(why a committed part cannot be used for this shard, or None; what was read of it)."""
    try:
        table = pq.read_table(path) if full else pq.read_table(path, columns=[PART_ROW, "uid"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        return f"unreadable ({exc})", schema.empty_table()
    if full and not table.schema.equals(schema, check_metadata=False):
        return "its columns are not this run's result columns", table
    for row, uid in zip(table.column(PART_ROW).to_pylist(), table.column("uid").to_pylist()):
        if uid_of_row.get(row) != uid:
            return f"it holds row {row} (uid {uid!r}), which is not one of this shard's prompts", table
    return None, table


def usable_parts(
    rundir: RunDir, shard: int, schema: pa.Schema, expected: pa.Table, full: bool = False
) -> list[pa.Table]:
    """What the shard's committed parts hold of its own prompts (row and uid, or everything with full).

    A part that is unreadable (truncated, empty) or foreign (another shard's or run's rows, other columns) is
    quarantined: moved aside, named in the log, and its prompts are generated again, instead of failing every
    attempt.
    """
    uid_of_row = dict(zip(expected.column(ROW).to_pylist(), expected.column(UID).to_pylist()))
    good = []
    for part in committed_parts(rundir, shard):
        problem, table = _check_part(part, schema, uid_of_row, full)
        if problem is None:
            good.append(table)
            continue
        try:
            dest = rundir.quarantine(part, f"shard {shard:05d}: part {part.name}: {problem}")
        except FileNotFoundError:  # another task on the shard moved it first
            continue
        log.warning("shard %05d: part %s is %s; moved it to %s, its prompts are generated again", shard, part, problem, dest)
    return good


class EngineMeter:
    """Live throughput of one engine, shared by every shard it has in flight.

    Generated tokens per second come from the engine's own counter (Engine.tokens_generated: samples still
    decoding count), else from finished prompts; both over the last WINDOW_S seconds. The figure belongs to the
    engine, not to a shard attempt, so a shard opened a second ago shows the engine's rate, not 0, and a long
    prompt's tokens count while it is generated, not only when it finishes.
    """

    WINDOW_S = 60.0
    MIN_SAMPLE_S = 0.5  # reading vLLM's counters costs a registry walk: not more often than this

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine, self.clock = engine, clock
        self.id = uuid.uuid4().hex[:8]
        self.finished_tokens = 0
        self.prompts = 0
        self.open_shards = 0
        self._base = engine.tokens_generated()
        self._live: int | None = 0 if self._base is not None else None
        self._read_at = clock()
        self.history: deque[tuple[float, int, int]] = deque([(self._read_at, 0, 0)])

    def add(self, result: PromptResult) -> None:
        self.finished_tokens += sum(s.num_tokens for s in result.samples)
        self.prompts += 1

    def sample(self) -> dict[str, Any]:
        """engine_id, engine_tokens (generated since the meter started, in-flight samples included where the
        engine counts them), inflight_tokens, tokens_per_s and prompts_per_s, now."""
        now = self.clock()
        if self._base is not None and now - self._read_at >= self.MIN_SAMPLE_S:
            live = self.engine.tokens_generated()
            self._live, self._read_at = (None if live is None else live - self._base), now
        tokens = self.finished_tokens if self._live is None else max(self._live, self.finished_tokens)
        if now - self.history[-1][0] >= self.MIN_SAMPLE_S:
            self.history.append((now, tokens, self.prompts))
        while len(self.history) > 2 and now - self.history[1][0] >= self.WINDOW_S:
            self.history.popleft()  # the oldest kept is the newest at least WINDOW_S old
        t0, k0, p0 = self.history[0]
        dt = now - t0
        return {
            "engine_id": self.id,
            "engine_tokens": tokens,
            "inflight_tokens": tokens - self.finished_tokens,
            "tokens_per_s": round((tokens - k0) / dt, 1) if dt > 0 else 0.0,
            "prompts_per_s": round((self.prompts - p0) / dt, 4) if dt > 0 else 0.0,
        }


class ShardRun:
    """One attempt at one shard."""

    def __init__(
        self, rundir: RunDir, shard: int, config: RunConfig, engine: Engine, meter: EngineMeter | None = None
    ) -> None:
        self.rundir, self.shard, self.config, self.engine = rundir, shard, config, engine
        self.meter = meter or EngineMeter(engine)
        self.budgets: dict[int, int] | None = None  # row -> n * max_tokens of each uncommitted row (exact budgets)
        self.budget_left = 0
        self.schema = run_result_schema(config)
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
            _maybe_pause("after_part")
        self.inflight = []
        self.last_commit = time.monotonic()
        self.heartbeat(force=True)

    def heartbeat(self, force: bool = False, state: str = "running") -> None:
        now = time.monotonic()
        if not force and now - self.last_heartbeat < self.config.checkpoint.heartbeat_seconds:
            return
        self.last_heartbeat = now
        live = self.meter.sample()
        done = self.done_before + self.done_now
        remaining = self.total - done
        eta, basis = None, None
        if self.budgets is not None and live["tokens_per_s"] > 0:
            # tokens still to generate: the uncommitted rows' budgets, less what is decoding now (when this is the
            # engine's only shard, those in-flight tokens are this shard's)
            left = self.budget_left - (live["inflight_tokens"] if self.meter.open_shards <= 1 else 0)
            eta, basis = max(0, left) / live["tokens_per_s"], "tokens"
        elif live["prompts_per_s"] > 0:
            eta, basis = remaining / live["prompts_per_s"], "prompts"
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
            tokens_per_s=live["tokens_per_s"],  # generated by this shard's engine (all its shards in flight)
            prompts_per_s=live["prompts_per_s"],
            engine_id=live["engine_id"],
            engine_tokens=live["engine_tokens"],
            token_budget_left=self.budget_left if self.budgets is not None else None,
            eta_s=None if eta is None else round(eta, 1),
            eta_basis=basis,
            engine_index=_IDENTITY["engine_index"],
            gpus=_IDENTITY["gpus"],
        )
        if state == "running":
            log.info(
                "shard %05d: %d/%d prompts, %.0f generated tok/s%s",
                self.shard,
                done,
                self.total,
                live["tokens_per_s"],
                "" if eta is None else f", eta {eta / 60:.1f} min ({basis} left)",
            )

    # generating
    def requests(self, skip: set[int]) -> Iterator[PromptRequest]:
        """The shard's prompts not yet committed; malformed ones go straight to pending as error records."""
        data = self.config.data
        pf = pq.ParquetFile(self.rundir.shard_input(self.shard))
        seed = self.config.sampling.seed
        columns = [data.prompt_column, ROW, UID] + ([data.max_tokens_column] if data.max_tokens_column else [])
        schemas_column, lora_column, image_column = data.structured_outputs_column, data.lora_column, data.image_column
        extra = list(dict.fromkeys(c for c in (schemas_column, lora_column, image_column) if c))
        base = image_base(self.config)
        for batch in pf.iter_batches(batch_size=64 if image_column else 1024, columns=columns + extra):
            cells, rows, uids = (batch.column(i).to_pylist() for i in range(3))
            budgets = batch.column(3).to_pylist() if data.max_tokens_column else [None] * len(rows)
            schemas = batch.column(schemas_column).to_pylist() if schemas_column else [None] * len(rows)
            adapters = batch.column(lora_column).to_pylist() if lora_column else [None] * len(rows)
            pictures = batch.column(image_column).to_pylist() if image_column else [None] * len(rows)
            for cell, row, uid, budget, schema, adapter, picture in zip(
                cells, rows, uids, budgets, schemas, adapters, pictures
            ):
                if row in skip:
                    continue
                lora = adapter or self.config.model.lora  # a null cell: the run's adapter (or the base model)
                request = PromptRequest(
                    uid=uid, row=row, messages=None, text=None, seed=prompt_seed(seed, uid), lora=lora
                )
                try:
                    messages, text = normalize_prompt(cell, data.max_prompt_chars, images=True)
                except BadPrompt as exc:
                    self.add(PromptResult.failed(request, f"bad prompt: {exc}"))
                    continue
                try:
                    messages, images = prompt_images(messages, picture, image_column, base)
                except BadImage as exc:
                    self.add(PromptResult.failed(request, f"bad image: row {row}, {exc}"))
                    continue
                if budget is not None and (not isinstance(budget, int) or budget < 1):
                    self.add(PromptResult.failed(request, f"{data.max_tokens_column} must be a positive integer, got {budget!r}"))
                    continue
                try:
                    constraint = constraint_of_cell(schema)  # None: the run's sampling.structured_outputs
                except ValueError as exc:
                    self.add(PromptResult.failed(request, f"{schemas_column} (data.structured_outputs_column): {exc}"))
                    continue
                yield PromptRequest(
                    uid=uid,
                    row=row,
                    messages=messages,
                    text=text,
                    seed=request.seed,
                    max_tokens=budget,
                    structured_outputs=constraint,
                    lora=lora,
                    images=images,
                )

    def add(self, result: PromptResult) -> None:
        self.pending.append(result)
        self.done_now += 1
        self.samples_now += len(result.samples)
        self.tokens_now += sum(s.num_tokens for s in result.samples)
        self.meter.add(result)
        if self.budgets is not None:
            self.budget_left -= self.budgets.pop(result.row, 0)

    def open(self) -> None:
        """Read what earlier attempts committed; the rows found there are not generated again."""
        expected = shard_prompts(self.rundir, self.shard)
        self.total = expected.num_rows
        parts = usable_parts(self.rundir, self.shard, self.schema, expected)
        self.skip = {row for t in parts for row in t.column(PART_ROW).to_pylist()}
        self.done_before = len(self.skip)
        self.submitted = False
        if exact_budgets(self.config):
            self.budgets = self._budgets()
            self.budget_left = sum(self.budgets.values())
        log.info("shard %05d: %d prompts, %d already committed", self.shard, self.total, len(self.skip))
        self.heartbeat(force=True)

    def _budgets(self) -> dict[int, int]:
        """n * max_tokens (the row's own, with data.max_tokens_column) of every row not committed yet."""
        sp, column = self.config.sampling, self.config.data.max_tokens_column
        table = pq.read_table(self.rundir.shard_input(self.shard), columns=[ROW] + ([column] if column else []))
        rows = table.column(ROW).to_pylist()
        limits = table.column(column).to_pylist() if column else [None] * len(rows)
        return {
            r: sp.n * (m if isinstance(m, int) and m > 0 else sp.max_tokens)
            for r, m in zip(rows, limits)
            if r not in self.skip
        }

    def complete(self) -> bool:
        return self.submitted and self.done_before + self.done_now >= self.total

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
    expected = shard_prompts(rundir, shard)
    created = False
    if not output.exists():
        parts = usable_parts(rundir, shard, schema, expected, full=True)
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        table = _first_copy_per_row(table).sort_by(PART_ROW)
        rows = table.column(PART_ROW)
        if rows.equals(expected.column(ROW)):
            created = _publish_output(output, table, shard)
        elif output.exists():
            # another finisher of the unit (it took over a claim we held too long) won meanwhile, and removed
            # the parts we were reading: its output stands, and is checked below like our own
            log.warning("shard %05d was finished by another task while its parts were read; keeping its output", shard)
        else:
            missing = len(set(expected.column(ROW).to_pylist()) - set(rows.to_pylist()))
            raise HpcRolloutError(
                f"shard {shard:05d}: the parts in {rundir.parts_dir(shard)} cover {len(rows)} of its "
                f"{expected.num_rows} prompts ({missing} missing: damaged parts were moved to "
                f"{rundir.quarantine_dir}); run: hpcrollout resume {rundir.root} (it generates the missing ones)"
            )
    _maybe_crash("after_output")
    table = pq.read_table(output, columns=[PART_ROW, "uid", "response_tokens", "error"])
    if not table.column(PART_ROW).equals(expected.column(ROW)):
        raise HpcRolloutError(
            f"shard {shard:05d}: {output} does not match its shard input row for row; delete it, then run: "
            f"hpcrollout resume {rundir.root}"
        )
    ntok = pc.list_value_length(table.column("response_tokens"))
    marker = {
        "shard": shard,
        "prompts": table.num_rows,
        "samples": int(pc.sum(ntok).as_py() or 0),
        "errors": table.num_rows - table.column("error").null_count,
        "output_tokens": int(pc.sum(pc.list_flatten(table.column("response_tokens"))).as_py() or 0),
        "finished": time.time(),
        **engine_identity(),  # host, pid, engine index and GPUs of the engine that finished it
        **attempt,
    }
    if created or not rundir.done_marker(shard).is_file():  # a marker left from a deleted output is replaced
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


def _publish_output(output: Path, table: pa.Table, shard: int) -> bool:
    """Write the shard output if it does not exist yet; True if this call created it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.staged")
    with atomic_path(staged) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1024)
    try:
        os.link(staged, output)  # create-if-absent: of two finishers, exactly one output wins
        fsync_dir(output.parent)
        return True
    except FileExistsError:
        log.warning("shard %05d was finished by another task meanwhile; keeping its output", shard)
        return False
    finally:
        staged.unlink(missing_ok=True)


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


class ShardSource:
    """Which shard a task works on next: its static share, or claims in dynamic mode.

    With claims and several ``claimants`` (the run's engines in dynamic mode, the task's engines in static mode),
    ``share`` is the fair share of expected work, the board's units over its claimants: while the engine still
    has work in flight it
    claims more only while the units it holds are below that share, so on an input smaller than the engines'
    read-ahead windows the first engine ready does not take every unit from siblings still starting. An engine
    with nothing in flight always claims (the share bounds how far ahead it reads, not what it may do). Held at
    its share, the engine's backlog says NOTHING_NOW and it asks again after a step: it never drains for it."""

    def __init__(self, rundir: RunDir, shards: list[int] | None = None, board: Any = None, claimants: int = 1) -> None:
        self.rundir, self.board = rundir, board
        self.queue = list(shards or [])
        self.exhausted = False
        self.claims: dict[int, tuple[Any, Any]] = {}  # shard -> (claim, lease keeper)
        self.work = expected_work(rundir.manifest()) if board is not None and claimants > 1 else []
        total = sum(self.work[s] for s in board.order if s < len(self.work)) if self.work else 0.0
        self.share = total / claimants if total > 0 else None
        self.held_back = 0  # read-ahead claims not made because the share was held
        self.at_share = False  # the last None of next(): the share was held (more may come once units finish)

    def holding(self) -> float:
        """Expected work of the units this engine holds (claimed and not yet released)."""
        held = tuple(self.claims)  # one copy: the finishing thread releases units meanwhile
        return sum(self.work[s] for s in held if s < len(self.work))

    def next(self, block: bool) -> int | None:
        """The next shard, or None: nothing now (exhausted set: nothing ever). Blocks only when asked."""
        self.at_share = False
        if self.queue:
            return self.queue.pop(0)
        if self.board is None:
            self.exhausted = True
            return None
        if not block and self.share is not None and self.claims and self.holding() >= self.share:
            self.held_back += 1
            self.at_share = True
            return None  # its fair share is in the engine: the next unit waits for a sibling, or for this one
        claim = self.board.wait_for_claim() if block else self.board.claim_next()
        if claim is None:
            # while other shards are in the engine, a holder that merely may be dead is not waited for
            self.exhausted = block or self.board.retry_at is None
            return None
        keeper = self.board.keeper(claim)
        keeper.__enter__()
        self.claims[claim.shard] = (claim, keeper)
        return claim.shard

    def lost(self, shard: int) -> bool:
        claim = self.claims.get(shard)
        return bool(claim and claim[0].lost)

    def release(self, shard: int) -> None:
        if shard in self.claims:
            claim, keeper = self.claims.pop(shard)
            keeper.__exit__(None, None, None)
            self.board.release(claim)
            if claim.lost:
                log.warning("shard %05d: its claim was taken over by another task meanwhile", shard)

    def release_all(self) -> None:
        for shard in list(self.claims):
            self.release(shard)


class TaskRunner:
    """Feeds one engine an unbroken stream of requests across shards.

    A shard boundary is not a barrier: when the engine asks for more requests than the current shard has left,
    the next shard (static share or a new claim) is opened and its prompts follow at once, while the previous
    shard's last requests are still generating. A shard whose results are all in is finalised on a background
    thread, so compaction never idles the GPU.
    """

    def __init__(
        self, rundir: RunDir, config: RunConfig, engine: Engine, source: ShardSource,
        on_result: Callable[[PromptResult, EngineMeter], None] | None = None,
    ) -> None:
        self.rundir, self.config, self.engine, self.source = rundir, config, engine, source
        self.on_result = on_result
        self.runs: dict[int, ShardRun] = {}
        self.results: list[dict[str, Any]] = []
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish-shard")
        self.finishing: list[Future] = []
        self.ranges = {s["shard"]: s["rows"] for s in rundir.manifest()["shards"]}
        self.meter = EngineMeter(engine)

    def _open_next(self, block: bool) -> ShardRun | None:
        while True:
            shard = self.source.next(block)
            if shard is None:
                return None
            if self.rundir.is_done(shard):
                self.results.append({"shard": shard, "state": "done", "skipped": True})
                self.source.release(shard)
                continue
            if self.rundir.shard_output(shard).exists():  # died between output and marker: only the marker is missing
                self._finish_async(shard, None)
                continue
            run = ShardRun(self.rundir, shard, self.config, self.engine, self.meter)
            run.start, run.end = self.ranges[shard]
            self.meter.open_shards = len(self.runs) + 1
            run.open()
            self.runs[shard] = _active[shard] = run
            return run

    def _stream(self) -> Iterator[PromptRequest]:
        while True:
            run = self._open_next(block=not any(not r.complete() for r in self.runs.values()))
            if run is None:
                if self.source.at_share:  # work in flight fills the share: ask again after a step, no drain
                    yield NOTHING_NOW
                    continue
                return
            yield from run.requests(run.skip)
            run.submitted = True
            if run.complete():  # nothing left to generate (all committed before, or all malformed)
                self._finish(run)

    def _owner(self, row: int) -> ShardRun:
        for run in self.runs.values():
            if run.start <= row < run.end:
                return run
        raise RuntimeError(f"the engine returned row {row}, which belongs to no open shard")

    def _finish(self, run: ShardRun) -> None:
        run.commit(force=True)
        del self.runs[run.shard]
        self.meter.open_shards = len(self.runs)
        _active.pop(run.shard, None)
        self._finish_async(run.shard, run)

    def _finish_async(self, shard: int, run: ShardRun | None) -> None:
        schema = run_result_schema(self.config)
        attempt = run.summary() if run else {"engine": self.engine.describe(), "recovered": True}

        def job() -> dict[str, Any]:
            try:
                return finish_shard(self.rundir, shard, schema, attempt)
            finally:
                self.source.release(shard)

        self.finishing.append(self.finisher.submit(job))

    def _on_step(self) -> None:
        """Between results: commit what is due by time (every_seconds) and keep the heartbeats fresh."""
        now = time.monotonic()
        if now - self._last_tick < 1.0:
            return
        self._last_tick = now
        for run in list(self.runs.values()):
            if run.pending:
                run.commit()
            run.heartbeat()

    def run(self, should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        stopped = False
        self._last_tick = time.monotonic()
        self.engine.on_step = self._on_step
        try:
            while not stopped and not self.source.exhausted:
                results = self.engine.generate(self._stream())
                try:
                    for result in results:
                        run = self._owner(result.row)
                        run.add(result)
                        if self.on_result is not None:
                            self.on_result(result, self.meter)
                        run.commit()
                        run.heartbeat()
                        if run.complete():
                            self._finish(run)
                        if should_stop is not None and should_stop():
                            stopped = True
                            break
                finally:
                    close = getattr(results, "close", None)
                    if close:
                        close()
            for run in list(self.runs.values()):
                run.commit(force=True)
                run.heartbeat(force=True, state="stopped")
                self.results.append({"shard": run.shard, "state": "stopped"})
        finally:
            self.engine.on_step = None
            for run in list(self.runs.values()):
                _active.pop(run.shard, None)
            self.finisher.shutdown(wait=True)
            try:
                self.results += [f.result() for f in self.finishing]
            finally:
                self.source.release_all()
        return self.results


def run_shard(
    rundir: RunDir, shard: int, engine: Engine, config: RunConfig | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run one shard to completion (or until should_stop() says so); a done shard returns at once."""
    if rundir.is_done(shard):
        return {"shard": shard, "state": "done", "skipped": True}
    config = config or rundir.load_config()
    (result,) = TaskRunner(rundir, config, engine, ShardSource(rundir, [shard])).run(should_stop)
    return result


def task_shards(rundir: RunDir, task_id: int, num_tasks: int | None = None) -> list[int]:
    """Static assignment: task i runs shards i, i + T, i + 2T, ... that are not done yet."""
    manifest = rundir.manifest()
    num_tasks = num_tasks or manifest["num_tasks"]
    if not 0 <= task_id < num_tasks:
        raise HpcRolloutError(f"task {task_id} is out of range: the run has {num_tasks} tasks")
    done = rundir.done_shards()
    return [s["shard"] for s in manifest["shards"] if static_task(s["shard"], num_tasks) == task_id and s["shard"] not in done]


def run_task(
    run_dir: str | Path, task_id: int, *, shards: list[int] | None = None, num_tasks: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_result: Callable[[PromptResult, EngineMeter], None] | None = None,
    engine: int | None = None, claims_dir: Path | None = None, engines: int | None = None,
) -> dict[str, Any]:
    """What one array task does: its shards (static) or claimed shards (dynamic), through one engine, or through
    executor.engines_per_task engine processes (executors/engine_group.py).

    engine: this process is engine E of the task's ``engines`` engines; static mode, they share the task's shards
    through the claims in claims_dir. The engine starts only once there is a shard to work on, so a task with
    nothing to do frees its GPUs at once. With claims, each engine reads ahead at most its fair share of the
    work (ShardSource).
    """
    rundir = RunDir(run_dir)
    config = rundir.load_config()
    if engine is None and shards is None and config.executor.engines_per_task != 1:
        from hpcrollout.executors.engine_group import engines_for_task, run_engine_group, task_gpu_ids

        gpus = task_gpu_ids()
        k = engines_for_task(config, gpus)
        if k > 1:
            return run_engine_group(rundir, task_id, config, k, gpus, should_stop)
    board = None
    if shards is None and (config.sharding.mode == "dynamic" or claims_dir is not None):
        from hpcrollout.claims import ClaimBoard, default_owner

        owner = default_owner() + ("" if engine is None else f":engine{engine}")
        # static: the task's shards, shared with its sibling engines; dynamic: the whole run's
        order = None if config.sharding.mode == "dynamic" else task_shards(rundir, task_id, num_tasks)
        board = ClaimBoard(
            rundir, owner, order=order, lease_s=config.sharding.lease_seconds,
            claims_dir=None if config.sharding.mode == "dynamic" else claims_dir,
        )
        claimants = (engines or 1) * (rundir.manifest()["num_tasks"] if config.sharding.mode == "dynamic" else 1)
        source = ShardSource(rundir, board=board, claimants=claimants)
        first = source.next(block=True)  # wait here, before any engine starts, for a unit to work on
        todo = [] if first is None else [first]
        source.queue = list(todo)  # the claim already held goes first
    else:
        todo = [s for s in shards if not rundir.is_done(s)] if shards is not None else task_shards(rundir, task_id, num_tasks)
        source = ShardSource(rundir, todo)
    summary: dict[str, Any] = {"task": task_id, "shards": todo, "results": []}
    if not todo:
        log.info("task %d: nothing to do", task_id)
        return summary
    log.info("task %d: %s on %s", task_id, f"shards {todo}" if board is None else "claiming shards", socket.gethostname())
    # Where a task's time goes, for `hpcrollout run`'s closing line and the end-to-end benchmark.
    timings: dict[str, float] = {}
    summary["timings"] = timings
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            engine = stack.enter_context(create_engine(config))
            timings["engine_create_s"] = time.monotonic() - started  # imports + start (+ a compile lock wait)
            log.info("task %d: engine ready: %s", task_id, engine.describe())
            working = time.monotonic()
            summary["results"] = TaskRunner(rundir, config, engine, source, on_result).run(should_stop)
            timings["shards_s"] = time.monotonic() - working  # generation + finishing the last shard
            closing = time.monotonic()
        timings["engine_close_s"] = time.monotonic() - closing
    finally:
        source.release_all()
    if source.held_back:
        log.info("task %d: its read-ahead waited at its fair share of the work %d time(s) (once a step while held)",
                 task_id, source.held_back)
    summary["shards"] = [r["shard"] for r in summary["results"]]
    return summary


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--task", type=int, default=None, help="array task index (default: SLURM_ARRAY_TASK_ID or 0)")
    parser.add_argument("--shard", type=int, action="append", default=None, help="run these shards instead")
    parser.add_argument("--engine", type=int, default=None, help=argparse.SUPPRESS)  # one of a task's engines
    parser.add_argument("--claims", default=None, help=argparse.SUPPRESS)  # static: that task's engine claims
    parser.add_argument("--engines", type=int, default=None, help=argparse.SUPPRESS)  # the task's engine count


def main(args: argparse.Namespace) -> int:
    task = args.task
    if task is None:
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    should_stop = None
    if args.engine is not None:
        should_stop = _engine_process_setup()
    summary = run_task(
        args.run_dir, task, shards=args.shard, engine=args.engine,
        claims_dir=Path(args.claims) if args.claims else None, engines=args.engines, should_stop=should_stop,
    )
    done = [r["shard"] for r in summary["results"] if r.get("state") == "done"]
    print(f"task {task}: {len(done)} shard(s) done: {done}", file=sys.stderr)
    return 0


def _engine_process_setup() -> Callable[[], bool]:
    """One of a task's engines: pinned to its CPUs; SIGTERM (the task stopping) commits finished work and stops."""
    import signal

    from hpcrollout.executors.engine_group import pin_engine_cpus

    pin_engine_cpus()
    stop = {"now": False}

    def on_sigterm(signum: int, frame: Any) -> None:
        log.warning("engine: SIGTERM, committing finished results and stopping")
        stop["now"] = True
        flush_now()

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: stop["now"]


if __name__ == "__main__":
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
