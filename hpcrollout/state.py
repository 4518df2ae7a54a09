"""Where a run stands, derived: per-shard state, progress, throughput, ETA, failures, engines (status.py prints it).

The run directory is the truth (done markers, heartbeats, task and engine records, jobs.json); the executors'
scheduler queries (executors/slurm.py: squeue, sacct), where present, add what the scheduler knows (queued,
requeued, cancelled, timed out). A shard is one of: pending, running, requeued, failed, done. In dynamic mode each
unfinished shard also shows its claim (held / expired / released / abandoned, holder, lease expiry), read
without writing anything into the run directory. ``run_status`` returns one dict, what ``status --json`` prints.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcrollout import raycluster
from hpcrollout.config import exact_budgets
from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.jobs import latest_jobs, read_jobs, task_of_job
from hpcrollout.executors.local import local_active_tasks, local_task_record
from hpcrollout.executors.slurm import ACTIVE_STATES, sacct_states, squeue_states
from hpcrollout.executors.slurm import task_log as slurm_task_log
from hpcrollout.procs import pid_alive, same_process_alive
from hpcrollout.rundir import RunDir, read_json, static_task

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

LOG_TAIL_LINES = 12


# ---------------------------------------------------------------------------------------------- logs
def log_tail(path: str | Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def task_log(rundir: RunDir, task: int, job_id: str | None, record: dict[str, Any]) -> str | None:
    """The task's stderr log: submitit's for SLURM tasks, logs/local-task-N.log for local ones."""
    if job_id:
        return slurm_task_log(rundir, job_id)
    if record.get("stderr"):
        return record["stderr"]
    local = rundir.local_task_log(task)
    return str(local) if local.exists() else None


# ---------------------------------------------------------------------------------------------- status
# Heartbeat fields status computes with: a heartbeat with one of these not a number is ignored (and noted).
_HEARTBEAT_NUMBERS = (
    "time",
    "started",
    "pid",
    "prompts_total",
    "prompts_done",
    "prompts_done_this_attempt",
    "output_tokens_this_attempt",
    "tokens_per_s",
    "eta_s",
)


def _read_record(path: Path, what: str, notes: list[str]) -> dict[str, Any]:
    """A heartbeat or done marker as a dict with numeric fields, or {} (absent, or damaged: noted, not fatal)."""
    try:
        record = read_json(path)
    except FileNotFoundError:
        return {}
    except HpcRolloutError:
        notes.append(f"{path} is not valid JSON; ignored it ({what})")
        return {}
    if not isinstance(record, dict) or any(
        record.get(k) is not None and (isinstance(record[k], bool) or not isinstance(record[k], (int, float)))
        for k in (*_HEARTBEAT_NUMBERS, "samples", "output_tokens")
    ):
        notes.append(f"{path} does not hold a {what} record; ignored it")
        return {}
    return record


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Everything status shows, as one dict (what --json prints)."""
    from hpcrollout.executors.slurm_task import read_task_record

    rundir = RunDir(run_dir)
    rundir.require()
    now = time.time()
    manifest = rundir.manifest()
    try:
        config = rundir.load_config()
        n, hb_every, lease_s = config.sampling.n, config.checkpoint.heartbeat_seconds, config.sharding.lease_seconds
    except HpcRolloutError:
        config, n, hb_every, lease_s = None, 1, 30.0, 120.0
    num_tasks = int(manifest["num_tasks"])
    dynamic = manifest.get("mode") == "dynamic"
    notes: list[str] = []  # damaged or surprising files, shown under the table
    try:
        jobs_doc = read_jobs(rundir)
    except HpcRolloutError as exc:
        notes.append(str(exc))
        jobs_doc = {"submissions": []}
    jobs = latest_jobs(rundir, jobs_doc)
    arrays = sorted({j.split("_")[0] for j in jobs.values()})
    queued = squeue_states(arrays)
    acct = sacct_states(arrays)
    submissions = jobs_doc["submissions"]
    submitted = {int(t) for s in submissions for t in s.get("tasks", [])}
    local_exit: dict[int, int] = {}  # the latest local submission's exit code per task, once it has ended
    for sub in submissions:  # (older runs kept them in jobs.json; now each task's local record has its own)
        if sub.get("executor") == "local" and isinstance(sub.get("exit_codes"), dict):
            local_exit.update(
                {int(t): int(c) for t, c in sub["exit_codes"].items() if _int(t) is not None and _int(c) is not None}
            )
    local_live = local_active_tasks(rundir)
    job_task = task_of_job(rundir, jobs_doc) if dynamic else {}
    host = socket.gethostname()

    tasks: dict[int, dict[str, Any]] = {}
    for task in sorted(set(range(num_tasks)) | set(jobs)):
        job_id = jobs.get(task)
        record = read_task_record(rundir, task)
        local = local_task_record(rundir, task)
        if _int(local.get("exit_code")) is not None:
            local_exit[task] = int(local["exit_code"])
        q = (queued or {}).get(job_id or "")
        a = (acct or {}).get(job_id or "")
        sched = q["state"] if q else (a["state"] if a else None)
        if job_id and not q and queued is not None and (sched is None or sched in ACTIVE_STATES):
            # Not queued any more, but accounting has not caught up yet (slurmdbd lags by a second or two).
            sched = "ENDED"
        # The scheduler counts our retry requeues (a task that raised) too: those are reported as retries.
        retries = _int(record.get("retries")) or 0
        sched_requeues = max(q["restarts"] if q else 0, a["requeues"] if a else 0) - retries
        requeues = max(sched_requeues, _int(record.get("requeues")) or 0)
        tasks[task] = {
            "task": task,
            "job_id": job_id,
            "slurm_state": sched,
            "reason": q["reason"] if q else None,
            "exit_code": a["exit_code"] if a else None,
            "requeues": requeues,
            "retries": retries,
            "failures": _int(record.get("failures")) or 0,
            "record_state": record.get("state"),
            "error": record.get("error"),
            "host": record.get("host"),
            "log": task_log(rundir, task, job_id, record),
            "submitted": task in submitted or job_id is not None,
            "local_exit_code": local_exit.get(task),
            "local_active": task in local_live,
        }

    done = rundir.done_shards()
    claims = claim_states(rundir, [s["shard"] for s in manifest["shards"] if s["shard"] not in done], lease_s)
    # dynamic mode: while any task is queued or running, a shard whose holder died is taken over, not failed
    others_active = dynamic and any(t["slurm_state"] in ACTIVE_STATES for t in tasks.values())
    shards = []
    for s in manifest["shards"]:
        i = s["shard"]
        a, b = s["rows"]
        total = b - a
        hb = _read_record(rundir.heartbeat(i), "heartbeat", notes)
        claim = claims.get(i)
        if not dynamic:
            task = static_task(i, num_tasks)
        elif claim and claim["state"] != "released" and (owner := _dynamic_task(claim, job_task)) is not None:
            task = owner  # the claim names the current holder even before its first heartbeat
        else:
            task = _dynamic_task(hb, job_task)
        t = tasks.get(task) if task is not None else None
        entry: dict[str, Any] = {"shard": i, "task": task, "prompts_total": total, "job_id": t["job_id"] if t else None}
        if i in done:
            marker = _read_record(rundir.done_marker(i), "done marker", notes)
            entry.update(
                state="done",
                prompts_done=total,
                samples_done=int(marker.get("samples", total * n)),
                output_tokens=int(marker.get("output_tokens", 0)),
                finished=marker.get("finished"),
                engine=marker.get("engine"),
            )
        else:
            state = _shard_state(hb, t, now, hb_every, host)
            if state == "failed" and others_active:
                state = "pending"
            prompts = int(hb.get("prompts_done", 0)) if hb else 0
            entry.update(
                state=state,
                prompts_done=prompts,
                samples_done=prompts * n,
                output_tokens=int(hb.get("output_tokens_this_attempt", 0)) if hb else 0,
            )
            if hb.get("token_budget_left") is not None:
                entry["token_budget_left"] = int(hb["token_budget_left"])
            if state == "running":
                age = now - float(hb.get("time", now))
                entry.update(
                    tokens_per_s=float(hb.get("tokens_per_s") or 0.0),  # the shard's engine, live
                    prompts_per_s=hb.get("prompts_per_s"),
                    engine_id=hb.get("engine_id"),
                    eta_s=hb.get("eta_s"),
                    eta_basis=hb.get("eta_basis"),
                    host=hb.get("host"),
                    pid=_int(hb.get("pid")),
                    gpus=hb.get("gpus"),
                    heartbeat_age_s=round(age, 1),
                    started=hb.get("started"),
                    prompts_done_this_attempt=int(hb.get("prompts_done_this_attempt", 0)),
                )
        if t:
            entry["requeues"] = t["requeues"]
            entry["retries"] = t["retries"]
        if claim:
            entry["claim"] = claim
        shards.append(entry)

    for i in rundir.lost_outputs():
        notes.append(
            f"shard {i:05d} is marked done but its output {rundir.shard_output(i)} is gone; resume generates it again"
        )
    quarantined = rundir.quarantined()
    if quarantined:
        notes.append(
            f"{len(quarantined)} damaged part file(s) were set aside in {rundir.quarantine_dir} (their prompts are "
            f"generated again), e.g. {quarantined[0]}"
        )
    counts: dict[str, int] = {}
    for e in shards:
        counts[e["state"]] = counts.get(e["state"], 0) + 1
    prompts_total = sum(e["prompts_total"] for e in shards)
    prompts_done = sum(e["prompts_done"] for e in shards)
    running = [e for e in shards if e["state"] == "running"]
    tps, prompt_rate = _engine_rates(running, now)
    eta, eta_basis = None, None
    if config is not None and exact_budgets(config):
        if tps > 0:
            left = sum(_token_budget_left(rundir, e, config) for e in shards if e["state"] != "done")
            eta, eta_basis = left / tps, "tokens"
    elif prompt_rate > 0:
        eta, eta_basis = (prompts_total - prompts_done) / prompt_rate, "prompts"
    failed_tasks = sorted({e["task"] for e in shards if e["state"] == "failed" and e["task"] is not None})
    failures = []
    for task in failed_tasks:
        t = tasks[task]
        failures.append(
            {
                "task": task,
                "job_id": t["job_id"],
                "shards": [e["shard"] for e in shards if e["task"] == task and e["state"] == "failed"],
                "slurm_state": t["slurm_state"],
                "exit_code": t["exit_code"],
                "failures": t["failures"],
                "error": t["error"],
                "log": t["log"],
                "log_tail": log_tail(t["log"]),
            }
        )
    slowest = sorted(running, key=lambda e: -(e.get("eta_s") or 0.0))[:3]
    engines = engine_states(rundir, running, host)
    return {
        "run_dir": str(rundir.root),
        "time": now,
        "num_tasks": num_tasks,
        "mode": manifest.get("mode", "static"),
        "scheduler": {"squeue": queued is not None, "sacct": acct is not None},
        "counts": counts,
        "shards": shards,
        "tasks": list(tasks.values()),
        "prompts": {"done": prompts_done, "total": prompts_total},
        "samples": {"done": sum(e["samples_done"] for e in shards), "total": prompts_total * n},
        "output_tokens": sum(e["output_tokens"] for e in shards),
        "tokens_per_s": round(tps, 1),
        "eta_s": None if eta is None else round(eta, 1),
        "eta_basis": eta_basis,
        "slowest": [e["shard"] for e in slowest],
        "failed": failures,
        "engines": engines,
        "claims": claim_summary(claims, len(shards) - len(done)) if dynamic else None,
        "complete": len(done) == len(shards),
        "resume_command": f"hpcrollout resume {rundir.root}",
        "notes": notes,
        # slurm.nodes > 1: each task's Ray cluster (state, the node that failed, each node's log tail)
        "ray": {t: lines for t in sorted(tasks) if (lines := raycluster.status_lines(rundir, t))},
    }


