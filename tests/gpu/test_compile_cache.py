"""Two tasks start at once on one shared compile cache: one compiles under the lock, the other waits and then
loads the compiled artifacts. Start times are recorded (HPCR_GPU_RESULTS/compile_cache_small.json), not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.gpu.conftest import REPO

pytestmark = pytest.mark.gpu


def test_concurrent_starts_compile_once_and_the_second_start_uses_the_cache(gpu_model, gpu_env, tmp_path, results_dir):
    config = {
        "backend": "vllm",
        "model": {"path": str(gpu_model)},
        # The production path: torch.compile + CUDA graphs (no enforce_eager), no batch-invariant kernels.
        "engine": {"gpu_memory_utilization": 0.15, "max_model_len": 512, "max_num_seqs": 64},
        "sampling": {"n": 2, "max_tokens": 8, "seed": 3},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cache = tmp_path / "cache"
    env = {**gpu_env, "VLLM_CACHE_ROOT": str(cache), "VLLM_BATCH_INVARIANT": "0"}
    outs = [tmp_path / f"start{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests/gpu/start_engine.py"), str(cfg), str(out)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out in outs
    ]
    logs = [p.communicate(timeout=540)[0] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    infos = [json.loads(out.read_text()) for out in outs]
    assert all(info["ok"] for info in infos)
    compiled = [i for i in infos if not i["compile_cache"]["ready_before"]]
    reused = [i for i in infos if i["compile_cache"]["ready_before"]]
    assert len(compiled) == 1 and len(reused) == 1, infos  # exactly one start compiled; the other waited for it
    assert (cache / "torch_compile_cache").is_dir()
    assert (Path(compiled[0]["compile_cache"]["root"]) / "hpcrollout-locks").is_dir()
    figures = {
        "model": "tinymodel small (2 layers), enforce_eager=False",
        "first_start_s": compiled[0]["engine_start_s"],
        "second_start_s": reused[0]["engine_start_s"],
        "second_waited_for_lock_s": reused[0]["compile_cache"]["waited_s"],
        "device": compiled[0].get("device"),
    }
    (results_dir / "compile_cache_small.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("compile cache:", figures, file=sys.stderr)
