"""Claim protocol: exactly-once under concurrent claimers, claimant death and reclaim, stale claimants."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hpcrollout.claims import ClaimBoard, create_exclusive, order_by_expected_work, tapered_unit_sizes
from hpcrollout.rundir import RunDir, shard_name


class FakeClock:
    """A settable clock, so lease expiry is exercised without sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def commit(run_dir: RunDir, shard: int, owner: str) -> bool:
    """What the worker does at the end of a unit: create-if-absent output, then the done marker."""
    created = create_exclusive(run_dir.shard_output(shard), {"owner": owner})
    if created:
        run_dir.done_marker(shard).parent.mkdir(parents=True, exist_ok=True)
        run_dir.done_marker(shard).write_text("{}")
    return created


def make_run_dir(tmp_path: Path) -> RunDir:
    run_dir = RunDir(tmp_path / "run")
    for sub in ("outputs", "done", "claims"):
        (run_dir.root / sub).mkdir(parents=True, exist_ok=True)
    return run_dir


def hammer(root: str, owner: str, units: int, lease_s: float, log_path: str) -> None:
    """One claimer process: claim, 'process', commit create-if-absent, release; p0 stalls on its first unit."""
    run_dir = RunDir(root)
    board = ClaimBoard(run_dir, owner, order=list(range(units)), lease_s=lease_s, margin_s=0.05)
    records: list[dict] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        claim = board.wait_for_claim()
        if claim is None:
            # None: every unit is done or held by a live-looking lease. The others stay until every unit is
            # committed, so one of them is there to reclaim p0's stalled unit however the scheduler ran us.
            if owner == "p0" or all(run_dir.shard_output(s).exists() for s in range(units)):
                break
            time.sleep(0.05)
            continue
        if owner == "p0" and not records:
            # a stalled claimant (no renewals, like a paused process) resumes only after its unit was reclaimed
            # and committed by another
            while not run_dir.shard_output(claim.shard).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            committed = commit(run_dir, claim.shard, owner)
        else:
            with board.keeper(claim):
                time.sleep(0.04)
                committed = commit(run_dir, claim.shard, owner)
        board.release(claim)
        records.append({"shard": claim.shard, "committed": committed, "intervals": claim.intervals})
    Path(log_path).write_text(json.dumps(records))