def engine_states(rundir: RunDir, running: list[dict[str, Any]], host: str) -> list[dict[str, Any]]:
    """executor.engines_per_task > 1: each engine of each task (its latest attempt), with the shards it is
    generating and its live tok/s, from its record and the running shards' heartbeats."""
    from hpcrollout.executors.engine_group import read_engine_record

    out = []
    for path in rundir.engine_records():
        record = read_engine_record(path)
        if _int(record.get("task")) is None or _int(record.get("engine")) is None:
            continue
        pid, ehost = _int(record.get("pid")), record.get("host")
        mine = [e for e in running if e.get("pid") == pid and e.get("host") == ehost]
        state = record.get("state") or "running"
        if state == "running" and same_process_alive(ehost, pid, _int(record.get("pid_start"))) is False:
            state = "dead"  # killed without its task noticing yet (or the task itself died)
        out.append(
            {
                "task": int(record["task"]),
                "engine": int(record["engine"]),
                "host": ehost,
                "pid": pid,
                "gpus": record.get("gpus") or [],
                "state": state,
                "exit_code": record.get("exit_code"),
                "shards": [e["shard"] for e in mine],
                "tokens_per_s": max((e.get("tokens_per_s", 0.0) for e in mine), default=0.0),
                "log": record.get("log"),
            }
        )
    return out


