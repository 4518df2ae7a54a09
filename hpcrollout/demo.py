"""The demo: build a tiny model and a small prompt file, run the whole pipeline locally on CPU, merge, summarise.

    hpcrollout demo [--dir runs/demo]

Uses configs/demo.yaml when run from the repository, else the same config embedded here. A config with
``demo: true`` (configs/demo.yaml) builds the tiny model at model.path and the demo prompts at data.input where
they are missing, so `python -m hpcrollout.submit --config configs/demo.yaml` needs no earlier step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from hpcrollout.config import build_config, load_config
from hpcrollout.executors.local import run_local
from hpcrollout.merge import merge_run
from hpcrollout.rundir import RunDir, atomic_path
from hpcrollout.shard import prepare_run
from hpcrollout.tinymodel import ensure_tiny_model

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_PROMPTS = 24
EMBEDDED = {
    "run_dir": "../runs/demo/run",
    "backend": "transformers",
    "demo": True,
    "data": {"input": "../runs/demo/input.parquet"},
    "model": {"path": "../runs/demo/model"},
    "sampling": {"n": 4, "temperature": 0.8, "top_p": 0.95, "max_tokens": 48, "seed": 1234},
    "sharding": {"num_shards": 4},
    "checkpoint": {"every_prompts": 4, "every_seconds": 10},
    "executor": {"type": "local", "num_tasks": 2, "local_parallelism": 2},
}

TOPICS = [
    "prime numbers",
    "photosynthesis",
    "the French revolution",
    "binary search",
    "tides",
    "sourdough bread",
    "black holes",
    "the Krebs cycle",
    "Rust lifetimes",
    "plate tectonics",
    "compound interest",
    "haiku",
]


def demo_prompts(n: int = 24) -> pa.Table:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        messages = [{"role": "user", "content": f"Explain {topic} in two sentences."}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a concise tutor."})
        rows.append({"prompt": messages, "topic": topic, "difficulty": i % 5, "source": "demo"})
    return pa.Table.from_pylist(rows)


def ensure_demo_inputs(config: RunConfig, prompts: int = DEMO_PROMPTS) -> None:
    """demo: true: build the tiny model at model.path and the demo prompts at data.input where they are missing."""
    if not config.demo:
        return
    config.require("model.path", "data.input")
    model = Path(config.model.path)
    if not (model / "config.json").is_file():
        print(f"demo: building a tiny random-weight model in {model} ...", flush=True)
    ensure_tiny_model(model)
    data = Path(config.data.input)
    if not data.exists():
        with atomic_path(data) as tmp:
            pq.write_table(demo_prompts(prompts), tmp)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="runs/demo", help="where the model, input, run directory and output go")
    parser.add_argument(
        "--prompts", type=int, default=DEMO_PROMPTS, help="prompts in the demo input (when it is built)"
    )


def main(args: argparse.Namespace) -> int:
    base = Path(args.dir).resolve()  # the run's config.yaml then names paths that work from anywhere
    tree = yaml.safe_load(DEMO_CONFIG.read_text()) if DEMO_CONFIG.is_file() else json.loads(json.dumps(EMBEDDED))
    tree["run_dir"], tree["data"]["input"], tree["model"]["path"] = (
        str(base / "run"),
        str(base / "input.parquet"),
        str(base / "model"),
    )
    tree["demo"] = True
    config = build_config(tree, str(DEMO_CONFIG))
    ensure_demo_inputs(config, args.prompts)
    rundir = RunDir(config.run_dir)
    with rundir.lock("demo"):
        prepare_run(config)
        codes = run_local(rundir.root, list(range(config.executor.num_tasks)), config.executor.local_parallelism)
    if any(codes.values()):
        print(f"tasks failed: {codes}; logs in {rundir.logs_dir}")
        return 1
    output = base / "merged.parquet"
    stats = merge_run(rundir.root, output)
    print(f"merged {stats['rows']} prompts, {stats['responses']} responses -> {output}")
    from hpcrollout.analyze import analyze, format_report

    print(format_report(analyze(rundir.root, plot=base / "lengths.png")))
    print(f"plot of response lengths and finish reasons: {base / 'lengths.png'}")
    print(f"next: hpcrollout status {rundir.root}; hpcrollout flatten {output} --output {base / 'flat.parquet'}")
    return 0


__all__ = ["main", "add_cli_args", "load_config"]

if __name__ == "__main__":
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