def test_exactly_once_under_concurrent_claimers(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    units, procs, lease_s = 200, 8, 0.8
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=hammer, args=(str(run_dir.root), f"p{i}", units, lease_s, str(tmp_path / f"log{i}.json")))
        for i in range(procs)
    ]
    # p0 takes the first unit before the others start, so the stalled claim exists however busy the machine is
    workers[0].start()
    deadline = time.monotonic() + 120
    while not (run_dir.claims_dir / "00000.g0").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    for w in workers[1:]:
        w.start()
    for w in workers:
        w.join(timeout=300)
        if w.is_alive():
            w.terminate()
        assert w.exitcode == 0, f"claimer {w.name} exit code {w.exitcode}"
    records = [(i, r) for i in range(procs) for r in json.loads((tmp_path / f"log{i}.json").read_text())]

    # every unit committed exactly once, and the one output is the committer's
    committed = [r["shard"] for _, r in records if r["committed"]]
    assert sorted(committed) == list(range(units))
    outputs = sorted(p.name for p in (run_dir.root / "outputs").iterdir() if not p.name.startswith("."))
    assert outputs == sorted(f"{shard_name(s)}.parquet" for s in range(units))
    for i, r in records:
        if r["committed"]:
            assert json.loads(run_dir.shard_output(r["shard"]).read_text())["owner"] == f"p{i}"

    # no unit validly held by two claimants at once
    by_shard: dict[int, list[tuple[float, float, int]]] = {}
    for i, r in records:
        for _gen, start, end in r["intervals"]:
            by_shard.setdefault(r["shard"], []).append((start, end, i))
    for shard, spans in by_shard.items():
        for s1, e1, p1 in spans:
            for s2, e2, p2 in spans:
                assert p1 == p2 or s2 >= e1 or s1 >= e2, f"shard {shard}: p{p1} {s1}..{e1} and p{p2} {s2}..{e2}"
    # the stalled claimant's unit was reclaimed, and its late finish lost the commit race
    assert any(gen > 0 for _, r in records for gen, _, _ in r["intervals"])
    assert [r["committed"] for i, r in records if i == 0][0] is False


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hpcrollout.claims import ClaimBoard
    from hpcrollout.rundir import RunDir
    board = ClaimBoard(RunDir(sys.argv[1]), "child", order=[0, 1], lease_s=float(sys.argv[2]), margin_s=0.05)
    claim = board.claim_next(lambda s: False)
    with board.keeper(claim):
        Path(sys.argv[3]).write_text(str(claim.shard))
        time.sleep(600)
    """
)


def _killed_claimant(run_dir, lease_s: float) -> None:
    """A child process claims unit 0, renews it from its keeper thread, and is SIGKILLed."""
    flag = run_dir.root / "claimed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir.root), str(lease_s), str(flag)])
    try:
        for _ in range(1200):
            # write_text creates the file before it writes: wait for the content, not the name
            if (flag.exists() and flag.read_text()) or child.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.read_text() == "0"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_killed_claimant_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    _killed_claimant(run_dir, 600.0)  # a lease far from expiry: the unit is takeable only because its holder died
    board = ClaimBoard(run_dir, "rescuer", order=[0, 1], lease_s=600.0, margin_s=0.05)
    assert board.status()[0]["state"] == "dead"
    # its pid is gone: two claims take both units, the dead one's without waiting out its 600 s lease (fresh
    # units may come first, the dead holder's in the end game; the order is the scan's, not asserted)
    claims = [board.claim_next(lambda s: False), board.claim_next(lambda s: False)]
    assert all(claims) and sorted((c.shard, c.generation) for c in claims) == [(0, 1), (1, 0)]
    assert board.claim_next(lambda s: False) is None
    for claim in claims:
        board.release(claim)


def test_killed_claimant_elsewhere_is_reclaimed_after_its_lease(tmp_path: Path) -> None:
    """A holder on another host (whether it lives cannot be told from here) is taken over once its lease has run
    out, and not before; meanwhile a free unit is claimed first. The rescuer reads time from a clock placed
    against the dead holder's recorded lease, so no assertion depends on how long the machine takes."""
    run_dir = make_run_dir(tmp_path)
    lease_s = 60.0
    _killed_claimant(run_dir, lease_s)
    g0 = run_dir.claims_dir / "00000.g0"
    data = json.loads(g0.read_text())
    g0.write_text(json.dumps({**data, "host": "another-node"}))
    until = data["lease_until"]
    # a quarter lease before the dead child's lease ends: it has missed renewals (suspect) but is not expired
    clock = FakeClock(until - lease_s / 4)

    def sleep(seconds: float) -> None:
        clock.now += seconds

    board = ClaimBoard(run_dir, "rescuer", order=[0, 1], lease_s=lease_s, margin_s=0.05, clock=clock)
    first = board.wait_for_claim(lambda s: False, sleep=sleep)
    assert first is not None and first.shard == 1  # the free unit first: live-looking holders are not waited for
    assert clock.now == until - lease_s / 4  # and it was taken without waiting
    # then it waits out the dead child's lease and takes its unit
    second = board.wait_for_claim(lambda s: False, sleep=sleep)
    assert second is not None and (second.shard, second.generation) == (0, 1)
    assert clock.now > until + 0.05  # not before the lease (plus the clock margin) ran out
    assert board.status()[0]["owner"] == "rescuer"
    for claim in (first, second):
        board.release(claim)
    assert board.wait_for_claim(lambda s: s in (0, 1), sleep=sleep) is None


def test_live_holders_are_not_waited_for_and_expiry_is_reclaimed(tmp_path: Path) -> None:
    run_dir, clock = make_run_dir(tmp_path), FakeClock()
    a = ClaimBoard(run_dir, "a", order=[0], lease_s=10, margin_s=1, clock=clock)
    b = ClaimBoard(run_dir, "b", order=[0], lease_s=10, margin_s=1, clock=clock)
    held = a.claim_next(lambda s: False)
    assert held is not None and b.claim_next(lambda s: False) is None and b.retry_at is None
    clock.now += 2.4
    assert a.renew(held)  # healthy holder: b still has nothing to wait for
    clock.now += 2.4
    assert b.claim_next(lambda s: False) is None and b.retry_at is None
    clock.now += 3.0  # a missed a renewal: b may wait for the lease (renewed at +2.4 -> 12.4) plus the margin
    assert b.claim_next(lambda s: False) is None and b.retry_at == held.lease_until + 1
    clock.now = b.retry_at + 0.1
    taken = b.claim_next(lambda s: False)
    assert taken is not None and (taken.shard, taken.generation) == (0, 1)
    assert not a.renew(held) and held.lost and not a.holds(held)
    assert b.status()[0]["owner"] == "b" and b.status()[0]["state"] == "held"
    b.release(taken)
    assert a.status()[0]["state"] == "released"


