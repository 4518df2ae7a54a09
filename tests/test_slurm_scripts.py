"""The raw-sbatch paths on the real test cluster: slurm/sbatch_template.sh (array) and slurm/run_rollout.sh (env vars)."""

from __future__ import annotations

import os
import subprocess

import pyarrow.parquet as pq
import pytest

from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from tests.conftest import make_config, make_prompts, write_input
from tests.slurm_fixtures import REPO, sample_keys

pytestmark = pytest.mark.slurm

# Jobs inherit this environment (sbatch --export=ALL); PYTHONPATH makes an uninstalled checkout importable too.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _sbatch(*args: str, cwd, env: dict[str, str] | None = None) -> str:  # noqa: ANN001
    """sbatch --wait: returns when the job (every array task) has ended."""
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--cpus-per-task=1", "--time=10", "--gres=gpu:1", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**ENV, **(env or {})},
        timeout=600,
    )
    assert proc.returncode == 0, f"sbatch {args} failed: {proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def test_sbatch_template_array(slurm_cluster, tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.parquet", make_prompts(10))
    config = make_config(tmp_path, tiny_model, inp, sharding={"num_shards": 4}, executor={"num_tasks": 2})
    rundir = prepare_run(config)  # what `hpcrollout shard --config big.yaml` does
    job = _sbatch("--array=0-1", str(REPO / "slurm" / "sbatch_template.sh"), str(rundir.root), cwd=tmp_path)
    assert RunDir(rundir.root).done_shards() == {0, 1, 2, 3}, (tmp_path / f"hpcrollout-{job}_0.out").read_text()[-3000:]
    merge_run(rundir.root, tmp_path / "merged.parquet")
    keys = sample_keys(pq.read_table(tmp_path / "merged.parquet"))
    assert len(keys) == len(set(keys)) == 10 * 3


def test_run_rollout_env_launcher(slurm_cluster, tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.parquet", make_prompts(6))
    out = tmp_path / "out.parquet"
    env = {
        "MODEL_PATH": str(tiny_model),
        "INPUT_PATH": str(inp),
        "OUTPUT_PATH": str(out),
        "N_SAMPLES": "2",
        "MAX_TOKENS": "8",
        "TEMPERATURE": "0.7",
        "TOP_P": "0.9",
        "SEED": "5",
        "BACKEND": "transformers",
    }
    job = _sbatch(str(REPO / "slurm" / "run_rollout.sh"), cwd=tmp_path, env=env)
    log = (tmp_path / f"hpcrollout-{job}.out").read_text()
    assert out.exists(), log[-3000:]
    merged = pq.read_table(out)
    assert merged.num_rows == 6 and len(set(sample_keys(merged))) == 12
    assert "--n_samples 2" in log and "--temperature 0.7" in log
    config = RunDir(tmp_path / "out.run").load_config()
    assert (config.sampling.top_p, config.sampling.seed, config.sampling.max_tokens) == (0.9, 5, 8)
