"""Merge a run's shard outputs into one Parquet file: input order, every input column, streaming.

Refuses (clear error, non-zero exit) when any prompt is missing or doubled, naming the shards to rerun. Each
shard's input and output are read in lockstep, batch by batch, and checked row for row, so memory stays
bounded by the batch size whatever the run's size.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir, atomic_path
from hpcrollout.schema import INTERNAL_COLUMNS, OPTIONAL_FIELDS, PART_ROW, RESULT_FIELDS, ROW, UID

log = logging.getLogger("hpcrollout")


def merged_schema(rundir: RunDir, shards: list[int]) -> pa.Schema:
    """Input columns (minus internal ones), then result columns; optional ones if any shard has them."""
    first = _open_parquet(rundir.shard_input(shards[0]), _RESTORE_INPUT).schema_arrow
    fields = [f for f in first if f.name not in INTERNAL_COLUMNS]
    names = {f.name for f in fields}
    fields += [f for f in RESULT_FIELDS if f.name not in names]
    present: set[str] = set()
    for s in shards:
        out = _open_parquet(rundir.shard_output(s), _redo(rundir), rundir.done_marker(s))
        present |= set(out.schema_arrow.names)
    fields += [f for name, f in OPTIONAL_FIELDS.items() if name in present]
    return pa.schema(fields)


def check_complete(rundir: RunDir) -> list[int]:
    """All shards, or an error naming the unfinished ones and the command that finishes them."""
    n = rundir.num_shards()
    done = rundir.done_shards()
    missing = [s for s in range(n) if s not in done or not rundir.shard_output(s).exists()]
    if missing:
        shown = ", ".join(f"{s:05d}" for s in missing[:20]) + (
            f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        busy = _still_running(rundir, missing)
        if busy:
            # resume would submit nothing for these: they are being generated; the user only has to wait
            raise HpcRolloutError(
                f"{rundir.root}: {len(missing)} of {n} shards are not finished ({shown}), {busy} of them still "
                f"running or queued; wait for them (hpcrollout status {rundir.root} --watch), then merge again "
                "(or merge what is done with --partial)"
            )
        raise HpcRolloutError(
            f"{rundir.root}: {len(missing)} of {n} shards are not finished ({shown}); their prompts would be "
            f"missing. See: hpcrollout status {rundir.root}; finish them with: hpcrollout resume {rundir.root} "
            "(or merge what is done with --partial)"
        )
    return list(range(n))


def _still_running(rundir: RunDir, shards: list[int]) -> int:
    """How many of these unfinished shards are running or queued to run (status's view of the run)."""
    from hpcrollout.state import run_status

    try:
        st = run_status(rundir.root)
    except HpcRolloutError:
        return 0
    wanted = set(shards)
    return sum(1 for e in st["shards"] if e["shard"] in wanted and e["state"] in ("running", "requeued"))


def _rebatched(pf: pq.ParquetFile, batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Tables of exactly batch_rows rows (the last one shorter), whatever the file's row groups."""
    buf: list[pa.RecordBatch] = []
    have = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        buf.append(batch)
        have += batch.num_rows
        while have >= batch_rows:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, batch_rows)
            rest = table.slice(batch_rows)
            buf, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(buf)


_RESTORE_INPUT = "restore it from a backup, or start a new run_dir from the input"


def _redo(rundir: RunDir) -> str:
    return f"run: hpcrollout resume {rundir.root} (it redoes the shard)"


def _open_parquet(path: Path, next_step: str, marker: Path | None = None) -> pq.ParquetFile:
    """A run file opened for streaming, or an error naming it and what to do."""
    try:
        return pq.ParquetFile(path, pre_buffer=False)  # pre_buffer keeps every row group read
    except FileNotFoundError:
        raise HpcRolloutError(f"{path} is missing; {next_step}") from None
    except (pa.ArrowInvalid, OSError) as exc:
        delete = f"delete it and {marker}, then " if marker else ""
        raise HpcRolloutError(f"{path} is not a readable Parquet file ({exc}); {delete}{next_step}") from None


def iter_shard(
    rundir: RunDir, shard: int, schema: pa.Schema, batch_rows: int, expect_row: int | None
) -> Iterator[pa.RecordBatch]:
    inp = _open_parquet(rundir.shard_input(shard), _RESTORE_INPUT)
    out = _open_parquet(rundir.shard_output(shard), _redo(rundir), rundir.done_marker(shard))
    if inp.metadata.num_rows != out.metadata.num_rows:
        raise HpcRolloutError(
            f"shard {shard:05d}: output has {out.metadata.num_rows} rows for {inp.metadata.num_rows} prompts "
            f"({rundir.shard_output(shard)}); delete it and {rundir.done_marker(shard)}, then run: hpcrollout resume {rundir.root}"
        )
    outputs = _rebatched(out, batch_rows)
    for left in _rebatched(inp, batch_rows):
        right = next(outputs)
        rows = left.column(ROW)
        if not rows.equals(right.column(PART_ROW)) or not left.column(UID).equals(right.column("uid")):
            raise HpcRolloutError(
                f"shard {shard:05d}: output rows do not match the shard's prompts (missing or doubled); delete "
                f"{rundir.shard_output(shard)} and {rundir.done_marker(shard)}, then run: hpcrollout resume {rundir.root}"
            )
        if expect_row is not None and rows[0].as_py() != expect_row:
            raise HpcRolloutError(
                f"shard {shard:05d} starts at row {rows[0].as_py()}, expected {expect_row}: the manifest and shards disagree"
            )
        if expect_row is not None:
            expect_row += left.num_rows
        columns = []
        for field in schema:
            if field.name in left.column_names:  # an input column comes back as it was, whatever its name
                columns.append(left.column(field.name))
            elif field.name in right.column_names:
                columns.append(right.column(field.name).cast(field.type))
            else:
                columns.append(pa.nulls(left.num_rows, field.type))
        yield from pa.Table.from_arrays(columns, schema=schema).to_batches()


def iter_merged_batches(
    run_dir: str | Path, *, batch_rows: int = 1024, partial: bool = False
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The merged rows of a run as (schema, stream of record batches), in input order."""
    rundir = RunDir(run_dir)
    rundir.require()
    if partial:
        shards = sorted(s for s in rundir.done_shards() if rundir.shard_output(s).exists())
        if not shards:
            raise HpcRolloutError(f"{rundir.root}: no shard is finished yet; nothing to merge")
    else:
        shards = check_complete(rundir)
    missing = [s for s in shards if not rundir.shard_input(s).is_file()]
    if missing:
        raise HpcRolloutError(
            f"{rundir.root}: the shard input {rundir.shard_input(missing[0])} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; merge takes the input columns from it. {_RESTORE_INPUT.capitalize()}"
        )
    schema = merged_schema(rundir, shards)

    def batches() -> Iterator[pa.RecordBatch]:
        expect = None if partial else 0
        hashes: list[np.ndarray] = []
        for s in shards:
            for batch in iter_shard(rundir, s, schema, batch_rows, expect):
                if expect is not None:
                    expect += batch.num_rows
                hashes.append(uid_hashes(batch.column("uid")))
                yield batch
        # Last, before any writer renames its output into place: two prompts with one uid would share seeds.
        check_unique_uids(rundir, shards, np.concatenate(hashes) if hashes else np.empty(0, np.uint64))

    return schema, batches()


def uid_hashes(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of uids (as strings), for a uniqueness check in bounded memory."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little") for u in uids.to_pylist()],
        dtype=np.uint64,
    )


def check_unique_uids(rundir: RunDir, shards: list[int], hashes: np.ndarray) -> None:
    """Refuse a run whose merged rows share a uid (they would share sample seeds too), naming it and its rows."""
    order = np.sort(hashes)
    dup = np.flatnonzero(order[1:] == order[:-1])
    if not len(dup):
        return
    target = order[dup[0]]
    found: list[tuple[str, int]] = []
    for s in shards:  # only on failure: find the uid behind the hash, reading the uid column alone
        out = pq.read_table(rundir.shard_output(s), columns=[PART_ROW, "uid"])
        for row, uid in zip(out.column(PART_ROW).to_pylist(), out.column("uid").to_pylist()):
            if uid_hashes(pa.array([uid], pa.string()))[0] == target:
                found.append((uid, row))
    if len(found) >= 2 and found[0][0] == found[1][0]:
        raise HpcRolloutError(
            f"{rundir.root}: uid {found[0][0]!r} is at rows {found[0][1]} and {found[1][1]}; every prompt needs its "
            "own uid (it also decides the sample seeds). Make data.id_column unique (no NaN or repeated ids) and "
            "start a new run_dir"
        )


def merge_run(run_dir: str | Path, output: str | Path, *, partial: bool = False) -> dict[str, Any]:
    """Write the merged Parquet file atomically; returns counts."""
    output = check_merge_output(RunDir(run_dir), output)
    schema, batches = iter_merged_batches(run_dir, partial=partial)
    rows = responses = errors = 0
    manifest = RunDir(run_dir).manifest()
    with atomic_path(output) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in batches:
                writer.write_batch(batch, row_group_size=4096)
                rows += batch.num_rows
                responses += pc.sum(pc.list_value_length(batch.column("responses"))).as_py() or 0
                errors += batch.num_rows - batch.column("error").null_count
        # Checked inside the block: a refused merge leaves no file (and an older output as it was).
        if not partial and rows != manifest["num_rows"]:
            raise HpcRolloutError(
                f"{RunDir(run_dir).root}: merged {rows} rows but the input had {manifest['num_rows']}; the manifest's "
                f"shard table does not cover the input, nothing was written to {output}"
            )
    return {"output": str(output), "rows": rows, "responses": responses, "errors": errors}


def check_merge_output(rundir: RunDir, output: str | Path) -> Path:
    """The merged file's path: not a directory, and outside the run directory (merge must not overwrite its files)."""
    out = Path(output)
    if out.is_dir():
        raise HpcRolloutError(f"--output {out} is a directory; give a file path, e.g. {out / 'merged.parquet'}")
    root = rundir.root.resolve()
    if out.resolve() == root or out.resolve().is_relative_to(root):
        raise HpcRolloutError(
            f"--output {out} is inside the run directory {rundir.root}, whose files merge reads (and must not "
            f"overwrite); write it elsewhere, e.g. {rundir.root.parent / (rundir.root.name + '.merged.parquet')}"
        )
    return out


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run directory (run_dir of the config)")
    parser.add_argument("--output", "-o", required=True, help="merged Parquet file to write")
    parser.add_argument("--partial", action="store_true", help="merge only the finished shards (rows will be missing)")


def main(args: argparse.Namespace) -> int:
    stats = merge_run(args.run_dir, args.output, partial=args.partial)
    print(
        f"merged {stats['rows']:,} prompts, {stats['responses']:,} responses, {stats['errors']:,} error rows "
        f"-> {stats['output']}" + (" (partial)" if args.partial else "")
    )
    return 0


if __name__ == "__main__":
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
