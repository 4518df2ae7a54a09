"""One Ray cluster over the nodes of a multi-node array task (slurm.nodes > 1), so one engine spans them.

vLLM runs a model bigger than a node with Ray as its distributed executor: tensor parallel over each node's GPUs,
pipeline parallel over the nodes. ``ray_cluster(config, run_dir, task)`` builds that cluster inside the array
task and yields what the engine needs; ``vllm_kwargs(config)`` turns it into vLLM's parallel options.

Invariants:
- Only this module imports ray, lazily, and only for a task with slurm.nodes > 1; nothing else imports it.
- The cluster lives in the task's own allocation: the head on the first node (this process, rank 0), one worker
  per other node through ``srun --overlap`` in the same job. Every node's Ray runs under a small wrapper
  (``python -m hpcrollout.raycluster node``) that kills exactly its own process tree when signalled, so
  ``stop()`` (task end, SIGTERM, requeue) leaves no Ray process behind, and none of another task's.
- Two tasks on one node or host do not collide: the ports are a block chosen from the job and task ids and
  probed free on the head, and each node's temp dir is /tmp/hr<job>_<task>_<node> (short on purpose: Ray's
  socket paths must stay under 107 bytes).
- A requeued attempt builds a fresh cluster (new processes, new Ray session); nothing of the old one is reused.
- The engine starts only after every node has joined with its GPUs; otherwise ``HpcRolloutError`` names the
  node that did not, and its log.
- What happened is on the shared filesystem for ``hpcrollout status``: RUN_DIR/logs/ray/TASK/cluster.json
  (nodes, address, state, the failed node) and one NODE.log per node (the output of its ``ray start``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir, write_json_atomic
from hpcrollout.rundir import read_record as read_rundir_record

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

log = logging.getLogger("hpcrollout")

# Set in the rank-0 process while the cluster is up: ray.init() (vLLM's) finds the cluster through RAY_ADDRESS.
ADDRESS_VAR = "RAY_ADDRESS"
NODES_VAR = "HPCROLLOUT_RAY_NODES"
GPUS_VAR = "HPCROLLOUT_RAY_GPUS_PER_NODE"

NODE_RESOURCE_PREFIX = "hpcrollout_node_"  # one unit per node, named after it: which Ray node is which SLURM node
RECORD_NAME = "cluster.json"
LOG_TAIL_LINES = 15

_PORT_LO, _PORT_BLOCK, _PORT_BLOCKS = 20000, 200, 200  # ports 20000-59999, a block of 200 per cluster
_STOP_WAIT_S = 20.0


class ClusterRecord(TypedDict, total=False):
    """RUN_DIR/logs/ray/TASK/cluster.json: the current attempt's Ray cluster, for hpcrollout status."""

    task: int
    job_id: str | None
    attempt: int  # SLURM_RESTART_COUNT: a requeued attempt writes its own, fresh record
    state: Literal["starting", "up", "failed", "stopped"]
    head: str
    address: str
    nodes: list[str]
    joined: list[str]
    failed_nodes: list[str]
    error: str
    gpus_per_node: int
    cpus_per_node: int
    pids: dict[str, int]
    time: float


