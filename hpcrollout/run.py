"""A whole run on this machine: shard, generate, merge. The seed's `vllm_rollout.py`, resumable.

    hpcrollout run --model_path M --input in.parquet --output out.parquet --n_samples 8 --max_tokens 2048

Flags set config keys; `--config FILE` and `--set key=value` reach every other key (precedence: file, then
flags, then --set). The run directory (default: OUTPUT.run/) keeps checkpoints: run the same command again
after a crash and it continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hpcrollout.config import RunConfig, add_override_arg, load_config
from hpcrollout.errors import HpcRolloutError
from hpcrollout.executors.local import run_local
from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from hpcrollout.submit import preflight
from hpcrollout.worker import EngineMeter, run_task

log = logging.getLogger("hpcrollout")

# flag -> (dotted config key, type, help); each flag takes both the seed's underscore and a dash spelling
FLAGS: dict[str, tuple[str, type, str]] = {
    "model_path": ("model.path", str, "model directory or name"),
    "input": ("data.input", str, "input Parquet file with a 'prompt' column"),
    "run_dir": ("run_dir", str, "run directory for checkpoints (default: OUTPUT.run)"),
    "backend": ("backend", str, "vllm (default) or transformers"),
    "n_samples": ("sampling.n", int, "responses per prompt"),
    "max_tokens": ("sampling.max_tokens", int, "max new tokens per response"),
    "temperature": ("sampling.temperature", float, None),
    "top_p": ("sampling.top_p", float, None),
    "top_k": ("sampling.top_k", int, None),
    "min_p": ("sampling.min_p", float, None),
    "seed": ("sampling.seed", int, "run seed (per-prompt seeds derive from it)"),
    "tensor_parallel_size": ("engine.tensor_parallel_size", int, "default: GPUs visible to the task"),
    "gpu_memory_utilization": ("engine.gpu_memory_utilization", float, None),
    "max_model_len": ("engine.max_model_len", int, None),
    "max_num_seqs": ("engine.max_num_seqs", int, None),
    "num_tasks": ("executor.num_tasks", int, "local array tasks (processes)"),
    "parallelism": ("executor.local_parallelism", int, "local tasks run at once"),
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True, help="merged output Parquet file")
    for flag, (key, typ, help_text) in FLAGS.items():
        names = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
        parser.add_argument(*names, dest=flag, type=typ, default=None, help=help_text or key)
    parser.add_argument("--config", help="a run config YAML (any key; flags override it)")
    add_override_arg(parser)
    parser.add_argument("--force", action="store_true", help="continue a run directory despite changed settings")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    base: dict[str, Any] = {
        key: getattr(args, flag) for flag, (key, _, _) in FLAGS.items() if getattr(args, flag) is not None
    }
    base["executor.type"] = "local"
    config = load_config(args.config, args.overrides, base)
    if not config.run_dir:
        config.run_dir = str(Path(args.output).resolve().with_suffix("")) + ".run"
    return config


def check_backend(config: RunConfig) -> None:
    if config.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise HpcRolloutError(
            "the default backend is vLLM, which is not installed here; install it (pip install 'hpcrollout[vllm]') "
            "or run on CPU with --backend transformers"
        )


def bar_updater(bar: Any) -> Callable[[Any, EngineMeter], None]:
    """The per-result callback of the progress bar: one prompt more, and the engine's live generated tok/s."""

    def update(result: Any, meter: EngineMeter) -> None:
        bar.set_postfix_str(f"{meter.sample()['tokens_per_s']:,.0f} generated tok/s", refresh=False)
        bar.update(1)

    return update


@contextlib.contextmanager
def progress_bar(rundir: RunDir) -> Iterator[Callable[[Any, EngineMeter], None] | None]:
    """A progress bar on a terminal; elsewhere (SLURM, CI, files) the worker's periodic log lines suffice."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    manifest = rundir.manifest()
    done = sum(s["prompts"] for s in manifest["shards"] if rundir.is_done(s["shard"]))
    with tqdm(total=manifest["num_rows"], initial=done, unit="prompt", dynamic_ncols=True) as bar, \
            logging_redirect_tqdm(loggers=[log]):
        yield bar_updater(bar)


def run(config: RunConfig, output: str | Path | None, *, force: bool = False) -> dict[str, Any]:
    """Prepare (or reopen) the run directory, run every task here, merge into output."""
    check_backend(config)
    preflight(config)  # before the run directory exists: a missing model creates nothing
    rundir = RunDir(config.run_dir)
    started = time.monotonic()
    timings: dict[str, float] = {"process_start_s": _since_process_start()}
    with rundir.lock("run"):
        prepare_run(config, force=force)
        timings["prepare_s"] = time.monotonic() - started
        tasks = list(range(config.executor.num_tasks))
        if len(tasks) == 1:
            with progress_bar(rundir) as on_result:
                summary = run_task(rundir.root, 0, on_result=on_result)
            timings.update(summary.get("timings", {}))
            attempts = [r for r in summary["results"] if "elapsed_s" in r]
            if attempts:
                engine = attempts[0]["engine"]
                if "import_s" in engine:
                    timings["engine_import_s"] = float(engine["import_s"])
                timings["engine_start_s"] = max(float(r["engine"].get("engine_start_s", 0.0)) for r in attempts)
                timings["generation_s"] = sum(float(r["elapsed_s"]) for r in attempts)
        else:
            codes = run_local(rundir.root, tasks, config.executor.local_parallelism)
            failed = sorted(t for t, c in codes.items() if c)
            if failed:
                raise HpcRolloutError(
                    f"task(s) {failed} failed; see {rundir.logs_dir}/local-task-N.log, then run this command again"
                )
    timings["tasks_s"] = time.monotonic() - started - timings["prepare_s"]
    if output is None:
        return {"run_dir": str(rundir.root), "timings": _rounded(timings, started)}
    merging = time.monotonic()
    stats = merge_run(rundir.root, output)
    timings["merge_s"] = time.monotonic() - merging
    return {"run_dir": str(rundir.root), **stats, "timings": _rounded(timings, started)}


def _since_process_start() -> float:
    """Seconds from this process's start to now: the interpreter and the imports before run()."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # no /proc or no psutil: unknown, say 0
        return 0.0


def _rounded(timings: dict[str, float], started: float) -> dict[str, float]:
    return {**{k: round(v, 3) for k, v in timings.items()}, "total_s": round(time.monotonic() - started, 3)}


def describe_timings(t: dict[str, float]) -> str:
    """'took 127.0 s: imports 1.2 s, prepare 0.3 s, ..., merge 0.4 s' (the engine's parts are within the tasks')."""
    parts = [("imports", "process_start_s"), ("prepare", "prepare_s"), ("engine load", "engine_create_s"), ("of it vllm import", "engine_import_s"),
             ("of it engine start", "engine_start_s"), ("generation", "generation_s"), ("shards in all", "shards_s"), ("engine close", "engine_close_s"),
             ("tasks in all", "tasks_s"),
             ("merge", "merge_s")]
    shown = [f"{name} {t[key]:.1f} s" for name, key in parts if key in t]
    total = t["total_s"] + t.get("process_start_s", 0.0)
    return f"took {total:.1f} s: " + ", ".join(shown)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    stats = run(config, args.output, force=args.force)
    if "rows" in stats:
        print(
            f"wrote {stats['rows']:,} prompts, {stats['responses']:,} responses ({stats['errors']:,} error rows) to {stats['output']}"
        )
    print(f"run directory: {stats['run_dir']}")
    print(describe_timings(stats["timings"]))
    return 0


if __name__ == "__main__":
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
