"""A process pool that runs a verifier over chunks of rows, where no response can hang a worker.

Each worker is a spawned process that builds the verifier once (so a user module is imported in every worker)
and scores one chunk at a time from its main thread, where the verifier's soft timeout (SIGALRM) works. Before
each response it writes (response index, start time) to a shared array. The parent watches that array: a
response still running after the hard timeout (the verifier is stuck in C code, or catches the alarm) gets its
worker SIGKILLed; the response is recorded as ``timeout`` and the chunk is sent again to a fresh worker, with that
response skipped. A worker that dies (segfault, out of memory) is handled the same way, the response it was on
recorded as ``error``. So every chunk completes, each response in it has exactly one outcome, and results come
back in submission order with a bounded number of chunks in flight.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from hpcrollout.errors import HpcRolloutError
from hpcrollout.scoring.verifiers import (
    BAD_REFERENCE,
    ERROR,
    Outcome,
    Verifier,
    VerifierSpec,
    timeout_outcome,
)

log = logging.getLogger("hpcrollout")

# One row of a chunk: (responses, reference value, row dict for python verifiers or None).
RowTask = tuple[list[Any], Any, Any]
# Skipped items of a chunk: ("resp", flat response index) or ("ref", row index) -> the outcome to record.
Skips = dict[tuple[str, int], Outcome]

IDLE = -1e18  # progress start time of a worker between chunks
NOT_STARTED = -1e9  # progress index of a chunk handed over but not begun
START_TIMEOUT_S = 300.0  # spawning + importing the verifier (sympy, a user module) on a loaded node


class Outcomes:
    """A chunk's outcomes as four parallel lists: far cheaper to pickle, and to turn into Arrow, than tuples."""

    __slots__ = ("scores", "answers", "statuses", "messages")

    def __init__(self, outcomes: Iterable[Outcome] = ()) -> None:
        self.scores: list[float | None] = []
        self.answers: list[str | None] = []
        self.statuses: list[str] = []
        self.messages: list[str | None] = []
        for o in outcomes:
            self.scores.append(o.score)
            self.answers.append(o.answer)
            self.statuses.append(o.status)
            self.messages.append(o.message)

    def extend(self, other: Outcomes) -> None:
        self.scores += other.scores
        self.answers += other.answers
        self.statuses += other.statuses
        self.messages += other.messages

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i: int) -> Outcome:
        return Outcome(self.scores[i], self.answers[i], self.statuses[i], self.messages[i])

    def __iter__(self) -> Iterator[Outcome]:
        return (self[i] for i in range(len(self)))