def _engine_rates(running: list[dict[str, Any]], now: float) -> tuple[float, float]:
    """Generated tokens and finished prompts per second of the running engines, each engine counted once (an
    engine with two shards in flight reports its rate in both heartbeats); heartbeats of older versions carry
    per-attempt rates."""
    engines: dict[str, tuple[float, float]] = {}
    tps = prompt_rate = 0.0
    for e in running:
        if e.get("engine_id") and e.get("prompts_per_s") is not None:
            engines[e["engine_id"]] = (e["tokens_per_s"], float(e["prompts_per_s"]))
        else:
            tps += e.get("tokens_per_s", 0.0)
            prompt_rate += e["prompts_done_this_attempt"] / max(now - float(e.get("started") or now), 1.0)
    return tps + sum(t for t, _ in engines.values()), prompt_rate + sum(p for _, p in engines.values())


def _token_budget_left(rundir: RunDir, entry: dict[str, Any], config: RunConfig) -> int:
    """Tokens an unfinished shard has still to generate (exact budgets): its last heartbeat's count, else every
    uncommitted prompt's n * max_tokens (the row's own with data.max_tokens_column)."""
    if "token_budget_left" in entry:
        return entry["token_budget_left"]
    sp, column = config.sampling, config.data.max_tokens_column
    left = entry["prompts_total"] - entry["prompts_done"]
    if not column:
        return left * sp.n * sp.max_tokens
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        budgets = pq.read_table(rundir.shard_input(entry["shard"]), columns=[column]).column(0)
    except (OSError, ValueError):
        return left * sp.n * sp.max_tokens
    total = int(pc.sum(pc.fill_null(budgets, sp.max_tokens)).as_py() or 0)
    return sp.n * total * left // max(1, entry["prompts_total"])


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def claim_states(rundir: RunDir, shards: list[int], lease_s: float) -> dict[int, dict[str, Any]]:
    """Dynamic mode: the claim of each of these shards that has one (ClaimBoard.status; reads, never writes)."""
    if not shards or not rundir.claims_dir.is_dir():
        return {}
    from hpcrollout.claims import ClaimBoard

    # an explicit order: the board then reads no manifest; status() only stats and reads claim files
    board = ClaimBoard(rundir, owner="status", order=shards, lease_s=lease_s)
    out = {}
    for shard, info in board.status().items():
        info["expires_in"] = round(float(info["expires_in"]), 1)
        out[shard] = info
    return out


