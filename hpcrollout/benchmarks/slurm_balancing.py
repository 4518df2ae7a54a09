"""Makespan of dynamic vs static sharding on a real SLURM cluster, and a task killed mid-run in dynamic mode.

    python -m hpcrollout.benchmarks.slurm_balancing [--prompts 800] [--tasks 4] [--conditions all-free,busy]

One input, one config (CPU transformers backend, the tiny random model), run as a SLURM array of --tasks
tasks (one fake GPU each) in static mode and in dynamic mode, side by side, under two queue conditions:
- all-free: every task starts at once;
- busy: another job holds --busy-gpus of the GPUs for the whole run, so the last task(s) start only when an
  earlier task of the array ends (what a busy queue does to an array).
Output lengths are long-tailed and exact: a per-prompt max_tokens column (lognormal) with sampling.ignore_eos,
so both modes do identical work and, with the same seeds, produce identical rows.

Makespan: from submitting the array to the last shard's completion marker (the run's results are all in); a
task that starts after the work is gone and exits at once does not count. Then a separate dynamic run loses two
tasks while each holds a claim mid-unit: one SIGKILLed (a dead node; its unit is reclaimed once the lease,
--lease seconds, runs out) and one scancelled (SIGTERM: it releases its unit, taken over at once). The merged
output must hold every (uid, sample index) exactly once and equal the static run's merged output row for row.

Caveat for small machines: the test cluster's tasks share the node's real cores. A task that finishes early
hands its CPU to the others, so static mode's idle tail is partly hidden; on separate GPUs it is not.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpcrollout.config import RunConfig, build_config
from hpcrollout.executors.jobs import latest_jobs, task_of_job
from hpcrollout.executors.slurm import squeue_states
from hpcrollout.rundir import RunDir, read_json
from hpcrollout.status import format_status, run_status

log = logging.getLogger("hpcrollout")
TOPICS = ["primes", "tides", "bread", "stars", "rivers", "music", "chess", "clouds", "glaciers", "maps"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- workload
def make_input(path: Path, args: argparse.Namespace) -> np.ndarray:
    """Chat prompts with a long-tailed per-prompt max_tokens column (lognormal, capped); returns the lengths."""
    rng = np.random.default_rng(args.seed)
    lengths = np.minimum(
        args.max_tokens, np.maximum(1, rng.lognormal(np.log(args.median_tokens), args.sigma, args.prompts))
    )
    lengths = lengths.astype(np.int64)
    prompts = [
        [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, part {i}."}]
        for i in range(args.prompts)
    ]
    table = pa.table({"id": [f"p{i:05d}" for i in range(args.prompts)], "prompt": prompts, "max_tokens": lengths})
    pq.write_table(table, path)
    return lengths


def bench_config(args: argparse.Namespace, model: Path, inp: Path, run_dir: Path, mode: str) -> RunConfig:
    return build_config(
        {
            "run_dir": str(run_dir),
            "backend": "transformers",
            "data": {"input": str(inp), "id_column": "id", "max_tokens_column": "max_tokens"},
            "model": {"path": str(model)},
            "sampling": {
                "n": args.n,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "seed": args.seed,
                "ignore_eos": True,
            },
            "sharding": {"mode": mode, "lease_seconds": args.lease},
            "checkpoint": {"every_prompts": 4, "every_seconds": 5, "heartbeat_seconds": 5},
            "executor": {"type": "slurm", "num_tasks": args.tasks},
            "slurm": {
                "cpus_per_task": 1,
                "gpus_per_task": 1,
                "time_min": 30,
                "job_name": f"hpcr-bench-{mode}",
                "max_retries": 0,
                "max_requeues": 0,
                # the tasks share a few real cores: one thread each, as one GPU each would be on a real node
                "setup": ["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"],
            },
        }
    )


# ---------------------------------------------------------------------------------------------- the queue
def hold_gpus(count: int) -> str:
    """Another user's job holding `count` GPUs until cancelled; returns once it runs."""
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--gres=gpu:{count}",
            "-c",
            "1",
            "-J",
            "hpcr-bench-busy",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 3600",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    job = out.split(";")[0]
    deadline = time.time() + 120
    while (squeue_states([job]) or {}).get(job, {}).get("state") != "RUNNING":
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            raise SystemExit(
                f"the blocker job could not get {count} GPU(s) within 120 s: is the cluster busy? (squeue)"
            )
        time.sleep(0.2)
    return job


