"""`hpcrollout status RUN_DIR [--watch] [--json]`: the text report of where a run stands (state.py derives it).

Per shard: state, progress, throughput, ETA; the slowest shards; failures with log tails; with
executor.engines_per_task > 1, each engine (host, pid, GPUs, shard, tok/s). --json prints state.run_status as is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from hpcrollout.executors.slurm import ACTIVE_STATES
from hpcrollout.state import run_status

__all__ = ["format_status", "run_status", "id_ranges", "main"]

RATE_WINDOW_S = 300.0
MAX_TABLE_ROWS = 40


# ---------------------------------------------------------------------------------------------- text
def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_status(st: dict[str, Any], rate: float | None = None) -> str:
    """The human-readable report."""
    p, smp = st["prompts"], st["samples"]
    pct = 100.0 * p["done"] / p["total"] if p["total"] else 100.0
    order = ("done", "running", "requeued", "pending", "failed")
    counts = ", ".join(f"{st['counts'][k]} {k}" for k in order if st["counts"].get(k))
    lines = [
        f"run {st['run_dir']}: {len(st['shards'])} shards ({counts}), {st['num_tasks']} tasks, {st['mode']}",
        f"prompts {p['done']}/{p['total']} ({pct:.1f}%), samples {smp['done']}/{smp['total']}, output tokens {st['output_tokens']}",
    ]
    eta = "done" if st["complete"] else _dur(st["eta_s"])
    if st.get("eta_basis"):
        eta += f" ({st['eta_basis']} left at the current rate)"
    line = f"throughput {st['tokens_per_s']:,.1f} generated tok/s (running engines, live), ETA {eta}"
    if rate is not None:
        line += f"; committed {rate:,.1f} output tok/s over the last {RATE_WINDOW_S / 60:.0f} min"
    lines.append(line)
    if not (st["scheduler"]["squeue"] or st["scheduler"]["sacct"]):
        lines.append("(no squeue/sacct here: states come from the run directory only)")
    elif not st["scheduler"]["sacct"]:
        lines.append("(no sacct here: finished or cancelled jobs are known only from the run directory)")
    if any(t.get("job_id") for t in st["tasks"]):
        lines.append("tasks: " + task_summary(st["tasks"]))
    lines += [engine_line(e) for e in st.get("engines") or [] if e["state"] != "exited" or e["exit_code"]]
    dynamic = st.get("claims") is not None
    if dynamic and not st["complete"]:
        lines.append("claims: " + claims_line(st))
    lines.append("")
    claim_head = f" {'claim':<11} {'lease':>6} holder" if dynamic else ""
    rows = st["shards"]
    big = len(rows) > MAX_TABLE_ROWS
    if big:  # big runs: the shards that need attention, not hundreds of done ones
        rank = {"failed": 0, "running": 1, "requeued": 2, "pending": 3}
        rows = [e for e in rows if e["state"] != "done"]
        if dynamic:  # never-claimed units are counted on the claims line
            rows = [e for e in rows if e["state"] != "pending" or e.get("claim")]
        rows = sorted(rows, key=lambda e: (rank.get(e["state"], 4), e["shard"]))
        left_out = len(rows) - min(len(rows), MAX_TABLE_ROWS)
        rows = rows[:MAX_TABLE_ROWS]
    if rows:
        lines.append(
            f"{'shard':>5} {'task':>4} {'job':>12} {'state':<9} {'prompts':>13} {'tok/s':>8} {'eta':>7} {'requeues':>8} {'retries':>7}"
            + claim_head
        )
    for e in rows:
        prompts = f"{e['prompts_done']}/{e['prompts_total']}"
        tok = f"{e['tokens_per_s']:.1f}" if "tokens_per_s" in e else "-"
        eta = _dur(e.get("eta_s")) if e["state"] == "running" else "-"
        task = "-" if e["task"] is None else str(e["task"])
        lines.append(
            f"{e['shard']:>5} {task:>4} {e.get('job_id') or '-':>12} {e['state']:<9} {prompts:>13} {tok:>8} {eta:>7} {e.get('requeues', 0):>8} {e.get('retries', 0):>7}"
            + (claim_cells(e.get("claim")) if dynamic else "")
        )
    if big:
        done = st["counts"].get("done", 0)
        unlisted = [f"{done} done"] if done else []
        if dynamic and st["claims"] and st["claims"]["unclaimed"]:
            unlisted.append(f"{st['claims']['unclaimed']} not claimed yet")
        if left_out:
            unlisted.append(f"{left_out} past the first {MAX_TABLE_ROWS}")
        lines.append(f"(not listed: {', '.join(unlisted)}; --json lists all)")
    if st["slowest"]:
        lines.append("")
        lines.append(
            "slowest running shards: "
            + ", ".join(
                f"{e['shard']} ({e['prompts_done']}/{e['prompts_total']}, eta {_dur(e.get('eta_s'))}, on {e.get('host')})"
                for e in (st["shards"][i] for i in st["slowest"])
            )
        )
    if st.get("notes"):
        lines.append("")
        lines += [f"note: {n}" for n in st["notes"]]
    for f in st["failed"]:
        lines.append("")
        cancelled = str(f["slurm_state"] or "").startswith("CANCELLED")
        exit_code = "" if cancelled or f["exit_code"] in (None, "", "0:0") else f", exit {f['exit_code']}"
        what = f"task {f['task']}" + (f" (job {f['job_id']}, {f['slurm_state']}{exit_code})" if f["job_id"] else "")
        head = "CANCELLED" if cancelled else "FAILED"  # a deliberate scancel is not a failure of the task
        lines.append(f"{head} {what}: shards {', '.join(map(str, f['shards']))}; attempts that raised: {f['failures']}")
        if f["error"]:
            lines.append(f"  error: {f['error']}")
        if f["log"]:
            lines.append(f"  last lines of {f['log']}:")
            lines += ["    " + line for line in (f["log_tail"] or "(empty)").splitlines()]
    for ray_lines in st.get("ray", {}).values():
        lines += ["", *ray_lines]
    if st["failed"]:
        lines.append("")
        lines.append(f"rerun the failed shards with: {st['resume_command']}")
    elif st["complete"]:
        lines.append("")
        lines.append(f"complete; merge with: hpcrollout merge {st['run_dir']} --output OUT.parquet")
    return "\n".join(lines)


def engine_line(e: dict[str, Any]) -> str:
    """'task 0 engine 1: pid 4242 on node7, GPUs 2,3, shard 5, 812.0 tok/s, running'."""
    shards = ("shard " + ",".join(map(str, e["shards"]))) if e["shards"] else "no shard"
    state = e["state"] + (f" (exit code {e['exit_code']})" if e["state"] == "exited" else "")
    return (
        f"task {e['task']} engine {e['engine']}: pid {e['pid']} on {e['host']}, GPUs {','.join(e['gpus']) or '-'}, "
        f"{shards}, {e['tokens_per_s']:,.1f} tok/s, {state}"
    )


def id_ranges(xs: list[int]) -> str:
    """Sorted ids as ranges: [0-3,6,8-9]."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return "[" + ",".join(out) + "]"


