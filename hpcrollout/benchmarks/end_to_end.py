"""What a user waits for: whole processes, the seed-style script vs ``hpcrollout run``, side by side.

On one GPU, in one call, in the order given (default A/B/A: script, hpcrollout, script):
  script      the seed's way, as a user writes it: a pandas read, ``LLM(...)``, one ``llm.chat`` with
              ``SamplingParams(n=...)``, a Parquet write (no checkpoints: a crash loses everything)
  hpcrollout  ``python -m hpcrollout run`` with the same model, input and sampling (checkpoints, merge)
Both are fresh processes sharing one compile cache (``VLLM_CACHE_ROOT``), so neither pays a cold compile
after the first process; the first process of the call warms it (run a way once more to see it warm).
Each prints wall time, engine start, generation time and tok/s, and the ratios to the script's mean.

    python -m hpcrollout.benchmarks.end_to_end --prompts 100 --n 8 --max_tokens 1024 --order script,hpcrollout,script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = r'''
import json, sys, time
t0 = time.time()
import pandas as pd
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
t_import = time.time()
df = pd.read_parquet(a["input"])
llm = LLM(model=a["model"], load_format="dummy", max_model_len=a["max_model_len"],
          gpu_memory_utilization=a["gpu_memory_utilization"], seed=0)
t_engine = time.time()
params = SamplingParams(n=a["n"], max_tokens=a["max_tokens"], temperature=1.0, ignore_eos=a["ignore_eos"], seed=a["seed"])
outputs = llm.chat([list(p) for p in df["prompt"]], params)
t_gen = time.time()
df["responses"] = [[o.text for o in r.outputs] for r in outputs]
df["response_tokens"] = [[len(o.token_ids) for o in r.outputs] for r in outputs]
df.to_parquet(a["output"])
t_end = time.time()
tokens = sum(len(o.token_ids) for r in outputs for o in r.outputs)
print("RESULT " + json.dumps({"import_s": t_import - t0, "engine_start_s": t_engine - t_import,
      "generation_s": t_gen - t_engine, "write_s": t_end - t_gen, "output_tokens": tokens}), flush=True)
'''


def make_input(path: Path, prompts: int, seed: int) -> Path:
    from hpcrollout.benchmarks.vllm_throughput import make_prompts

    ids = [f"p{i:06d}" for i in range(prompts)]
    pq.write_table(pa.table({"id": ids, "prompt": make_prompts(prompts, seed)}), path)
    return path


def run_script(args: argparse.Namespace, model: Path, inp: Path, out: Path, env: dict[str, str], log: Path) -> dict:
    spec = {
        "input": str(inp),
        "output": str(out),
        "model": str(model),
        "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "ignore_eos": not args.eos,
        "seed": args.seed,
    }
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, json.dumps(spec)], stdout=subprocess.PIPE, stderr=f, text=True, env=env
        )
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"the script failed (exit {proc.returncode}); see {log}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"wall_s": wall, **json.loads(line[len("RESULT ") :])}


def run_hpcrollout(args: argparse.Namespace, model: Path, inp: Path, out: Path, env: dict[str, str], log: Path) -> dict:
    run_dir = out.with_suffix(".run")
    cmd = [
        sys.executable, "-m", "hpcrollout", "run",
        "--model_path", str(model), "--input", str(inp), "--output", str(out), "--run_dir", str(run_dir),
        "--n_samples", str(args.n), "--max_tokens", str(args.max_tokens), "--temperature", "1.0",
        "--seed", str(args.seed), "--max_model_len", str(args.max_model_len),
        "--gpu_memory_utilization", str(args.gpu_memory_utilization),
        "--set", "engine.load_format=dummy", "--set", f"sampling.ignore_eos={str(not args.eos).lower()}",
        "--set", "data.id_column=id",
    ]  # fmt: skip
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"hpcrollout run failed (exit {proc.returncode}); see {log}")
    markers = [json.loads(p.read_text()) for p in sorted((run_dir / "done").glob("*.json"))]
    engine = markers[0]["engine"] if markers else {}
    timing_line = next((x for x in proc.stdout.splitlines() if x.startswith("took ")), "")
    return {
        "wall_s": wall,
        "engine_start_s": engine.get("engine_start_s"),
        "compile_cache_warm": engine.get("compile_cache", {}).get("ready_before"),
        "generation_s": sum(m.get("elapsed_s", 0.0) for m in markers),
        "output_tokens": sum(m.get("output_tokens", 0) for m in markers),
        "timings": timing_line,
    }


def report(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        f"end to end: {args.prompts} prompts x n={args.n} x max_tokens {args.max_tokens} "
        f"({'eos' if args.eos else 'ignore_eos'}), {args.shape} dummy weights, one compile cache",
        f"{'way':<12}{'wall s':>9}{'engine s':>10}{'gen s':>9}{'other s':>9}{'tokens':>12}{'gen tok/s':>11}{'wall tok/s':>12}",
    ]
    for name, r in results:
        other = r["wall_s"] - (r.get("engine_start_s") or 0) - r["generation_s"]
        lines.append(
            f"{name:<12}{r['wall_s']:>9.1f}{(r.get('engine_start_s') or 0):>10.1f}{r['generation_s']:>9.1f}{other:>9.1f}"
            f"{r['output_tokens']:>12,}{r['output_tokens'] / r['generation_s']:>11.0f}{r['output_tokens'] / r['wall_s']:>12.0f}"
        )
        if r.get("timings"):
            lines.append(f"{'':<12}hpcrollout says: {r['timings']}")
    by_way: dict[str, list[dict[str, Any]]] = {}
    for name, r in results:
        by_way.setdefault(name, []).append(r)
    if "script" in by_way and "hpcrollout" in by_way:

        def mean(way: str, key: str) -> float:
            return sum(r[key] for r in by_way[way]) / len(by_way[way])

        lines.append(
            f"hpcrollout / script (means of {len(by_way['hpcrollout'])} and {len(by_way['script'])}): wall time "
            f"{mean('hpcrollout', 'wall_s') / mean('script', 'wall_s'):.3f}, engine start "
            f"{mean('hpcrollout', 'engine_start_s') / mean('script', 'engine_start_s'):.3f}, generation time "
            f"{mean('hpcrollout', 'generation_s') / mean('script', 'generation_s'):.3f}"
        )
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--order", default="script,hpcrollout,script", help="comma-separated: script, hpcrollout")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=1024)
    parser.add_argument("--eos", action="store_true", help="samples end at EOS (default: ignore_eos, fixed lengths)")
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--max_model_len", type=int, default=8192)
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/hpcrollout-e2e-bench")
    parser.add_argument("--cache_root", default=None, help="VLLM_CACHE_ROOT shared by every process (default: WORK/cache)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")


def main(args: argparse.Namespace) -> int:
    from hpcrollout.tinymodel import ensure_model_shape

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"model-{args.shape}"
    ensure_model_shape(model, args.shape)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    inp = make_input(work / f"prompts-{stamp}.parquet", args.prompts, args.seed)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(Path(args.cache_root or work / "cache").resolve())}
    results: list[tuple[str, dict[str, Any]]] = []
    for i, way in enumerate(args.order.split(",")):
        out, log = work / f"{stamp}-{i}-{way}.parquet", work / f"{stamp}-{i}-{way}.log"
        runner = {"script": run_script, "hpcrollout": run_hpcrollout}.get(way)
        if runner is None:
            raise SystemExit(f"--order: unknown way {way!r} (script, hpcrollout)")
        res = runner(args, model, inp, out, env, log)
        print(f"{way}: {json.dumps(res)}", file=sys.stderr, flush=True)
        results.append((way, res))
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "report": text}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m hpcrollout.benchmarks.end_to_end", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    raise SystemExit(main(parser.parse_args()))