def foreign_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def run_array(config: RunConfig, watch=None, poll_s: float = 0.5, timeout_s: float = 600) -> dict[str, Any]:  # noqa: ANN001
    """Submit the run's array and wait for it to leave the queue; watch(rundir, t0) is called every poll."""
    from hpcrollout.shard import prepare_run
    from hpcrollout.submit import submit_run

    rundir = prepare_run(config)
    t0 = time.time()
    result = submit_run(config)
    jobs = list(latest_jobs(rundir).values())
    arrays = sorted({j.split("_")[0] for j in jobs})
    while True:
        if watch is not None:
            watch(rundir, t0)
        queued = squeue_states(arrays) or {}
        if not any(j in queued for j in jobs):
            break
        if time.time() - t0 > timeout_s:
            subprocess.run(["scancel", *arrays])
            raise SystemExit(f"{rundir.root}: the array did not finish within {timeout_s:.0f} s; cancelled it")
        time.sleep(poll_s)
    array_end = time.time()
    return {"rundir": rundir, "t0": t0, "array_end": array_end, "job_id": result.get("job_id"), **timeline(rundir, t0)}


def timeline(rundir: RunDir, t0: float) -> dict[str, Any]:
    """Last completion time, and per task: start, end, units finished (from task records, markers, heartbeats)."""
    from hpcrollout.executors.slurm_task import read_task_record

    manifest = rundir.manifest()
    finished = []
    by_job = task_of_job(rundir)
    units: dict[int, int] = {}
    for s in manifest["shards"]:
        if rundir.is_done(s["shard"]):
            finished.append(float(read_json(rundir.done_marker(s["shard"]))["finished"]))
            hb = read_json(rundir.heartbeat(s["shard"]))
            job = (
                f"{hb.get('slurm_array_job_id')}_{hb.get('slurm_array_task_id')}"
                if hb.get("slurm_array_job_id")
                else str(hb.get("slurm_job_id"))
            )
            task = by_job.get(job, -1)
            units[task] = units.get(task, 0) + 1
    tasks = []
    for task, job in sorted(latest_jobs(rundir).items()):
        rec = read_task_record(rundir, task)
        end = rec.get("time") if rec.get("state") == "done" else None
        tasks.append(
            {
                "task": task,
                "job": job,
                "state": rec.get("state", "never started"),
                "units": units.get(task, 0),
                "start": rec["started"] - t0 if rec.get("started") else None,
                "end": end - t0 if end else None,
            }
        )
    complete = len(finished) == len(manifest["shards"])
    return {"makespan": max(finished) - t0 if complete else None, "units": len(manifest["shards"]), "tasks": tasks}


def task_lines(res: dict[str, Any], killed: dict[int, str] | None = None) -> list[str]:
    def t(x: float | None) -> str:
        return f"{x:6.1f}" if x is not None else "     -"

    killed = killed or {}
    return [
        f"    task {r['task']} ({r['job']}): start {t(r['start'])} s, end {t(r['end'])} s, {r['units']:>3} unit(s), "
        + (f"killed ({killed[r['task']]})" if r["task"] in killed else r["state"])
        for r in res["tasks"]
    ]


