"""Simulated makespan of dynamic claiming (the real ClaimBoard on a temp run dir, virtual time) vs static shards.

Workload (seeded): prompts with long-tailed output lengths (lognormal, capped at max_tokens), n samples each,
cut into contiguous units of equal *estimated* work exactly as shard.plan_shards does (estimate = prompt
tokens + n * max_tokens, so the actual work of a unit varies). Tasks: per-task speed variance (lognormal, plus a
few degraded nodes at half speed), model load, late starts (queue waits), one task SIGKILLed mid-run.

Dynamic: every task runs the real claim code (claim_next / renew every lease_s/4 / release) against one temp
run directory with a virtual clock, event-driven (a heap of task events). The killed task stops renewing; its
unit is reclaimed after its lease expires and redone from scratch (its partial progress is counted as lost).
Static: task i runs contiguous shard i (units_per_task units); the killed task's shard is requeued and resumes
from its last checkpoint after a queue wait (generous to static).

Ideal: the fluid bound, the earliest time T at which the tasks' capacity (speed x time between its start and
T or its death) covers the total work; with all tasks equal and starting at 0 this is total work / tasks.
Also printed: total work / tasks at mean speed (the naive ideal).

Assumptions: a task keeps its engine saturated across unit boundaries except for a fixed per-unit switch cost;
filesystem operations take no virtual time. Run: python -m hpcrollout.benchmarks.simulate_balancing
"""

from __future__ import annotations

import argparse
import heapq
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcrollout.claims import Claim, ClaimBoard, tapered_unit_sizes
from hpcrollout.rundir import RunDir


@dataclass
class Workload:
    """Units (actual and estimated work, tokens), static shards' work, and tasks (speed, start, death)."""

    work: np.ndarray
    est: np.ndarray
    static_work: np.ndarray  # contiguous equal-count shard per task, same prompts
    speed: np.ndarray  # tokens/s
    start: np.ndarray  # s, after queue wait and model load
    death: np.ndarray  # s; inf for tasks that are not killed
    unit_switch_s: float
    requeue_s: float


def make_workload(
    tasks: int,
    taper: bool = True,
    prompts_per_task: int = 3000,
    n: int = 4,
    max_tokens: int = 8192,
    tokens_per_s: float = 1000.0,
    seed: int = 0,
) -> Workload:
    """A seeded workload; see the module docstring. About 3 h of work per task at mean speed."""
    rng = np.random.default_rng(seed)
    prompts = tasks * prompts_per_task
    prompt_tokens = rng.integers(50, 2000, prompts).astype(np.float64)
    outputs = np.minimum(rng.lognormal(np.log(400), 1.2, (prompts, n)), max_tokens).sum(axis=1)
    actual = prompt_tokens * 0.1 + outputs  # prefill is ~10x cheaper per token than decode
    est = prompt_tokens * 0.1 + n * max_tokens  # what shard.py can know before generating
    # contiguous units cut at target fractions of the estimated work, like shard.plan_shards
    sizes = tapered_unit_sizes(tasks)
    if not taper:  # as many units, all of equal estimated work
        sizes = [1.0 / len(sizes)] * len(sizes)
    cum = np.cumsum(est)
    cuts = np.searchsorted(cum, cum[-1] * np.cumsum(sizes)[:-1])
    bounds = np.unique(np.concatenate([[0], cuts, [prompts]]))[:-1]
    work, est_units = np.add.reduceat(actual, bounds), np.add.reduceat(est, bounds)
    static_work = np.add.reduceat(actual, np.arange(tasks) * prompts_per_task)
    speed = tokens_per_s * rng.lognormal(0.0, 0.2, tasks)
    speed[rng.random(tasks) < 0.05] *= 0.5  # degraded nodes
    nominal = work.sum() / speed.sum()
    load_s = 120.0
    late = rng.random(tasks) < 0.2  # a busy queue: a fifth of the tasks start up to 20% of the run late
    start = load_s + np.where(late, rng.uniform(0, 0.2 * nominal, tasks), rng.uniform(0, 60, tasks))
    death = np.full(tasks, np.inf)
    victim = int(rng.integers(tasks))
    death[victim] = max(0.4 * nominal + load_s, start[victim] + 60)
    return Workload(work, est_units, static_work, speed, start, death, unit_switch_s=3.0, requeue_s=600.0)


def fluid_ideal(w: Workload) -> float:
    """Earliest T with sum_i speed_i * (min(T, death_i) - start_i)+ >= total work (bisection)."""
    total = w.work.sum()
    lo, hi = 0.0, float(w.start.max() + total / w.speed.min())

    def capacity(t: float) -> float:
        return float((w.speed * np.clip(np.minimum(t, w.death) - w.start, 0, None)).sum())

    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if capacity(mid) < total else (lo, mid)
    return hi


def simulate_static(w: Workload) -> float:
    """Makespan with contiguous shard i on task i; the killed task's shard resumes after a requeue wait."""
    finish = []
    for i, speed in enumerate(w.speed):
        end = w.start[i] + w.static_work[i] / speed
        if end > w.death[i]:  # killed: requeued, resumes from its checkpoint on a task of the same speed
            done = (w.death[i] - w.start[i]) * speed
            end = w.death[i] + w.requeue_s + (w.static_work[i] - done) / speed
        finish.append(end)
    return float(max(finish))


