"""The pure-Python parts of benchmarks/multi_gpu.py (issue 17): its ways, the command lines it runs, the figures
it takes from the runs' done markers, and its table. No GPU, no vLLM: the GPU run is run_on_device.sh multi-gpu."""

from __future__ import annotations

import argparse
import json

import pytest

from hpcrollout.benchmarks import multi_gpu as mg


def _args(**over) -> argparse.Namespace:  # noqa: ANN003
    parser = argparse.ArgumentParser()
    mg.add_cli_args(parser)
    args = parser.parse_args([])
    for key, value in over.items():
        setattr(args, key, value)
    return args


def test_ways_and_the_workload_of_vllm_throughput():
    assert mg.parse_ways("2x1, 1x2,raw-tp2,2x1") == ["2x1", "1x2", "raw-tp2", "2x1"]
    with pytest.raises(SystemExit, match="unknown 4x1"):
        mg.parse_ways("2x1,4x1")
    from hpcrollout.benchmarks.vllm_throughput import output_lengths

    args = _args(prompts=20)
    ids, prompts, lengths, seeds = mg.workload(args)
    assert len(ids) == len(prompts) == len(seeds) == 20 and len(set(seeds)) == 20
    assert lengths == output_lengths(argparse.Namespace(workload="variable", **vars(args)))
    assert max(lengths) <= args.max_tokens


@pytest.mark.parametrize(("way", "engines", "tp"), [("2x1", 2, 1), ("1x2", 1, 2)])
def test_the_hpcrollout_command_line_is_a_valid_run_config(tmp_path, way, engines, tp):
    from hpcrollout import run

    cmd = mg.hpcrollout_command(_args(shards=6), way, tmp_path / "m", tmp_path / "in.parquet", tmp_path / "o.parquet",
                                tmp_path / "o.run")  # fmt: skip
    assert cmd[1:4] == ["-m", "hpcrollout", "run"]
    parser = argparse.ArgumentParser()
    run.add_cli_args(parser)
    config = run.config_from_args(parser.parse_args(cmd[4:]))
    assert config.executor.engines_per_task == engines and config.engine.tensor_parallel_size == tp
    assert config.engine.load_format == "dummy" and config.sampling.ignore_eos and config.sampling.n == 8
    assert config.data.max_tokens_column == "max_tokens" and config.sharding.num_shards == 6


def test_the_raw_script_is_python_and_gets_tp2_and_the_seeds(tmp_path):
    cmd = mg.script_command(_args(), tmp_path / "m", tmp_path / "in.parquet", [5, 6])
    compile(cmd[2], "raw-tp2", "exec")
    spec = json.loads(cmd[3])
    assert spec["tp"] == 2 and spec["seeds"] == [5, 6] and spec["n"] == 8


def _marker(shard, pid, engine, started, finished, tokens, compiled, waited=0.0, tp=1):  # noqa: ANN001, ANN202
    cache = {"ready_before": not compiled, "waited_s": waited}
    return {"shard": shard, "pid": pid, "engine_index": engine, "gpus": [str(engine)], "started": started,
            "finished": finished, "output_tokens": tokens,
            "engine": {"tensor_parallel_size": tp, "engine_start_s": 80.0 if compiled else 30.0, "compile_cache": cache}}  # fmt: skip