# ---------------------------------------------------------------------------------------------- killing a task
class Killer:
    """Once --kill-at of the work is done, stop two tasks that hold a claim mid-unit, then log the takeovers.

    One is SIGKILLed (a node dying, an OOM kill: its claim stays until the lease runs out); the other gets
    `scancel` (SIGTERM: it commits what finished and releases its claim, so another task takes the unit at once).
    SLURM turns `scancel --signal=KILL` into the same SIGTERM-first termination, so the death is a SIGKILL of
    the task's process (this node's tasks are reachable: the benchmark runs on the cluster's only node).
    """

    def __init__(self, at_fraction: float, lease_s: float, how: list[str]) -> None:
        self.at, self.lease_s, self.how = at_fraction, lease_s, how
        self.victims: list[dict[str, Any]] = []
        self.snapshots: list[tuple[str, str]] = []  # (when, status excerpt)

    def __call__(self, rundir: RunDir, t0: float) -> None:
        if not self.victims:
            self._maybe_kill(rundir, t0)
            return
        for v in self.victims:
            if "reclaim" in v:
                continue
            nxt = rundir.claims_dir / f"{v['shard']:05d}.g{v['generation'] + 1}"
            if nxt.exists() and not (data := read_json(nxt)).get("abandoned"):
                v["reclaim"] = {"t": data["acquired"] - t0, "owner": data["owner"]}
            elif v["how"] == "sigkill" and not self.snapshots and time.time() - v["at"] > self.lease_s * 0.9:
                when = f"{time.time() - t0:.1f} s, {time.time() - v['at']:.1f} s after the SIGKILL"
                self.snapshots.append((when, _status_rows(rundir, [x["shard"] for x in self.victims])))

    def _maybe_kill(self, rundir: RunDir, t0: float) -> None:
        from hpcrollout.claims import ClaimBoard
        from hpcrollout.executors.slurm_task import read_task_record
        from hpcrollout.worker import committed_parts, read_rows

        shards = {s["shard"]: s for s in rundir.manifest()["shards"]}
        if _work_done(rundir, shards) < self.at:
            return
        by_job = task_of_job(rundir)
        pending = [i for i in shards if not rundir.is_done(i)]
        board = ClaimBoard(rundir, owner="benchmark", order=pending, lease_s=self.lease_s)
        candidates: dict[str, tuple[int, int, dict[str, Any], int, int]] = {}  # per job: its best unit
        for shard, claim in board.status().items():
            job = f"{claim.get('slurm_array_job_id')}_{claim.get('slurm_array_task_id')}"
            total = shards[shard]["rows"][1] - shards[shard]["rows"][0]
            committed = len(set(read_rows(committed_parts(rundir, shard))))
            # mid-unit: some of its prompts committed, more still to generate
            mid = claim["state"] == "held" and job in by_job and 0 < committed < total
            if mid and (job not in candidates or total - committed > candidates[job][0]):
                candidates[job] = (total - committed, shard, claim, committed, total)
        if len(candidates) < len(self.how):
            return
        picked = sorted(candidates.items(), key=lambda kv: -kv[1][0])[: len(self.how)]
        for how, (job, (_, shard, claim, committed, total)) in zip(self.how, picked, strict=True):
            task = by_job[job]
            if how == "sigkill":
                os.kill(int(read_task_record(rundir, task)["pid"]), signal.SIGKILL)
            else:
                subprocess.run(["scancel", job], check=True)
            self.victims.append(
                {
                    "how": how,
                    "task": task,
                    "job": job,
                    "shard": shard,
                    "generation": claim["generation"],
                    "committed": committed,
                    "prompts": total,
                    "at": time.time(),
                    "t": time.time() - t0,
                }
            )
            say(f"{how}: task {task} (job {job}) holding shard {shard:05d} ({committed}/{total} prompts committed)")


def _work_done(rundir: RunDir, shards: dict[int, dict[str, Any]]) -> float:
    """Fraction of the estimated work done: finished shards, plus running ones by their heartbeats."""
    done = 0.0
    for i, s in shards.items():
        if rundir.is_done(i):
            done += s["est_work"]
        elif rundir.heartbeat(i).exists():
            try:
                hb = read_json(rundir.heartbeat(i))
            except Exception:  # noqa: BLE001 - a heartbeat being replaced: count it next time
                continue
            done += s["est_work"] * hb.get("prompts_done", 0) / max(1, hb.get("prompts_total") or 1)
    return done / max(1e-9, sum(s["est_work"] for s in shards.values()))