def test_stale_claimant_finishing_late_leaves_one_copy(tmp_path: Path) -> None:
    run_dir, clock = make_run_dir(tmp_path), FakeClock()
    stale = ClaimBoard(run_dir, "stale", order=[0], lease_s=10, margin_s=1, clock=clock)
    fresh = ClaimBoard(run_dir, "fresh", order=[0], lease_s=10, margin_s=1, clock=clock)
    old = stale.claim_next(run_dir.is_done)
    clock.now += 30  # the stale claimant stalls (GC pause, SIGSTOP, dead NFS mount) without renewing
    new = fresh.claim_next(run_dir.is_done)
    assert old is not None and new is not None and new.generation == 1
    assert commit(run_dir, 0, "fresh")
    fresh.release(new)
    assert not stale.holds(old) and not stale.renew(old)  # it notices it lost the unit...
    assert not commit(run_dir, 0, "stale")  # ...and finishing anyway cannot double the output
    stale.release(old)
    assert json.loads(run_dir.shard_output(0).read_text())["owner"] == "fresh"
    assert stale.claim_next(run_dir.is_done) is None and fresh.claim_next(run_dir.is_done) is None


def test_lapsed_owner_reacquires_when_nobody_took_it(tmp_path: Path) -> None:
    run_dir, clock = make_run_dir(tmp_path), FakeClock()
    board = ClaimBoard(run_dir, "slow", order=[0], lease_s=10, margin_s=1, clock=clock)
    claim = board.claim_next(lambda s: False)
    clock.now += 15
    assert claim is not None and board.renew(claim) and claim.generation == 1
    assert [gen for gen, _, _ in claim.intervals] == [0, 1]


def test_reclaim_racing_a_renewal_never_double_holds(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    owner_clock, fast_clock = FakeClock(0.0), FakeClock(12.0)  # the reclaimer's clock runs 12 s ahead
    owner = ClaimBoard(run_dir, "owner", order=[0], lease_s=10, margin_s=1, clock=owner_clock)
    racer = ClaimBoard(run_dir, "racer", order=[0], lease_s=10, margin_s=1, clock=fast_clock)
    held = owner.claim_next(lambda s: False)
    assert held is not None
    owner_clock.now = 5.0
    create = racer._create

    def create_while_owner_renews(shard: int, generation: int):  # the owner renews between read and create
        assert owner.renew(held)
        return create(shard, generation)

    racer._create = create_while_owner_renews  # type: ignore[method-assign]
    assert racer.claim_next(lambda s: False) is None  # it sees the renewal and backs off
    racer._create = create  # type: ignore[method-assign]
    owner_clock.now = 6.0
    assert not owner.renew(held)  # the owner sees generation 1 and stops: nobody holds it twice
    assert racer.status()[0]["state"] == "abandoned"
    third = ClaimBoard(run_dir, "third", order=[0], lease_s=10, margin_s=1, clock=FakeClock(16.5))
    taken = third.claim_next(lambda s: False)
    assert taken is not None and taken.generation == 2


def test_fresh_claims_follow_the_order_and_resume_skips_done(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    manifest = {"shards": [{"est_work": w} for w in (5, 50, 20, 50, 1)]}
    order = order_by_expected_work(manifest)
    assert order == [1, 3, 2, 0, 4]
    done = {2}
    a = ClaimBoard(run_dir, "a", order=order, lease_s=60)
    b = ClaimBoard(run_dir, "b", order=order, lease_s=60)
    got = []
    for board in (a, b, a, b, a):
        claim = board.claim_next(lambda s: s in done)
        got.append(None if claim is None else claim.shard)
    assert got == [1, 3, 0, 4, None]


def test_tapered_unit_sizes_shrink_toward_the_end() -> None:
    for tasks in (1, 8, 512):
        sizes = tapered_unit_sizes(tasks)
        assert abs(sum(sizes) - 1) < 1e-9
        assert all(a >= b - 1e-15 for a, b in zip(sizes, sizes[1:], strict=False))
        share = 1 / tasks
        assert sizes[0] <= 0.25 * share + 1e-12 and sizes[-1] < 0.05 * share
        assert 10 * tasks <= len(sizes) <= 20 * tasks


def test_simulation_finishes_every_unit_once(tmp_path: Path) -> None:
    from hpcrollout.benchmarks.simulate_balancing import make_workload, simulate_dynamic

    workload = make_workload(8, seed=1)
    stats = simulate_dynamic(workload, tmp_path / "run")
    assert stats["complete"] == 1.0 and stats["duplicates"] == 0
    assert stats["reclaims"] >= 1  # the killed task's unit
