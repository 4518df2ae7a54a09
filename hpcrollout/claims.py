"""Dynamic load balancing: array tasks claim work units (shards) from the run directory, no server.

Each task in dynamic mode loops: claim the next claimable unit in longest-expected-work-first order, process it
while a background thread renews its lease, release it, repeat; it exits when nothing is claimable, so finished
tasks free their GPUs early. Late-starting or added tasks simply join. A unit whose claimant died (its lease ran
out) is reclaimed by another task. Units should shrink toward the end of the order (``tapered_unit_sizes``), so
the run ends on small units and no task is left with a long one.

Files (under RUN_DIR/claims/)::

  00012.g0        generation 0 of shard 12's claim: {owner, token, host, pid, slurm ids, generation, acquired,
                  lease_until, released}; created exclusively (temp file + os.link, atomic on NFS too), then
                  renewed/released only by its owner through an atomic replace of the same name
  00012.g1        generation 1: a reclaim of an expired/released g0, again created exclusively
  scan/SLOT.lock  per time slot (lease_s / 4), the one task that creates this scans all claims ...
  scan.json       ... and publishes the expired ones and the suspects (holders that missed renewals), so the
                  run reads each claim once per slot, not once per task per slot

Protocol. The holder of a shard is the owner of its highest generation file while that file's lease is valid.
- Claim: the first never-claimed unit in the order gets ``g0`` by exclusive create; of several claimers exactly
  one link succeeds, the others move on. Claims therefore grow as a prefix of the order.
- Renew (owner only, every lease_s / 4): replace ``gN`` with a later lease_until, then check that ``g{N+1}`` does
  not exist; if it does, the claim is lost. An owner whose own lease already ran out never extends ``gN``: it
  tries to create ``g{N+1}`` itself, which succeeds only if nobody reclaimed it meanwhile.
- Reclaim: a unit whose top ``gN`` is released, or whose lease_until + margin_s has passed on the reclaimer's
  clock, is taken by creating ``g{N+1}`` exclusively: of several reclaimers exactly one wins. The winner then
  re-reads ``gN``; if the owner renewed in between, the winner does not take the unit and leaves ``g{N+1}`` as an
  "abandoned" claim that expires when the owner's renewed lease would, so the old owner loses at its next
  renewal and nobody holds the unit twice.
- Release: the owner rewrites ``gN`` with released=true; the unit is claimable at once (if not done).

Time and clocks. Leases hold wall-clock times written by the owner and compared by other nodes. Assumption: node
clocks agree within ``margin_s`` (default lease_s / 8 = 15 s; NTP keeps cluster nodes within milliseconds), and
the filesystem gives close-to-open consistency with name caches (NFS acdirmax) shorter than the margin. If these
fail, a live unit may be reclaimed early: that costs duplicated work, never duplicated output, because exactly-once
output rests only on the worker linking ``outputs/SHARD.parquet`` create-if-absent (a stale claimant finishing late
loses that race). Claim files are soft state and are not fsynced: losing them in a server crash only causes rework.
The time source is injectable (``clock``) so the simulation can drive the real code with virtual time.

End of the run. ``claim_next`` returns None when every unit not done is held by others; it then sets
``retry_at`` if a holder already missed renewals (a suspected death), and ``wait_for_claim`` sleeps until that
lease expires to reclaim the unit. Units held by healthy holders are not waited for. A holder known dead (on
the claimer's host, its pid gone, or reused by a process with another start time) is taken over at once, without
waiting for its lease. Known gaps, both left to ``hpcrollout resume``: a holder on another host that dies after
all other tasks have exited, and a unit released unfinished (a preempted task) in the last scan slot before the
others exit.

Static mode (``sharding.mode: static``) needs none of this: task i runs its own shards. Use it where the
filesystem's link/rename is not atomic (some object-store FUSE mounts) or node clocks cannot be trusted; the price
is that the array waits for its slowest task (long-tailed outputs, slow nodes, late starts, a requeued task):
in the simulation 1.2x to 3.4x the ideal makespan against 1.02x to 1.04x dynamic (.notes/balancing_results.md).

Usage in a worker::

    board = ClaimBoard(run_dir, lease_s=config.sharding.lease_seconds)
    while (claim := board.wait_for_claim()) is not None:
        try:
            with board.keeper(claim):          # renews in a thread; claim.lost turns True if it is taken
                run_shard(run_dir, claim.shard, engine, config, should_stop=lambda: claim.lost)
        finally:
            board.release(claim)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcrollout.procs import PID_NAMESPACE, process_start, same_process_alive
from hpcrollout.rundir import RunDir, shard_name, write_error

log = logging.getLogger("hpcrollout")

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")


def expected_work(manifest: dict[str, Any]) -> list[float]:
    """Each shard's expected work, as the manifest records it (the sharder's estimate, else its rows)."""

    def work(entry: Any) -> float:
        for key in ("est_work", "est_tokens", "num_rows", "rows"):
            if isinstance(entry, dict) and key in entry:
                value = entry[key]
                if isinstance(value, (list, tuple)) and len(value) == 2:  # rows as a [start, end) range
                    return float(value[1] - value[0])
                return float(value)
        return 0.0

    return [work(entry) for entry in manifest["shards"]]


def order_by_expected_work(manifest: dict[str, Any]) -> list[int]:
    """Shard indices, longest expected work first (ties: input order), so the run's tail is short units."""
    work = expected_work(manifest)
    return sorted(range(len(work)), key=lambda i: (-work[i], i))