def _status_rows(rundir: RunDir, shards: list[int]) -> str:
    """The tasks and claims lines and these shards' rows of `hpcrollout status`."""
    lines = format_status(run_status(rundir.root)).splitlines()
    keep = [ln for ln in lines if ln.startswith(("tasks:", "claims:", "expired claims"))]
    keep.append(next((ln for ln in lines if ln.lstrip().startswith("shard ")), ""))
    keep += [ln for ln in lines if ln.split()[:1] in ([str(s)] for s in shards)]
    return "\n".join(keep)


# ---------------------------------------------------------------------------------------------- checking
def merged_check(rundir: RunDir, out: Path, expected_pairs: int, reference: pa.Table | None) -> dict[str, Any]:
    from hpcrollout.merge import merge_run

    merge_run(rundir.root, out)
    merged = pq.read_table(out)
    uids, seeds = merged["uid"].to_pylist(), merged["sample_seeds"].to_pylist()
    keys = [(u, i) for u, s in zip(uids, seeds, strict=True) for i in range(len(s))]
    distinct = len(set(keys))
    return {
        "table": merged,
        "prompts": merged.num_rows,
        "pairs": len(keys),
        "distinct": distinct,
        "lost": expected_pairs - distinct,
        "doubled": len(keys) - distinct,
        "equal": None if reference is None else merged.equals(reference),
    }


# ---------------------------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %G"], capture_output=True, text=True).stdout.split()
    return f"{cpu}, {os.cpu_count()} cores; SLURM node {' '.join(nodes)}"