def default_workers() -> int:
    """The CPUs this process was given: SLURM_CPUS_PER_TASK, else the affinity mask, else os.cpu_count()."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def score_chunk(
    verifier: Verifier, rows: list[RowTask], timeout_s: float | None, skips: Skips | None = None, progress=None
) -> list[Outcome]:  # noqa: ANN001 - progress: callable(flat index or -(row + 1)) or None
    """Score a chunk in this process: outcomes for every response of every row, in order."""
    skips = skips or {}
    out: list[Outcome] = []
    for r, (responses, reference, row) in enumerate(rows):
        base = len(out)
        if ("ref", r) in skips:
            out.extend([skips[("ref", r)]] * len(responses))
            continue
        todo = [i for i in range(len(responses)) if ("resp", base + i) not in skips]

        def mark(i: int, base: int = base, todo: list[int] = todo, r: int = r) -> None:
            if progress is not None:
                progress(base + todo[i] if i >= 0 else -(r + 1))

        scored = verifier.score_row([responses[i] for i in todo], reference, row, timeout_s, mark)
        got = dict(zip(todo, scored, strict=True))
        out.extend(got.get(i) or skips[("resp", base + i)] for i in range(len(responses)))
    return out


def _worker_main(spec: VerifierSpec, conn: Connection, progress: Any, slot: int, timeout_s: float | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        verifier = spec.build()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it as a user error
        conn.send(("init_error", str(exc) if isinstance(exc, HpcRolloutError) else traceback.format_exc()))
        return
    conn.send(("ready", None))

    def mark(value: int) -> None:
        progress[2 * slot] = value
        progress[2 * slot + 1] = time.monotonic()

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, rows, skips = msg
        try:
            result = Outcomes(score_chunk(verifier, rows, timeout_s, skips, mark))
            progress[2 * slot + 1] = IDLE
            conn.send(("done", task_id, result))
        except BaseException:  # noqa: BLE001 - a bug in hpcrollout's own code: the parent re-raises it
            progress[2 * slot + 1] = IDLE
            conn.send(("crash", task_id, traceback.format_exc()))


class _Worker:
    def __init__(self, ctx: Any, spec: VerifierSpec, progress: Any, slot: int, timeout_s: float | None) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe()
        progress[2 * slot + 1] = IDLE
        self.process = ctx.Process(
            target=_worker_main, args=(spec, child, progress, slot, timeout_s), name=f"hpcrollout-score-{slot}"
        )
        self.process.daemon = True
        self.process.start()
        child.close()
        self.task: int | None = None
        self.ready = False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class VerifierPool:
    """``workers`` processes scoring chunks; ``imap`` yields each chunk's outcomes in submission order.

    ``workers=0`` scores in this process (soft timeout only, no hard kill): for tests and small inputs.
    """

    def __init__(
        self,
        spec: VerifierSpec,
        workers: int,
        timeout_s: float | None,
        hard_timeout_s: float | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.spec = spec
        self.workers = workers
        self.timeout_s = timeout_s
        self.hard_timeout_s = hard_timeout_s or (2 * timeout_s + 1 if timeout_s else None)
        self.max_in_flight = max_in_flight or max(2, 3 * workers)
        self.killed = 0  # workers killed for a hard timeout or found dead
        self._ctx = mp.get_context("spawn")  # never fork: the parent has reader/writer threads
        self._progress: Any = None
        self._workers: list[_Worker] = []
        self._local: Verifier | None = None

    def __enter__(self) -> VerifierPool:
        if self.workers <= 0:
            self._local = self.spec.build()
            return self
        self._progress = self._ctx.RawArray("d", 2 * self.workers)
        self._workers = [self._spawn(i) for i in range(self.workers)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for w in self._workers:
            while not w.ready:
                if not w.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise HpcRolloutError(f"a scoring worker did not start within {START_TIMEOUT_S:g} s")
                self._handle_startup(w)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.process.join(timeout=2)
            w.kill()
        self._workers = []

    def _spawn(self, slot: int) -> _Worker:
        return _Worker(self._ctx, self.spec, self._progress, slot, self.timeout_s)

    def _handle_startup(self, w: _Worker) -> None:
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            raise HpcRolloutError(
                f"a scoring worker died while starting (exit code {w.process.exitcode}); "
                f"check that {self.spec.text!r} can be built in a fresh Python process"
            ) from None
        if kind == "init_error":
            self.close()
            raise HpcRolloutError(f"a scoring worker could not build the verifier: {payload}")
        w.ready = True

    def imap(self, chunks: Iterable[list[RowTask]]) -> Iterator[Outcomes]:
        """Score every chunk; yield their outcomes in order, holding at most ``max_in_flight`` chunks."""
        if self._local is not None:
            for rows in chunks:
                yield Outcomes(score_chunk(self._local, rows, self.timeout_s))
            return
        source = iter(chunks)
        exhausted = False
        tasks: dict[int, tuple[list[RowTask], Skips]] = {}
        results: dict[int, Outcomes] = {}
        queue: deque[int] = deque()  # task ids not yet handed to a worker
        next_id = next_out = 0
        while True:
            while not exhausted and len(tasks) < self.max_in_flight:
                try:
                    rows = next(source)
                except StopIteration:
                    exhausted = True
                    break
                tasks[next_id] = (rows, {})
                queue.append(next_id)
                next_id += 1
            for w in self._workers:
                if w.task is None and w.ready and queue:
                    w.task = queue.popleft()
                    self._progress[2 * w.slot] = NOT_STARTED
                    self._progress[2 * w.slot + 1] = time.monotonic()
                    w.conn.send((w.task, *tasks[w.task]))
            while next_out in results:
                tasks.pop(next_out)
                yield results.pop(next_out)
                next_out += 1
            if exhausted and not tasks:
                return
            busy = [w for w in self._workers if w.task is not None]
            ready = wait([w.conn for w in busy], timeout=0.2) if busy else []
            for w in busy:
                if w.conn in ready:
                    self._receive(w, tasks, results, queue)
            self._check_deadlines(tasks, queue)

    def _receive(
        self, w: _Worker, tasks: dict[int, tuple[list[RowTask], Skips]], results: dict[int, Outcomes], queue
    ) -> None:  # noqa: ANN001 - queue: deque[int]
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._replace(w, tasks, queue, died=True)
            return
        kind, task_id, payload = msg
        if kind == "crash":
            raise RuntimeError(f"scoring worker crashed:\n{payload}")
        results[task_id] = payload
        w.task = None

    def _check_deadlines(self, tasks: dict[int, tuple[list[RowTask], Skips]], queue: deque[int]) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is None:
                continue
            if not w.process.is_alive() and not w.conn.poll():
                self._replace(w, tasks, queue, died=True)
            elif (
                self.hard_timeout_s
                and (started := self._progress[2 * w.slot + 1]) != IDLE
                and now - started > self.hard_timeout_s
            ):
                self._replace(w, tasks, queue, died=False)

    def _replace(
        self, w: _Worker, tasks: dict[int, tuple[list[RowTask], Skips]], queue: deque[int], died: bool
    ) -> None:
        """Kill ``w``, record the item it was stuck on, start a fresh worker and requeue the chunk first."""
        assert w.task is not None
        task_id, where, started = w.task, int(self._progress[2 * w.slot]), self._progress[2 * w.slot + 1]
        w.kill()
        self.killed += 1
        code = w.process.exitcode
        if started == IDLE or where == NOT_STARTED:
            raise RuntimeError(f"scoring worker {w.slot} died or hung outside a response (exit code {code})")
        item = ("resp", where) if where >= 0 else ("ref", -where - 1)
        _, skips = tasks[task_id]
        if item in skips:
            raise RuntimeError(f"scoring worker {w.slot} died again on an item already skipped ({item})")
        if died:
            what = "the verifier process died" + (f" (signal {-code})" if code and code < 0 else f" (exit {code})")
            outcome = (
                Outcome(None, None, BAD_REFERENCE, f"{what} while reading the reference")
                if item[0] == "ref"
                else Outcome(0.0, None, ERROR, f"{what} while scoring this response")
            )
        else:
            how = f"; the verifier ignored the soft timeout, so its worker was killed after {self.hard_timeout_s:g} s"
            outcome = timeout_outcome(self.timeout_s, how)
            if item[0] == "ref":
                outcome = Outcome(None, None, BAD_REFERENCE, f"reading the reference did not finish{how}")
        skips[item] = outcome
        log.warning(
            "scoring worker %d %s on %s %d of a chunk; recorded as %s and restarted the worker",
            w.slot,
            "died" if died else "was killed (hard timeout)",
            "response" if item[0] == "resp" else "the reference of row",
            item[1],
            outcome.status,
        )
        fresh = self._spawn(w.slot)
        self._workers[self._workers.index(w)] = fresh
        deadline = time.monotonic() + START_TIMEOUT_S
        while not fresh.ready:
            if not fresh.conn.poll(max(0.0, deadline - time.monotonic())):
                raise HpcRolloutError(f"a scoring worker did not restart within {START_TIMEOUT_S:g} s")
            self._handle_startup(fresh)
        queue.appendleft(task_id)
