"""Sharding at scale: time and peak RSS of prepare_run on a generated N-row input (default 10^7).

    python -m hpcrollout.benchmarks.sharding --rows 10000000 --shards 256 [--dir /tmp/shardbench]

Prints rows/s and the child process's peak RSS: the sharder streams row groups, so RSS should stay flat as N
grows (the per-row work estimate, 4 bytes a row, is the only thing that scales with N).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they", "at", "be", "this", "have", "from"]


def generate(path: Path, rows: int, group: int = 100_000) -> None:
    """A chat-prompt Parquet file with a few carried columns, written in row groups."""
    schema = None
    with pq.ParquetWriter(path, pa.schema([
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("id", pa.int64()), ("source", pa.string()),
    ]), compression="zstd") as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            contents = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(5 + i % 40)) for i in range(start, start + n)]
            prompts = [[{"role": "user", "content": c}] for c in contents]
            writer.write_table(pa.table({"prompt": prompts, "id": pa.array(range(start, start + n), pa.int64()),
                                         "source": ["bench"] * n}, schema=writer.schema))
    del schema


CHILD = """
import json, sys, time
from hpcrollout.config import build_config
from hpcrollout.shard import prepare_run
cfg = build_config(json.loads(sys.argv[1]))
t = time.time()
prepare_run(cfg)
print(json.dumps({"seconds": time.time() - t}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=256)
    p.add_argument("--dir", default="/tmp/hpcrollout-shardbench")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    inp = base / "input.parquet"
    t = time.time()
    generate(inp, args.rows)
    print(f"generated {args.rows:,} rows in {time.time() - t:.0f}s ({inp.stat().st_size / 2**20:.0f} MiB)")
    tree = {"run_dir": str(base / "run"), "backend": "transformers", "data": {"input": str(inp)},
            "model": {"path": "unused"}, "sampling": {"n": 4, "max_tokens": 512},
            "sharding": {"num_shards": args.shards, "max_prompts_per_shard": max(1, args.rows // args.shards + 1)}}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(tree)], capture_output=True, text=True, check=True)
    seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    print(f"sharded {args.rows:,} rows into {args.shards} shards in {seconds:.0f}s "
          f"({args.rows / seconds:,.0f} rows/s), peak RSS {rss:,.0f} MiB")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