def task_summary(tasks: list[dict[str, Any]]) -> str:
    """Submitted tasks grouped by scheduler state, ids as ranges: '4 RUNNING [0-3], 4 PENDING [4-7]'."""
    groups: dict[str, list[int]] = {}
    for t in tasks:
        if t.get("job_id"):
            groups.setdefault(t["slurm_state"] or "unknown", []).append(t["task"])
    rank = {"RUNNING": 0, "PENDING": 1, "COMPLETED": 3}
    order = sorted(groups, key=lambda k: (rank.get(k, 2), k))
    return ", ".join(f"{len(groups[k])} {k} {id_ranges(sorted(groups[k]))}" for k in order)


def claims_line(st: dict[str, Any]) -> str:
    """Dynamic mode: unfinished shards by claim state, and the expired claims (holder stopped renewing)."""
    summary = st["claims"]
    parts = [f"{v} {k}" for k, v in sorted(summary["counts"].items())]
    parts.append(f"{summary['unclaimed']} not claimed yet")
    text = ", ".join(parts) + " (of the unfinished shards)"
    expired = [e for e in st["shards"] if e.get("claim", {}).get("state") == "expired"]
    if expired:
        shown = ", ".join(
            f"{e['shard']} ({e['claim'].get('owner')}, {-e['claim']['expires_in']:.0f}s ago)" for e in expired[:5]
        )
        more = f" and {len(expired) - 5} more" if len(expired) > 5 else ""
        text += f"\nexpired claims, taken over by the next task that claims: {shown}{more}"
    return text


def claim_cells(claim: dict[str, Any] | None) -> str:
    """The claim columns of a shard row: state (/gN after a takeover), seconds to lease expiry, holder."""
    if not claim:
        return f" {'-':<11} {'-':>6} -"
    state = claim["state"] + (f"/g{claim['generation']}" if claim.get("generation") else "")
    lease = "-" if claim["state"] == "released" else f"{claim['expires_in']:+.0f}s"
    return f" {state:<11} {lease:>6} {claim.get('owner') or '-'}"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run directory")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=10.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 10) until the run is complete or failed",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def main(args: argparse.Namespace) -> int:
    if args.watch is None:
        st = run_status(args.run_dir)
        print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
        return 0
    history: list[tuple[float, int]] = []
    while True:
        st = run_status(args.run_dir)
        history.append((st["time"], st["output_tokens"]))
        history = [h for h in history if st["time"] - h[0] <= RATE_WINDOW_S]
        rate = None
        if len(history) > 1 and history[-1][0] > history[0][0]:
            rate = max(0.0, (history[-1][1] - history[0][1]) / (history[-1][0] - history[0][0]))
        if args.json:
            print(json.dumps({**st, "window_tokens_per_s": rate}, default=str), flush=True)
        else:
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[2J\x1b[H")
            print(time.strftime("%H:%M:%S"), format_status(st, rate), sep="  ", flush=True)
        active = st["counts"].get("running", 0) + st["counts"].get("requeued", 0) or any(
            t["slurm_state"] in ACTIVE_STATES for t in st["tasks"]
        )
        if st["complete"] or not active:
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