def run(args: argparse.Namespace) -> int:
    from hpcrollout.tinymodel import build_tiny_model

    base = Path(args.dir).resolve() / time.strftime("run-%Y%m%d-%H%M%S")
    base.mkdir(parents=True)
    started = time.time()
    if others := foreign_jobs():
        say(f"warning: other jobs are on the cluster and will skew the timings: {others}")
    model = build_tiny_model(base / "model")
    inp = base / "in.parquet"
    lengths = make_input(inp, args)
    pairs = args.prompts * args.n
    print(f"machine: {machine()}")
    print(
        f"workload: {args.prompts} prompts x n={args.n}, per-prompt max_tokens lognormal(median {args.median_tokens}, "
        f"sigma {args.sigma}) capped at {args.max_tokens}, ignore_eos: mean {lengths.mean():.0f}, p50 "
        f"{np.percentile(lengths, 50):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()} tokens; "
        f"{int(lengths.sum())} decode steps in all; {args.tasks} array tasks, 1 fake GPU + 1 CPU each"
    )
    results: dict[tuple[str, str], dict[str, Any]] = {}
    reference = None
    for condition in args.conditions:
        for mode in ("static", "dynamic"):
            config = bench_config(args, model, inp, base / f"{condition}-{mode}", mode)
            blocker = hold_gpus(args.busy_gpus) if condition == "busy" else None
            say(f"{condition}: {mode} run" + (f" (job {blocker} holds {args.busy_gpus} GPU)" if blocker else ""))
            try:
                res = run_array(config)
            finally:
                if blocker:
                    subprocess.run(["scancel", blocker])
            check = merged_check(res["rundir"], base / f"{condition}-{mode}.parquet", pairs, reference)
            if reference is None:
                reference = check["table"]
            res["check"] = check
            results[(condition, mode)] = res
            say(f"{condition}/{mode}: makespan {res['makespan']:.1f} s, {res['units']} units")

    print()
    print("makespan = submit -> last unit's completion marker (s); per task: start and end after submit")
    for condition in args.conditions:
        st, dy = results[(condition, "static")], results[(condition, "dynamic")]
        what = "every task starts at once" if condition == "all-free" else f"{args.busy_gpus} GPU held by another job"
        print(f"{condition} ({what}):")
        for mode, res in (("static", st), ("dynamic", dy)):
            c = res["check"]
            print(
                f"  {mode:<7} makespan {res['makespan']:6.1f} s  ({res['units']} units; merged: {c['pairs']} (uid, sample) pairs, "
                f"{c['lost']} lost, {c['doubled']} doubled{'' if c['equal'] is None else ', identical to static' if c['equal'] else ', DIFFERS from static'})"
            )
            print("\n".join(task_lines(res)))
        print(f"  ratio dynamic/static: {dy['makespan'] / st['makespan']:.3f}")

    if args.kill:
        config = bench_config(args, model, inp, base / "kill-dynamic", "dynamic")
        killer = Killer(args.kill_at, args.lease, ["sigkill", "scancel"])
        say("dynamic run with one task SIGKILLed and one scancelled mid-unit")
        res = run_array(config, watch=killer, poll_s=0.2)
        print()
        print(f"killed tasks (dynamic, lease {args.lease:.0f} s, every task starts at once):")
        if not killer.victims:
            print("  no two tasks held a unit mid-way (the run ended first); use more --prompts or a lower --kill-at")
        for v in killer.victims:
            what = "SIGKILL of its process" if v["how"] == "sigkill" else f"scancel {v['job']} (SIGTERM)"
            print(
                f"  {what}: task {v['task']} at {v['t']:.1f} s, holding shard {v['shard']:05d} with "
                f"{v['committed']}/{v['prompts']} prompts committed"
            )
            if "reclaim" in v:
                r = v["reclaim"]
                print(
                    f"    shard {v['shard']:05d} taken over {r['t'] - v['t']:.1f} s later by {r['owner']} (generation {v['generation'] + 1})"
                )
            else:
                print(f"    shard {v['shard']:05d} was not taken over (it was finished before: see its marker)")
        for when, text in killer.snapshots:
            print(f"  hpcrollout status at {when}:")
            print("\n".join("    " + ln for ln in text.splitlines()))
        print("\n".join(task_lines(res, {v["task"]: v["how"] for v in killer.victims})))
        if res["makespan"] is None:
            print("  run INCOMPLETE: some units have no completion marker")
            return 1
        c = merged_check(res["rundir"], base / "kill-dynamic.parquet", pairs, reference)
        print(
            f"  makespan {res['makespan']:.1f} s; merged: {c['prompts']} prompts, {c['pairs']} (uid, sample) pairs, "
            f"{c['distinct']} distinct: {c['lost']} lost, {c['doubled']} doubled; identical to the static run's output: "
            f"{'yes' if c['equal'] else 'NO'}"
        )
        if c["lost"] or c["doubled"] or not c["equal"]:
            return 1
    print(f"\n(total benchmark time {time.time() - started:.0f} s; run directories under {base})")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=800)
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--median-tokens", type=float, default=32.0, help="median per-prompt output length")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the output lengths (long tail)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="cap on a prompt's output length")
    parser.add_argument("--tasks", type=int, default=4, help="array tasks (one fake GPU each)")
    parser.add_argument(
        "--conditions",
        default="all-free,busy",
        type=lambda s: [c for c in s.split(",") if c],
        help="comma-separated: all-free, busy",
    )
    parser.add_argument("--busy-gpus", type=int, default=1, help="busy condition: GPUs another job holds")
    parser.add_argument("--lease", type=float, default=10.0, help="sharding.lease_seconds")
    parser.add_argument("--no-kill", dest="kill", action="store_false", help="skip the killed-tasks run")
    parser.add_argument("--kill-at", type=float, default=0.25, help="kill once this fraction of the work is done")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", default="/tmp/hpcrollout-slurm-balancing", help="where run directories go")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")


def main(args: argparse.Namespace) -> int:
    bad = [c for c in args.conditions if c not in ("all-free", "busy")]
    if bad:
        raise SystemExit(f"--conditions: unknown {bad}; use all-free and/or busy")
    return run(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