@dataclass
class RayCluster:
    """A running cluster: what the engine needs (address, nodes, GPUs per node) and the processes to stop."""

    address: str
    nodes: list[str]
    gpus_per_node: int
    ray_dir: Path
    record: ClusterRecord = field(default_factory=lambda: ClusterRecord())
    head_proc: subprocess.Popen[bytes] | None = None
    workers_proc: subprocess.Popen[bytes] | None = None
    step_name: str = ""
    stopped: bool = False

    def stop(self, state: Literal["stopped", "failed"] = "stopped") -> None:
        """Stop every node's Ray (workers through their srun, then the head); idempotent."""
        if self.stopped:
            return
        self.stopped = True
        if self.workers_proc is not None and self.workers_proc.poll() is None:
            # SIGTERM to the workers' step, not to srun: srun on SIGTERM SIGKILLs the step at once, before each
            # node's wrapper has removed its temp dir; the step then ends and srun with it
            _signal_step(self.step_name, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.workers_proc.wait(_STOP_WAIT_S)
        for proc in (self.workers_proc, self.head_proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(_STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()  # srun killed: SLURM ends the step; the head wrapper: its tree is orphaned
                    proc.wait(5)
        for var in (ADDRESS_VAR, NODES_VAR, GPUS_VAR):
            os.environ.pop(var, None)
        if self.record.get("state") != "failed":
            self.record["state"] = state
        _write_record(self.ray_dir, self.record)
        log.info("ray cluster %s stopped", self.address)


_CURRENT: RayCluster | None = None


def _signal_step(step_name: str, sig: int) -> None:
    """Send sig to every process of this job's step named step_name (scancel --signal; the step goes on)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not (job and step_name):
        return
    try:
        out = subprocess.run(
            ["squeue", "-h", "-s", "-j", job, "-o", "%i %j"], capture_output=True, text=True, timeout=30
        ).stdout
        steps = [line.split()[0] for line in out.splitlines() if line.split()[1:] == [step_name]]
        for step in steps:
            subprocess.run(["scancel", f"--signal={int(sig)}", step], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        log.warning("could not signal the Ray workers' step %s; stopping its srun instead", step_name)


def stop_current() -> None:
    """Stop the cluster this process started, if any (SIGTERM and requeue handlers call this)."""
    if _CURRENT is not None:
        _CURRENT.stop()


def vllm_kwargs(config: RunConfig) -> dict[str, Any]:
    """vLLM's parallel options while a cluster is up in this process: Ray as the executor, tensor parallel = GPUs
    per node and pipeline parallel = nodes unless the config sets them; {} otherwise."""
    nodes, gpus = os.environ.get(NODES_VAR, ""), os.environ.get(GPUS_VAR, "")
    if not (nodes.isdigit() and gpus.isdigit()):
        return {}
    total, ec = int(nodes) * max(1, int(gpus)), config.engine
    if ec.tensor_parallel_size:
        tp = ec.tensor_parallel_size
    else:
        tp = max(1, int(gpus)) if ec.pipeline_parallel_size == 1 else max(1, total // ec.pipeline_parallel_size)
    pp = ec.pipeline_parallel_size if ec.pipeline_parallel_size != 1 else max(1, total // tp)
    return {"distributed_executor_backend": "ray", "tensor_parallel_size": tp, "pipeline_parallel_size": pp}


# -- the cluster ----------------------------------------------------------------------------------------------
def job_nodes() -> list[str]:
    """The allocation's node names, first (this node) first."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        raise HpcRolloutError("slurm.nodes > 1 needs a SLURM allocation (SLURM_JOB_NODELIST is not set)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise HpcRolloutError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    return out.stdout.split()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def port_block(key: str) -> int:
    """The first port of a block of _PORT_BLOCK for this job and task: derived from them, probed free here."""
    seed = zlib.crc32(key.encode())
    for i in range(_PORT_BLOCKS):
        base = _PORT_LO + ((seed + i) % _PORT_BLOCKS) * _PORT_BLOCK
        if all(_port_free(base + k) for k in range(10)):
            return base
    raise HpcRolloutError(
        f"no free port block for the Ray cluster in {_PORT_LO}-{_PORT_LO + _PORT_BLOCKS * _PORT_BLOCK}"
    )


def temp_dir(job_key: str, node: str) -> str:
    """Ray's temp dir on a node: short (socket path limit) and per job, task and node (a shared /tmp is fine)."""
    return f"/tmp/hr{job_key}_{node.split('.')[0]}"


def ray_start_args(base: int, gpus: int, cpus: int, node: str) -> list[str]:
    """The ``ray start`` options every node shares: its ports in the block, its resources; head adds --head."""
    return [
        f"--node-manager-port={base + 2}",
        f"--object-manager-port={base + 3}",
        f"--dashboard-agent-listen-port={base + 4}",
        f"--dashboard-agent-grpc-port={base + 5}",
        f"--runtime-env-agent-port={base + 6}",
        f"--metrics-export-port={base + 7}",
        f"--min-worker-port={base + 100}",
        f"--max-worker-port={base + _PORT_BLOCK - 1}",
        f"--num-gpus={gpus}",
        f"--num-cpus={cpus}",
        f"--resources={json.dumps({NODE_RESOURCE_PREFIX + node: 1})}",
        "--disable-usage-stats",
    ]


def _die_with_parent() -> None:
    """preexec_fn: this child gets SIGTERM when the process that started it dies (Linux), so a task killed
    outright (SIGKILL, an exit that skips ``finally``) still takes its cluster with it."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def node_command(job_key: str, start_args: list[str]) -> list[str]:
    """The per-node wrapper command (its node name and temp dir are found on the node itself)."""
    return [sys.executable, "-m", "hpcrollout.raycluster", "node", "--job-key", job_key, "--", *start_args]


def _write_record(ray_dir: Path, record: ClusterRecord) -> None:
    record["time"] = time.time()
    try:
        write_json_atomic(ray_dir / RECORD_NAME, record)
    except OSError:
        log.exception("could not write %s", ray_dir / RECORD_NAME)


def read_record(run_dir: RunDir, task: int) -> ClusterRecord | None:
    """The task's cluster record, or None if it never had one (or it is unreadable)."""
    return read_rundir_record(run_dir.ray_dir(task) / RECORD_NAME) or None  # type: ignore[return-value]


def _gcs_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _fail(cluster: RayCluster, failed: list[str], message: str) -> HpcRolloutError:
    cluster.record.update(state="failed", failed_nodes=failed, error=message)
    cluster.stop("failed")
    return HpcRolloutError(message)


def _log_hint(ray_dir: Path, nodes: list[str]) -> str:
    return ", ".join(str(ray_dir / f"{n}.log") for n in nodes)


@contextlib.contextmanager
def ray_cluster(config: RunConfig, run_dir: str | Path, task: int) -> Iterator[RayCluster | None]:
    """With slurm.nodes > 1 inside a SLURM allocation: a Ray cluster over the allocation's nodes, up until the
    block ends (or stop_current()); yields None (and does nothing) for a single-node task."""
    global _CURRENT
    if config.slurm.nodes <= 1:
        yield None
        return
    nodes = job_nodes()
    if len(nodes) < 2:
        yield None
        return
    rundir = RunDir(run_dir)
    ray_dir = rundir.ray_dir(task)
    ray_dir.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "0")
    job_key = f"{job}_{task}"
    from hpcrollout.engines import allocated_gpus

    gpus = allocated_gpus()
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or (os.cpu_count() or 1)
    head = nodes[0]
    head_ip = socket.gethostbyname(socket.gethostname())
    base = port_block(job_key)
    address = f"{head_ip}:{base}"
    timeout = config.slurm.ray_timeout_s
    cluster = RayCluster(address=address, nodes=nodes, gpus_per_node=gpus, ray_dir=ray_dir)
    cluster.step_name = f"hpcrollout-ray-{task}"
    cluster.record = ClusterRecord(
        task=task,
        job_id=os.environ.get("SLURM_JOB_ID"),
        attempt=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        state="starting",
        head=head,
        address=address,
        nodes=nodes,
        joined=[],
        gpus_per_node=gpus,
        cpus_per_node=cpus,
    )
    _write_record(ray_dir, cluster.record)
    log.info("task %d: starting a Ray cluster on %s (head %s, %d GPUs per node)", task, ",".join(nodes), address, gpus)
    _CURRENT = cluster
    try:
        head_args = ["--head", f"--node-ip-address={head_ip}", f"--port={base}", "--include-dashboard=false"]
        with open(ray_dir / f"{head}.log", "ab") as out:
            cluster.head_proc = subprocess.Popen(
                node_command(job_key, [*head_args, *ray_start_args(base, gpus, cpus, head)]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not _gcs_up(head_ip, base):
            if cluster.head_proc.poll() is not None or time.monotonic() > deadline:
                raise _fail(
                    cluster,
                    [head],
                    f"the Ray head on node {head} did not start (see {_log_hint(ray_dir, [head])}); "
                    "the task is retried, or raise slurm.ray_timeout_s",
                )
            time.sleep(0.2)
        others = nodes[1:]
        # srun in the task's own allocation; --overlap: the task's step already holds the nodes' CPUs and GPUs
        cluster.workers_proc = subprocess.Popen(
            [
                "srun",
                "--overlap",
                "--mem=0",  # all of the job's memory on the node, shared (else: "Memory required ... not available")
                f"--nodes={len(others)}",
                f"--ntasks={len(others)}",
                "--ntasks-per-node=1",
                "--relative=1",
                "--kill-on-bad-exit=0",
                f"--job-name={cluster.step_name}",
                f"--output={ray_dir}/%N.log",
                "--open-mode=append",
                *node_command(job_key, [f"--address={address}", *ray_start_args(base, gpus, cpus, "%NODE%")]),
            ],
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # srun on SIGTERM ends the step: every worker node's wrapper
        )
        cluster.record["pids"] = {head: cluster.head_proc.pid, "srun": cluster.workers_proc.pid}
        _wait_for_nodes(cluster, deadline, timeout)
        os.environ[ADDRESS_VAR] = address
        os.environ[NODES_VAR] = str(len(nodes))
        os.environ[GPUS_VAR] = str(gpus)
        cluster.record["state"] = "up"
        _write_record(ray_dir, cluster.record)
        log.info("task %d: Ray cluster up, %d nodes joined", task, len(nodes))
        yield cluster
    finally:
        cluster.stop()
        _CURRENT = None


def _wait_for_nodes(cluster: RayCluster, deadline: float, timeout: float) -> None:
    """Until every node is alive in the cluster with its GPUs; an error naming those that are not."""
    import ray

    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        joined: list[str] = []
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            joined = sorted(
                name
                for n in alive
                for res in [n.get("Resources", {})]
                for name in cluster.nodes
                if res.get(NODE_RESOURCE_PREFIX + name) and res.get("GPU", 0) >= cluster.gpus_per_node
            )
            if joined != cluster.record.get("joined"):
                cluster.record["joined"] = joined
                _write_record(cluster.ray_dir, cluster.record)
            missing = [n for n in cluster.nodes if n not in joined]
            if not missing:
                return
            ended = cluster.workers_proc is not None and cluster.workers_proc.poll() is not None
            if ended or cluster.head_proc is None or cluster.head_proc.poll() is not None:
                why = "its Ray process ended"
            elif time.monotonic() > deadline:
                why = f"it did not join within {timeout:.0f}s (slurm.ray_timeout_s)"
            else:
                time.sleep(0.5)
                continue
            raise _fail(
                cluster,
                missing,
                f"Ray cluster of task {cluster.record.get('task')}: node(s) {', '.join(missing)} missing: {why}; "
                f"see {_log_hint(cluster.ray_dir, missing)}",
            )
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaced it with a bare sys.exit: the task's back


# -- status ---------------------------------------------------------------------------------------------------
def status_lines(run_dir: RunDir, task: int, lines: int = LOG_TAIL_LINES) -> list[str]:
    """For hpcrollout status: the task's Ray cluster state, the node that failed, each node's log tail."""
    record = read_record(run_dir, task)
    if record is None:
        return []
    nodes = list(record.get("nodes", []))
    joined = set(record.get("joined", []))
    out = [
        f"ray cluster of task {task} (attempt {record.get('attempt', 0)}): {record.get('state', '?')}, head "
        f"{record.get('address', '?')}, {len(joined)}/{len(nodes)} nodes joined"
    ]
    if record.get("failed_nodes"):
        out.append(f"  failed node(s): {', '.join(record['failed_nodes'])}: {record.get('error', '')}")
    for node in nodes:
        path = run_dir.ray_dir(task) / f"{node}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(no log yet)"]
        out.append(f"  {node} ({'joined' if node in joined else 'not joined'}): {path}")
        out.extend(f"    {line}" for line in tail)
    return out


# -- the per-node wrapper -------------------------------------------------------------------------------------
def _kill_tree(pid: int) -> None:
    """SIGKILL ``ray start`` and every process under it (by PID, collected first). Not SIGTERM: raylet and the
    GCS drain on it for 10-30 s, and a torn-down cluster has nothing to save."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def run_node(job_key: str, start_args: list[str]) -> int:
    """One node's Ray (``ray start --block``) until signalled; then its whole process tree is killed."""
    node = socket.gethostname().split(".")[0]
    tmp = temp_dir(job_key, node)
    args = [a.replace("%NODE%", node) for a in start_args]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--temp-dir={tmp}", *args]
    print(f"[hpcrollout] {time.strftime('%FT%T')} node {node}: {' '.join(cmd)}", flush=True)
    stop = {"signal": 0}

    def on_signal(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not stop["signal"]:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            print(f"[hpcrollout] node {node}: signal {stop['signal']}, stopping Ray", flush=True)
        _kill_tree(proc.pid)
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    rc = proc.returncode if not stop["signal"] else 0
    print(
        f"[hpcrollout] {time.strftime('%FT%T')} node {node}: Ray stopped (ray start exit {proc.returncode})", flush=True
    )
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcrollout.raycluster")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run this node's Ray until signalled (started by ray_cluster)")
    node.add_argument("--job-key", required=True)
    node.add_argument("start_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    start_args = [a for a in args.start_args if a != "--"]
    return run_node(args.job_key, start_args)


if __name__ == "__main__":
    sys.exit(main())