def claim_summary(claims: dict[int, dict[str, Any]], pending: int) -> dict[str, Any]:
    """Counts of the unfinished shards' claims by state, and how many were never claimed."""
    counts: dict[str, int] = {}
    for c in claims.values():
        counts[c["state"]] = counts.get(c["state"], 0) + 1
    return {"counts": counts, "unclaimed": pending - len(claims)}


def _dynamic_task(hb: dict[str, Any], job_task: dict[str, int]) -> int | None:
    """In dynamic mode a shard belongs to whichever task claimed it: the one its claim or heartbeat names."""
    if hb.get("slurm_array_job_id") is not None:
        return job_task.get(f"{hb['slurm_array_job_id']}_{hb.get('slurm_array_task_id')}")
    if hb.get("slurm_job_id") is not None:
        return job_task.get(str(hb["slurm_job_id"]))
    return _int(hb.get("task"))


def _shard_state(hb: dict[str, Any], t: dict[str, Any] | None, now: float, hb_every: float, host: str) -> str:
    """pending / running / requeued / failed for a shard without a done marker."""
    fresh = bool(hb) and now - float(hb.get("time", 0)) < 3 * hb_every + 60
    hb_running = bool(hb) and hb.get("state") == "running"
    if t is None or not t["submitted"]:
        return "running" if hb_running and fresh else "pending"
    sched, rec = t["slurm_state"], t["record_state"]
    if t["job_id"]:
        job_array, _, job_index = t["job_id"].partition("_")
        if job_index:
            hb_job = f"{hb.get('slurm_array_job_id')}_{hb.get('slurm_array_task_id')}"
        else:
            hb_job = str(hb.get("slurm_job_id"))
        this_attempt = hb_running and hb_job == t["job_id"]
        if sched in ("RUNNING", "COMPLETING", "CONFIGURING"):
            return "running" if this_attempt else "pending"
        if sched in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED"):
            return (
                "requeued"
                if (t["requeues"] or t["retries"] or rec in ("requeued", "retrying") or sched != "PENDING")
                else "pending"
            )
        if sched is not None:  # finished in the scheduler's eyes (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)
            return "failed"
        # neither squeue nor sacct knows it (no accounting, or purged): the task record decides
        if rec in ("failed", "terminated"):
            return "failed"
        if rec in ("requeued", "retrying"):
            return "requeued"
        return "running" if this_attempt and fresh else "pending"
    # local executor: a heartbeat from a live process on this host means running; a task whose lock is held is
    # queued in its submit or running; a submitted task that holds no lock has ended without finishing the shard
    # (its exit code says how, or its submit was killed before it could record one)
    pid, hb_host = _int(hb.get("pid")), hb.get("host")
    if hb_running and hb_host == host and pid is not None and pid_alive(pid):
        return "running"
    if t.get("local_active"):
        return "running" if hb_running and hb_host != host and fresh else "pending"
    if hb_running and hb_host != host:
        return "running" if fresh else "failed"
    return "failed"