def test_figures_from_done_markers_and_the_table():
    two = [_marker(0, 10, 0, 100.0, 110.0, 1000, True), _marker(1, 10, 0, 109.0, 120.0, 1000, True),
           _marker(2, 11, 1, 112.0, 118.0, 1000, False, waited=75.0)]  # fmt: skip
    engines = mg.engines_of(two)
    assert [(e["engine_index"], e["shards"], e["compiled"]) for e in engines] == [(0, [0, 1], True), (1, [2], False)]
    figures = mg.per_gpu(3000, 60.0, engines, 2)
    assert figures["busy_tok_s_per_gpu"] == pytest.approx(3000 / (20 + 6))  # each engine's window x its one GPU
    assert figures["held_tok_s_per_gpu"] == pytest.approx(3000 / (20 * 2)) and figures["wall_tok_s_per_gpu"] == 25.0
    one = mg.engines_of([_marker(0, 20, None, 0.0, 10.0, 3000, True, tp=2)])
    assert mg.per_gpu(3000, 40.0, one, 2)["busy_tok_s_per_gpu"] == pytest.approx(150.0)  # 10 s x 2 GPUs

    ways = {
        "2x1": {"wall_s": 60.0, "output_tokens": 3000, "engines": engines, **figures},
        "1x2": {"wall_s": 40.0, "output_tokens": 3000, "engines": one, **mg.per_gpu(3000, 40.0, one, 2)},
        "raw-tp2": {"wall_s": 50.0, "output_tokens": 3000, "busy_tok_s_per_gpu": 100.0, "held_tok_s_per_gpu": 100.0,
                    "wall_tok_s_per_gpu": 30.0, "engines": [{"tensor_parallel_size": 2, "engine_start_s": 20.0,
                                                             "compiled": None, "lock_wait_s": 0.0}]},
    }  # fmt: skip
    starts = mg.start_figures(ways)
    assert starts["compile_cache"] == {"way": "2x1", "first_start_s": 80.0, "second_start_s": 30.0,
                                       "second_waited_for_lock_s": 75.0}  # fmt: skip
    assert starts["tp2_over_tp1_cold"] == 1.0  # both 80 s in the markers above
    assert starts["tp2_over_tp1_warm"] == pytest.approx(20 / 30) and starts["warm_tp2_from"].startswith("raw-tp2")
    ways["gone"] = {"error": "skipped: 20 s of --deadline_s left"}
    summary = {"workload": {"prompts": 3, "n": 8, "max_tokens": 4096, "shards": 8, "median_tokens": 384.0,
                            "sigma": 1.0, "shape": "qwen3-4b", "expected_output_tokens": 3000},
               "cache_root": "/c", "ways": ways, "starts": starts}  # fmt: skip
    text = mg.report(summary)
    row = next(line for line in text.splitlines() if line.startswith("2x1"))
    assert f"{3000 / 26 / 100:.3f}" in row and f"{(3000 / 26) / 150:.3f}" in row  # vs raw, vs 1x2
    assert "after 75.0 s lock wait" in row and any(
        x.startswith("gone") and "not measured: skipped" in x for x in text.splitlines()
    )
    assert "first 80.0 s (compiled), second 30.0 s after waiting 75.0 s on the lock" in text


def test_main_runs_the_ways_in_order_writes_json_after_each_and_skips_past_the_deadline(tmp_path, monkeypatch):
    import hpcrollout.tinymodel

    monkeypatch.setattr(hpcrollout.tinymodel, "build_model_shape", lambda path, shape: None)
    calls = []

    def fake_way(way, args, model, inp, seeds, env, work, tag, timeout):  # noqa: ANN001, ANN202
        calls.append((way, env["VLLM_CACHE_ROOT"]))
        if way == "1x2":
            raise RuntimeError("1x2 failed (exit 1); see x.log")
        monkeypatch.setattr(mg.time, "monotonic", lambda: 1e9)  # the deadline passes after the first way
        return {"wall_s": 1.0, "output_tokens": 10, "engines": [], "busy_tok_s_per_gpu": 5.0,
                "held_tok_s_per_gpu": 5.0, "wall_tok_s_per_gpu": 5.0}  # fmt: skip

    monkeypatch.setattr(mg, "run_way", fake_way)
    out = tmp_path / "m.json"
    args = _args(prompts=4, ways="2x1,1x2", work_dir=str(tmp_path / "w"), out=str(out))
    assert mg.main(args) == 1  # a way not measured: the call says so
    summary = json.loads(out.read_text())
    assert [c[0] for c in calls] == ["2x1"] and calls[0][1].startswith(str(tmp_path / "w" / "cache-"))
    assert summary["ways"]["2x1"]["output_tokens"] == 10 and "skipped" in summary["ways"]["1x2"]["error"]
    assert summary["workload"]["prompts"] == 4 and "not measured" in summary["report"]