def tapered_unit_sizes(num_tasks: int, first: float = 0.25, last: float = 1 / 64) -> list[float]:
    """Unit sizes as fractions of the total estimated work, largest first, for dynamic mode.

    Equal units leave the run's tail at up to one unit per task (more on a slow node). Like guided
    self-scheduling, each unit is 1/num_tasks * first of the work still unassigned, clamped to [last, first]
    of one task's share (total / num_tasks): the run starts on units a quarter of a task's share and ends on
    units of 1/64, about 15 units per task in all. Claimed longest-first, tasks end the run on small units.
    """
    share = 1.0 / max(1, num_tasks)
    sizes: list[float] = []
    left = 1.0
    while left > 1e-12:
        size = min(left, max(last * share, min(first * share, left * first * share)))
        sizes.append(size)
        left -= size
    return sizes


def default_owner() -> str:
    """A readable owner name: host, pid and SLURM array ids when present."""
    parts = [socket.gethostname(), str(os.getpid())]
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        parts.append(f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}")
    elif "SLURM_JOB_ID" in os.environ:
        parts.append(os.environ["SLURM_JOB_ID"])
    return ":".join(parts)


@dataclass
class Claim:
    """One held unit; ``lost`` turns True when another task took it (stop working on it)."""

    shard: int
    generation: int
    token: str
    acquired: float
    lease_until: float
    lost: bool = False
    released: bool = False
    # (generation, start, end) of each interval this claimant validly held the unit; for tests and logs
    intervals: list[list[float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


_HOST = socket.gethostname()
_tmp_counter = itertools.count()


def _write_tmp(path: str, data: dict[str, Any]) -> str:
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{_HOST}.{os.getpid()}.{next(_tmp_counter)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_error(Path(path), exc) from None
    return tmp


def _holder_dead(data: dict[str, Any]) -> bool:
    """The claim's holder is known dead: on this host, its pid gone or reused (start time differs). An abandoned
    claim (a reclaimer that lost the race) holds nothing itself: its lease, not its creator, decides."""
    if data.get("abandoned"):
        return False
    pid, start = _int_or_none(data.get("pid")), _int_or_none(data.get("pid_start"))
    return same_process_alive(data.get("host"), pid, start, data.get("pid_ns")) is False


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def create_exclusive(path: str | Path, data: dict[str, Any]) -> bool:
    """Create path with this JSON content if it does not exist; True if we created it (atomic, NFS-safe)."""
    tmp = _write_tmp(os.fspath(path), data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS may report an error for a retransmitted link that did succeed: the temp file's link count tells
        return os.stat(tmp).st_nlink == 2
    finally:
        os.unlink(tmp)


def _replace(path: str, data: dict[str, Any]) -> None:
    os.replace(_write_tmp(path, data), path)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # only a foreign or damaged file can be unparsable (writes are atomic); treat it as released
        log.warning("claim file %s is unreadable; treating it as released", path)
        return {"released": True, "lease_until": 0.0, "token": ""}


class ClaimBoard:
    """One task's view of the claims of a run directory (see the module docstring for the protocol)."""

    def __init__(
        self,
        run_dir: RunDir,
        owner: str | None = None,
        *,
        order: list[int] | None = None,
        lease_s: float = 120.0,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.time,
        claims_dir: Path | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.owner = owner or default_owner()
        self.order = order if order is not None else order_by_expected_work(run_dir.manifest())
        self.lease_s = lease_s
        self.margin_s = lease_s / 8 if margin_s is None else margin_s
        self.renew_every = lease_s / 4
        self.scan_every = lease_s / 4
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.retry_at: float | None = None  # set by claim_next when a suspect lease may soon become claimable
        # claims_dir: the engines of one static task share its shards through a board of their own
        self.dir = claims_dir if claims_dir is not None else run_dir.claims_dir
        self._base = f"{self.dir}{os.sep}"
        self._ident = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid()}
        # with host and pid these tell a reused pid, or a namesake host, apart
        self._ident.update(pid_start=process_start(os.getpid()), pid_ns=PID_NAMESPACE)
        self._ident.update({v.lower(): os.environ[v] for v in SLURM_VARS if v in os.environ})
        self._top: dict[int, int] = {}  # highest generation seen per shard (never decreases)
        self._done: set[int] = set()
        self._next = 0  # index into order: every unit before it has been claimed at least once (or is done)
        self._slot = -1
        self._hints: list[int] = []  # expired units from the latest published scan
        self._suspects: list[tuple[int, float]] = []  # (unit, expiry) of holders that missed renewals

    # files (string paths: the simulation makes millions of these)
    def _p(self, shard: int, generation: int) -> str:
        return f"{self._base}{shard:05d}.g{generation}"

    def path(self, shard: int, generation: int) -> Path:
        return Path(self._p(shard, generation))

    def _content(self, claim: Claim, **extra: Any) -> dict[str, Any]:
        data = dict(self._ident, token=claim.token, shard=claim.shard, generation=claim.generation)
        data.update(acquired=claim.acquired, lease_until=claim.lease_until, released=False)
        data.update(extra)
        return data

    def _top_of(self, shard: int) -> tuple[int, dict[str, Any] | None]:
        """Highest existing generation of a shard's claim and its content; (-1, None) if never claimed."""
        gen = self._top.get(shard, 0)
        if gen == 0 and not os.path.exists(self._p(shard, 0)):
            return -1, None
        while os.path.exists(self._p(shard, gen + 1)):
            gen += 1
        self._top[shard] = gen
        return gen, _read(self._p(shard, gen))

    def _claimable(self, data: dict[str, Any] | None, now: float) -> bool:
        if data is None:
            return False
        if data.get("released"):
            return True
        if data.get("token") == self.token and not data.get("abandoned"):
            return False  # our own live claim
        if now > float(data["lease_until"]) + self.margin_s:
            return True
        return _holder_dead(data)

    def _dead_holders(self, is_done: Callable[[int], bool]) -> list[int]:
        """Units whose holder is known dead (this host, its pid gone or reused): taken over at once, not after
        the lease, so a resume right after a worker died does not exit with the unit unfinished."""
        out = []
        for shard in self.order:
            if self._is_done(shard, is_done):
                continue
            gen, data = self._top_of(shard)
            if gen < 0:
                break  # claims grow as a prefix of the order
            if data is not None and not data.get("released") and data.get("token") != self.token and _holder_dead(data):
                out.append(shard)
        return out

    def _is_done(self, shard: int, is_done: Callable[[int], bool]) -> bool:
        if shard in self._done:
            return True
        if is_done(shard):
            self._done.add(shard)
            return True
        return False

    # claiming
    def claim_next(self, is_done: Callable[[int], bool] | None = None) -> Claim | None:
        """Claim the next unit; None: none free. Units the slot's scan found expired or dead come first, then
        fresh units in order, then (the end game) units whose holders are known dead since that scan."""
        is_done = is_done or self.run_dir.is_done
        self.retry_at = None
        if self._slot < 0:
            (self.dir / "scan").mkdir(parents=True, exist_ok=True)
        now = self.clock()
        self._refresh(is_done, now)
        while self._hints:
            shard = self._hints.pop(0)
            if not self._is_done(shard, is_done) and (claim := self._take(shard, is_done)):
                return claim
        if claim := self._claim_fresh(is_done):
            return claim
        # end game: only units held by others are left; take those whose holders died or stopped renewing
        for shard in self._dead_holders(is_done):
            if claim := self._take(shard, is_done):
                return claim
        waits = []
        for shard, expiry in list(self._suspects):
            if expiry > now:
                waits.append(expiry)
                continue
            self._suspects.remove((shard, expiry))
            if not self._is_done(shard, is_done) and (claim := self._take(shard, is_done)):
                return claim
        if waits:
            self.retry_at = min(waits)
        return None

    def wait_for_claim(
        self, is_done: Callable[[int], bool] | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> Claim | None:
        """claim_next, but wait for units whose holder missed renewals (probably dead) to expire; None: all done/held."""
        while True:
            claim = self.claim_next(is_done)
            if claim is not None or self.retry_at is None:
                return claim
            log.info("all units held; waiting %.0f s for a lease that missed renewals", self.retry_at - self.clock())
            sleep(max(0.0, self.retry_at - self.clock()) + 0.01)

    def _claim_fresh(self, is_done: Callable[[int], bool]) -> Claim | None:
        order = self.order
        while self._next < len(order):
            shard = order[self._next]
            if self._is_done(shard, is_done):
                self._next += 1
            elif os.path.exists(self._p(shard, 0)):
                self._next = self._gallop(self._next)
            else:
                claim = self._create(shard, 0)
                self._next += 1
                if claim is not None:
                    return claim
        return None

    def _gallop(self, i: int) -> int:
        """Given order[i] claimed, the next index whose g0 does not exist (claims grow as a prefix of the order)."""
        order, n = self.order, len(self.order)

        def claimed(j: int) -> bool:
            return os.path.exists(self._p(order[j], 0))

        lo, step = i, 1
        while lo + step < n and claimed(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, n)  # order[hi] unclaimed or past the end; order[lo] claimed
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if claimed(mid) else (lo, mid)
        return hi

    def _create(self, shard: int, generation: int) -> Claim | None:
        now = self.clock()
        claim = Claim(shard, generation, self.token, acquired=now, lease_until=now + self.lease_s)
        if not create_exclusive(self._p(shard, generation), self._content(claim)):
            self._top[shard] = max(self._top.get(shard, 0), generation)
            return None
        self._top[shard] = generation
        claim.intervals.append([generation, now, now])
        return claim

    def _take(self, shard: int, is_done: Callable[[int], bool]) -> Claim | None:
        """Claim one shard that looked free or expired; race-free among several takers."""
        gen, data = self._top_of(shard)
        if gen < 0:
            return self._create(shard, 0)
        if not self._claimable(data, self.clock()):
            return None
        claim = self._create(shard, gen + 1)
        if claim is None:
            return None
        # the old owner may have renewed between our read and our create: then it keeps the unit until it
        # notices g{N+1} at its next renewal, and our g{N+1} stays unclaimable until its renewed lease ends
        again = _read(self._p(shard, gen))
        if not self._claimable(again, self.clock()):
            until = float(again["lease_until"]) if again else claim.lease_until
            claim.lease_until = until
            _replace(self._p(shard, gen + 1), self._content(claim, abandoned=True))
            return None
        log.info("reclaimed shard %s from %s (generation %d)", shard_name(shard), (data or {}).get("owner"), gen + 1)
        if self._is_done(shard, is_done):
            self.release(claim)
            return None
        return claim

    # scanning for expired claims
    def _scan(self, is_done: Callable[[int], bool], now: float) -> tuple[list[int], list[tuple[int, float]]]:
        """Claimable (expired/released) units in order, and (unit, expiry) of live leases that missed renewals."""
        claimable: list[int] = []
        suspects: list[tuple[int, float]] = []
        for shard in self.order:
            if self._is_done(shard, is_done):
                continue
            gen, data = self._top_of(shard)
            if gen < 0:
                break  # units are claimed as a prefix of the order: nothing beyond is expired yet
            if self._claimable(data, now):
                claimable.append(shard)
            elif data is not None and data.get("token") != self.token:
                until = float(data["lease_until"])
                if until - now < self.lease_s / 2:  # a healthy holder keeps >= 3/4 lease_s ahead
                    suspects.append((shard, until + self.margin_s))
        return claimable, suspects

    def _refresh(self, is_done: Callable[[int], bool], now: float) -> None:
        """Once per slot (lease_s / 4): one task scans all claims and publishes the result; the others read it."""
        slot = int(now // self.scan_every)
        if slot == self._slot:
            return
        self._slot = slot
        if create_exclusive(f"{self._base}scan{os.sep}{slot}.lock", {"owner": self.owner, "time": now}):
            self._hints, self._suspects = self._scan(is_done, now)
            published = {"time": now, "owner": self.owner, "expired": self._hints, "suspects": self._suspects}
            _replace(f"{self._base}scan.json", published)
            for name in os.listdir(f"{self._base}scan"):
                stem = name.split(".")[0]
                if stem.isdigit() and int(stem) < slot - 2:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self._base}scan{os.sep}{name}")
        else:
            published = _read(f"{self._base}scan.json") or {}
            self._hints = [int(x) for x in published.get("expired", [])]
            self._suspects = [(int(x), float(t)) for x, t in published.get("suspects", [])]

    # holding
    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False if the claim was lost (another task took the unit: stop working on it)."""
        with claim.lock:
            if claim.lost or claim.released:
                return not claim.lost
            now = self.clock()
            if now >= claim.lease_until:
                # our lease ran out (paused process, overloaded node): never extend it; take the next
                # generation instead, which succeeds only if nobody reclaimed the unit meanwhile
                successor = self._p(claim.shard, claim.generation + 1)
                nxt = Claim(claim.shard, claim.generation + 1, self.token, claim.acquired, now + self.lease_s)
                if create_exclusive(successor, self._content(nxt)):
                    log.warning("lease of shard %s lapsed; re-acquired it", shard_name(claim.shard))
                    claim.intervals[-1][2] = claim.lease_until
                    claim.generation, claim.lease_until = nxt.generation, nxt.lease_until
                    claim.intervals.append([claim.generation, now, now])
                    return True
                return self._lose(claim, end=claim.lease_until)
            claim.lease_until = now + self.lease_s
            _replace(self._p(claim.shard, claim.generation), self._content(claim))
            if os.path.exists(self._p(claim.shard, claim.generation + 1)):
                return self._lose(claim, end=now)
            claim.intervals[-1][2] = now
            return True

    def _lose(self, claim: Claim, end: float) -> bool:
        log.warning("lost the claim on shard %s to another task", shard_name(claim.shard))
        claim.lost = True
        claim.intervals[-1][2] = max(claim.intervals[-1][2], end)
        return False

    def holds(self, claim: Claim) -> bool:
        """True while the lease is valid by our clock and nobody took the unit (cheap: one stat)."""
        if claim.lost or claim.released or self.clock() >= claim.lease_until:
            return False
        return not os.path.exists(self._p(claim.shard, claim.generation + 1))

    def release(self, claim: Claim) -> None:
        """Give the unit up (done or not): claimable at once by others if not done."""
        with claim.lock:
            if claim.released:
                return
            claim.released = True
            now = self.clock()
            if claim.lost:
                return
            if now < claim.lease_until and not os.path.exists(self._p(claim.shard, claim.generation + 1)):
                claim.intervals[-1][2] = now
            else:
                claim.intervals[-1][2] = claim.lease_until
            _replace(self._p(claim.shard, claim.generation), self._content(claim, released=True))

    def keeper(self, claim: Claim, on_lost: Callable[[Claim], None] | None = None) -> LeaseKeeper:
        """A context manager renewing the claim from a background thread."""
        return LeaseKeeper(self, claim, on_lost=on_lost)

    # reporting
    def status(self) -> dict[int, dict[str, Any]]:
        """Per shard with a claim: state (held/expired/released/abandoned), holder, generation, expiry."""
        now = self.clock()
        out: dict[int, dict[str, Any]] = {}
        if not self.dir.is_dir():
            return out
        for shard in sorted(self.order):
            gen, data = self._top_of(shard)
            if gen < 0 or data is None:
                continue
            until = float(data.get("lease_until", 0.0))
            if data.get("released"):
                state = "released"
            elif now > until + self.margin_s:
                state = "expired"
            elif _holder_dead(data):
                state = "dead"  # its holder died: the next claim takes it over
            else:
                state = "abandoned" if data.get("abandoned") else "held"
            info = {k: data.get(k) for k in ("owner", "host", "pid", *(v.lower() for v in SLURM_VARS)) if k in data}
            info.update(state=state, generation=gen, lease_until=until, expires_in=until - now)
            out[shard] = info
        return out


class LeaseKeeper:
    """Renews a claim every lease_s / 4 from a daemon thread; sets claim.lost (and calls on_lost) if it is taken."""

    def __init__(self, board: ClaimBoard, claim: Claim, on_lost: Callable[[Claim], None] | None = None) -> None:
        self.board, self.claim, self.on_lost = board, claim, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.shard}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.board.renew_every):
            try:
                ok = self.board.renew(self.claim)
            except OSError as exc:  # a filesystem hiccup: try again next period; the lease still has time
                log.warning("renewing the claim on shard %s failed: %s", shard_name(self.claim.shard), exc)
                continue
            if not ok:
                if self.on_lost is not None:
                    self.on_lost(self.claim)
                return

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