class VirtualClock:
    """The simulation's time; the claim code reads it through ClaimBoard(clock=...)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate_dynamic(w: Workload, root: Path, lease_s: float = 120.0) -> dict[str, float]:
    """Makespan with every task claiming units through the real ClaimBoard on a run directory under root."""
    run_dir = RunDir(root)
    clock = VirtualClock()
    order = sorted(range(len(w.est)), key=lambda u: (-w.est[u], u))
    done: set[int] = set()
    is_done = done.__contains__
    boards = [
        ClaimBoard(run_dir, f"task{i}", order=order, lease_s=lease_s, margin_s=lease_s / 8, clock=clock)
        for i in range(len(w.speed))
    ]
    holding: list[Claim | None] = [None] * len(boards)
    events: list[tuple[float, int, str, int, Claim | None]] = []
    seq = 0
    stats = {"claims": 0, "reclaims": 0, "lost_work": 0.0, "duplicates": 0, "renewals": 0, "last_exit": 0.0}

    def push(t: float, kind: str, task: int, claim: Claim | None = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, task, claim))

    def try_claim(task: int) -> None:
        claim = boards[task].claim_next(is_done)
        if claim is None:
            if boards[task].retry_at is not None:
                push(boards[task].retry_at, "claim", task)
            else:
                stats["last_exit"] = max(stats["last_exit"], clock.now)
            return
        stats["claims"] += 1
        stats["reclaims"] += claim.generation > 0
        holding[task] = claim
        push(clock.now + w.unit_switch_s + w.work[claim.shard] / w.speed[task], "finish", task, claim)
        push(clock.now + boards[task].renew_every, "renew", task, claim)

    for i, t in enumerate(w.start):
        push(float(t), "claim", i)
    for i, t in enumerate(w.death):
        if np.isfinite(t):
            push(float(t), "kill", i)
    makespan = 0.0
    trace: list[tuple[float, float, int, int, int]] = []
    stats["trace"] = trace  # type: ignore[assignment]
    while events:
        t, _, kind, task, claim = heapq.heappop(events)
        clock.now = t
        if clock.now >= w.death[task] and kind != "kill":
            continue
        if kind == "kill":
            if holding[task] is not None:  # its unit's progress is lost: redone by whoever reclaims it
                stats["lost_work"] += (t - holding[task].acquired) * w.speed[task]
            holding[task] = None
        elif kind == "claim":
            try_claim(task)
        elif kind == "renew" and holding[task] is claim:
            stats["renewals"] += 1
            if boards[task].renew(claim):
                push(t + boards[task].renew_every, "renew", task, claim)
            else:  # lost it (never happens without clock skew): drop the unit and move on
                stats["lost_work"] += (t - claim.acquired) * w.speed[task]
                holding[task] = None
                try_claim(task)
        elif kind == "finish" and holding[task] is claim:
            if claim.shard in done:
                stats["duplicates"] += 1
            done.add(claim.shard)
            trace.append((claim.acquired, t, task, claim.shard, claim.generation))
            makespan = max(makespan, t)
            boards[task].release(claim)
            holding[task] = None
            try_claim(task)
    stats["makespan"] = makespan
    stats["complete"] = float(len(done) == len(w.work))
    return stats


def run(tasks_list: list[int], lease_s: float, seed: int) -> list[dict[str, float]]:
    """Simulate each array size: static, dynamic with equal units, dynamic with tapered units (same prompts)."""
    rows = []
    for tasks in tasks_list:
        row: dict[str, float] = {"tasks": tasks, "sim_s": 0.0, "reclaims": 0.0, "duplicates": 0.0, "complete": 1.0}
        for taper in (False, True):
            w = make_workload(tasks, taper=taper, seed=seed)
            tmp = Path(tempfile.mkdtemp(prefix="hpcr-sim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
            try:
                started = time.perf_counter()
                dyn = simulate_dynamic(w, tmp / "run", lease_s=lease_s)
                row["sim_s"] += time.perf_counter() - started
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            key = "tapered" if taper else "equal"
            row[f"{key}_units"] = len(w.work)
            row[f"{key}_h"] = dyn["makespan"] / 3600
            row["reclaims"] += dyn["reclaims"]
            row["duplicates"] += dyn["duplicates"]
            row["complete"] = min(row["complete"], dyn["complete"])
        row["ideal_h"] = fluid_ideal(w) / 3600
        row["naive_h"] = w.work.sum() / (tasks * w.speed.mean()) / 3600
        row["static_h"] = simulate_static(w) / 3600
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, float]]) -> None:
    print(
        f"{'tasks':>5} {'units':>6} {'W/tasks h':>9} {'ideal h':>7} | {'static h':>8} {'/ideal':>6} | "
        f"{'equal h':>7} {'/ideal':>6} | {'tapered h':>9} {'/ideal':>6} | {'static/tapered':>14} "
        f"{'reclaims':>8} {'dup':>3} {'complete':>8} {'sim s':>5}"
    )
    for r in rows:
        ideal = r["ideal_h"]
        print(
            f"{r['tasks']:>5.0f} {r['tapered_units']:>6.0f} {r['naive_h']:>9.2f} {ideal:>7.2f} | "
            f"{r['static_h']:>8.2f} {r['static_h'] / ideal:>6.3f} | {r['equal_h']:>7.2f} {r['equal_h'] / ideal:>6.3f} | "
            f"{r['tapered_h']:>9.2f} {r['tapered_h'] / ideal:>6.3f} | {r['static_h'] / r['tapered_h']:>14.2f} "
            f"{r['reclaims']:>8.0f} {r['duplicates']:>3.0f} {'yes' if r['complete'] else 'NO':>8} {r['sim_s']:>5.1f}"
        )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 64, 512], help="array sizes to simulate")
    parser.add_argument("--lease-s", type=float, default=120.0, help="claim lease, seconds of virtual time")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    logging.getLogger("hpcrollout").setLevel(logging.ERROR)  # reclaim notices would flood the table
    rows = run(args.tasks, args.lease_s, args.seed)
    print_table(rows)
    return 0 if all(r["complete"] and not r["duplicates"] for r in rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
