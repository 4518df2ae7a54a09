"""slurm.nodes: 2 on a real 2-node SLURM cluster (slurm/start-multinode-cluster.sh: slurmds in network
namespaces hrn1, hrn2 with their own addresses): the array task forms a Ray cluster over both nodes with their
(declared) GPUs, a stand-in engine places work on both, and SIGTERM and requeue tear the cluster down, a requeued
attempt building a fresh one. What cannot run here is vLLM itself on GPUs of several nodes (tests/ray_standin.py
stands in for it); ``vllm_kwargs`` shows what vLLM would be given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from hpcrollout import raycluster, submit
from hpcrollout.config import build_config
from hpcrollout.executors.jobs import latest_jobs
from hpcrollout.executors.slurm_task import read_task_record
from hpcrollout.rundir import RunDir, read_json
from hpcrollout.shard import prepare_run
from hpcrollout.status import format_status, run_status
from tests.conftest import make_prompts, write_input
from tests.ray_standin import StandInTask, placements_path
from tests.slurm_fixtures import problem_after, wait_for_jobs, wait_until
from tests.test_slurm_array import slurm_config

pytestmark = pytest.mark.slurm

MULTI_CONF = Path("/etc/slurm-multi/slurm.conf")
NODES = ["hrn1", "hrn2"]
NETNS = {"hrn1": "hrns1", "hrn2": "hrns2"}
START_SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "start-multinode-cluster.sh"


def _multinode_problem(env: dict[str, str]) -> str | None:
    """None if both nodes of the multi-node cluster are idle or mixed; else what sinfo says."""
    if not MULTI_CONF.exists():
        return f"{MULTI_CONF} does not exist"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 60 s"
    states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
    if all(states.get(n) in ("idle", "mixed") for n in NODES):
        return None
    return f"sinfo: {states or proc.stderr.strip()}"


@pytest.fixture
def multinode_cluster(slurm_cluster, monkeypatch):
    """The namespaced 2-node cluster, with SLURM_CONF pointing every SLURM command (ours, submitit's) at it."""
    env = dict(os.environ, SLURM_CONF=str(MULTI_CONF))
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    problem = _multinode_problem(env)
    if problem and in_ci and MULTI_CONF.exists():  # CI started it: a busy sinfo is asked again
        problem = problem_after(lambda: _multinode_problem(env), 120.0)
    if problem:
        message = f"multi-node test cluster not up ({problem}); start it with: sudo bash {START_SCRIPT}"
        if in_ci:
            pytest.fail(message + " (CI=true: the SLURM tests must run)")
        pytest.skip(message)
    monkeypatch.setenv("SLURM_CONF", str(MULTI_CONF))
    return NODES


def ray_daemons(node: str) -> list[int]:
    """PIDs of Ray's daemons (raylet, GCS) running in the node's network namespace: the real state of its Ray."""
    out = subprocess.run(["ip", "netns", "pids", NETNS[node]], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in out:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        if comm in ("raylet", "gcs_server"):
            pids.append(int(pid))
    return pids


def test_vllm_kwargs_only_while_a_cluster_is_up(tmp_path, monkeypatch):
    """TP = GPUs per node, PP = nodes, Ray executor; the config's own parallel sizes win; nothing without a cluster."""
    config = build_config({"slurm": {"nodes": 2}})
    assert raycluster.vllm_kwargs(config) == {}
    monkeypatch.setenv(raycluster.NODES_VAR, "2")
    monkeypatch.setenv(raycluster.GPUS_VAR, "8")
    expected = {"distributed_executor_backend": "ray", "tensor_parallel_size": 8, "pipeline_parallel_size": 2}
    assert raycluster.vllm_kwargs(config) == expected
    config = build_config({"slurm": {"nodes": 2}, "engine": {"tensor_parallel_size": 16}})
    assert raycluster.vllm_kwargs(config) == {**expected, "tensor_parallel_size": 16, "pipeline_parallel_size": 1}
    # the temp dir stays short: Ray's socket paths (TMP/session_<date>_<pid>/sockets/plasma_store) < 107 bytes
    tmp = raycluster.temp_dir("123456789_1023", "gpu-node-0042.cluster.example.org")
    assert len(tmp + "/session_2026-12-01_13-08-33_145474_1234567/sockets/plasma_store") < 107


def test_two_node_task_forms_a_ray_cluster_and_rebuilds_it_after_requeue(
    multinode_cluster, tiny_model, tmp_path, monkeypatch
):
    inp = write_input(tmp_path / "in.parquet", make_prompts(4))
    config = slurm_config(
        tmp_path,
        tiny_model,
        inp,
        "ray",
        slurm={"nodes": 2, "gpus_per_task": 2, "cpus_per_task": 2, "partition": "multi", "ray_timeout_s": 120},
    )
    prepare_run(config)
    monkeypatch.setattr("hpcrollout.executors.slurm_task.SlurmTask", StandInTask)  # the real task, stand-in engine
    result = submit.submit_run(config)
    rundir = RunDir(config.run_dir)
    (job,) = latest_jobs(rundir).values()
    try:
        # 1. every node joined with its GPUs, and the stand-in engine placed one GPU actor on each
        wait_until(lambda: placements_path(rundir.root, 0).exists(), timeout=600, what="attempt 0 to place its actors")
        first = read_json(placements_path(rundir.root, 0))
        assert sorted(p["host"] for p in first["placed"]) == NODES
        assert all(len(p["gpu_ids"]) == 2 for p in first["placed"])
        resources = list(first["resources"].values())
        assert len(resources) == 2 and all(r["GPU"] == 2.0 for r in resources)
        assert sorted(k for r in resources for k in r if k.startswith(raycluster.NODE_RESOURCE_PREFIX)) == [
            raycluster.NODE_RESOURCE_PREFIX + n for n in NODES
        ]
        record = raycluster.read_record(rundir, 0)
        assert record and record["state"] == "up" and record["joined"] == NODES and record["attempt"] == 0
        report = format_status(run_status(rundir.root))
        assert "2/2 nodes joined" in report and "hrn2 (joined)" in report
        old_daemons = {n: ray_daemons(n) for n in NODES}
        assert all(old_daemons.values()), f"no Ray daemons found in the nodes' namespaces: {old_daemons}"

        # 2. the pre-timeout signal: checkpoint, Ray stopped, requeue; the next attempt builds a fresh cluster
        os.kill(first["pid"], signal.SIGUSR2)
        wait_until(lambda: placements_path(rundir.root, 1).exists(), timeout=600, what="the requeued attempt's actors")
        second = read_json(placements_path(rundir.root, 1))
        assert sorted(p["host"] for p in second["placed"]) == NODES
        assert read_task_record(rundir, 0)["requeues"] == 1
        record = raycluster.read_record(rundir, 0)
        assert record and record["state"] == "up" and record["attempt"] == 1 and record["joined"] == NODES
        new_daemons = {n: ray_daemons(n) for n in NODES}
        for node in NODES:  # the old cluster's daemons are gone, the new ones are others
            assert new_daemons[node] and not set(new_daemons[node]) & set(old_daemons[node])

        # 3. SIGTERM to the task: it stops Ray on every node itself (SLURM kills nothing: the job keeps running)
        os.kill(second["pid"], signal.SIGTERM)
        wait_until(lambda: not any(ray_daemons(n) for n in NODES), what="Ray daemons to end on both nodes")
        wait_until(lambda: (raycluster.read_record(rundir, 0) or {}).get("state") == "stopped", what="stopped record")
        # the handler writes the task record after stopping Ray: wait for that record itself
        wait_until(lambda: read_task_record(rundir, 0).get("state") == "terminated", what="terminated task record")
        for node in NODES:  # each node's wrapper stopped its Ray and removed its temp dir
            assert "signal 15, stopping Ray" in (rundir.ray_dir(0) / f"{node}.log").read_text()
            wait_until(
                lambda n=node: not Path(raycluster.temp_dir(f"{result['job_id']}_0", n)).exists(),
                what=f"{node}'s temp dir",
            )
    finally:
        subprocess.run(["scancel", result["job_id"]], capture_output=True)
    states = wait_for_jobs([result["job_id"]])
    assert states[job][-1] == "CANCELLED"


def test_status_names_the_failed_node_and_shows_each_nodes_log_tail(tmp_path):
    """hpcrollout status: the cluster's state, the node that did not join with the error, each node's log tail."""
    rundir = RunDir(tmp_path / "run")
    ray_dir = rundir.ray_dir(0)
    ray_dir.mkdir(parents=True)
    error = "Ray cluster of task 0: node(s) hrn2 missing: its Ray process ended; see .../hrn2.log"
    record = {"task": 0, "attempt": 1, "state": "failed", "address": "10.231.0.11:40000", "nodes": NODES}
    record.update(joined=["hrn1"], failed_nodes=["hrn2"], error=error)
    (ray_dir / raycluster.RECORD_NAME).write_text(json.dumps(record))
    (ray_dir / "hrn1.log").write_text("".join(f"head line {i}\n" for i in range(40)))
    (ray_dir / "hrn2.log").write_text("ValueError: bad --resources\n")
    lines = raycluster.status_lines(rundir, 0)
    assert lines[0].startswith("ray cluster of task 0 (attempt 1): failed") and "1/2 nodes joined" in lines[0]
    assert lines[1] == f"  failed node(s): hrn2: {error}"
    text = "\n".join(lines)
    assert "hrn1 (joined)" in text and "hrn2 (not joined)" in text and "    ValueError: bad --resources" in text
    assert "head line 39" in text and "head line 0\n" not in text  # the tail, not the whole log
    assert raycluster.status_lines(rundir, 1) == []  # a task without a cluster adds nothing
