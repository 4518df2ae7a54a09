"""Flatten a merged output to one row per response, streaming batch by batch.

Each response becomes a row: the prompt's input columns, uid, sample_index, response, response_tokens,
finish_reason, stop_reason, sample_seed, prompt_tokens, error (+ token_ids, logprobs, cumulative_logprob,
schema_valid, and hpcrollout score's score and score_detail, when present). A row with no responses (an error
record) becomes one row with null sample_index and response and its error kept, so failures are never dropped
silently.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpcrollout.errors import HpcRolloutError
from hpcrollout.schema import INTERNAL_COLUMNS, PART_ROW, RESULT_COLUMNS
from hpcrollout.sources import (
    DEFAULT_COMPRESSION,
    SAMPLE_COLUMNS,
    SCORE_COLUMNS,
    Source,
    add_input_args,
    check_output,
    check_sample_lists,
    open_source,
    parquet_output,
    run_standalone,
)

log = logging.getLogger("hpcrollout")

SAMPLE_INDEX = "sample_index"


def _scalar_type(list_type: pa.DataType) -> pa.DataType:
    return list_type.value_type


def flattened_schema(merged: pa.Schema) -> pa.Schema:
    """The flattened schema of a merged schema (see hpcrollout.schema)."""
    carried = [
        f for f in merged if f.name not in RESULT_COLUMNS and f.name not in INTERNAL_COLUMNS and f.name != PART_ROW
    ]
    carried = [f for f in carried if f.name not in SCORE_COLUMNS]
    flat_names = {v for k, v in SAMPLE_COLUMNS.items() if k not in SCORE_COLUMNS or k in merged.names}
    for f in carried:
        if f.name in flat_names or f.name == SAMPLE_INDEX:
            raise HpcRolloutError(
                f"input column {f.name!r} clashes with a flattened result column of the same name; "
                "rename it in the input before flattening"
            )
    fields = list(carried)
    if "uid" in merged.names:
        fields.append(merged.field("uid"))
    fields.append(pa.field(SAMPLE_INDEX, pa.int32()))
    for name in ("responses", "response_tokens", "finish_reasons", "stop_reasons", "sample_seeds"):
        if name in merged.names:
            fields.append(pa.field(SAMPLE_COLUMNS[name], _scalar_type(merged.field(name).type)))
    for name in ("prompt_tokens", "error", "lora_adapter"):
        if name in merged.names:
            fields.append(merged.field(name))
    for name in ("token_ids", "logprobs", "cumulative_logprobs", "schema_valid", *SCORE_COLUMNS):
        if name in merged.names:
            fields.append(pa.field(SAMPLE_COLUMNS[name], _scalar_type(merged.field(name).type)))
    return pa.schema(fields)


def flatten_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """One merged batch -> its flattened batch (rows with no responses keep one row with a null response)."""
    lengths = pc.list_value_length(batch.column("responses")).fill_null(0).to_numpy(zero_copy_only=False)
    lengths = lengths.astype(np.int64, copy=False)
    out_counts = np.maximum(lengths, 1)
    parent = np.repeat(np.arange(batch.num_rows, dtype=np.int64), out_counts)
    out_starts = np.cumsum(out_counts) - out_counts
    sample = np.arange(len(parent), dtype=np.int64) - np.repeat(out_starts, out_counts)
    real = sample < lengths[parent]  # False only on the placeholder row of an empty/null list
    parent_arr = pa.array(parent)
    by_name = dict(zip(batch.schema.names, batch.columns, strict=True))

    cols: list[pa.Array] = []
    for field in schema:
        name = field.name
        if name == SAMPLE_INDEX:
            cols.append(pa.array(sample.astype(np.int32), mask=~real))
            continue
        src = next((m for m, f in SAMPLE_COLUMNS.items() if f == name and m in by_name), None)
        if src is None:
            cols.append(by_name[name].take(parent_arr))
            continue
        col = by_name[src]
        col_len = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        starts = np.cumsum(col_len) - col_len
        ok = real & (sample < col_len[parent])
        idx = pa.array(starts[parent] + sample, mask=~ok)
        cols.append(pc.list_flatten(col).take(idx))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


@dataclass
class FlattenReport:
    """What flatten read and wrote."""

    rows: int = 0
    responses: int = 0
    error_rows: int = 0
    output_rows: int = 0


def flatten(
    input_path: str | Path, output: str | Path, batch_rows: int | None = None, compression: str = DEFAULT_COMPRESSION
) -> FlattenReport:
    """Flatten a merged file or run directory into a Parquet file with one row per response."""
    source = open_source(input_path, batch_rows)
    if source.is_flattened:
        raise HpcRolloutError(f"{source.path} is already flattened (it has a 'response' column, no 'responses')")
    out = check_output(source, output)
    schema = flattened_schema(source.schema)
    report = FlattenReport()
    with parquet_output(out, schema, compression) as writer:
        for batch in _merged_batches(source):
            check_sample_lists(batch, source.path, report.rows)
            flat = flatten_batch(batch, schema)
            writer.write_batch(flat)
            report.rows += batch.num_rows
            report.output_rows += flat.num_rows
            report.responses += int(pc.sum(pc.list_value_length(batch.column("responses"))).as_py() or 0)
            if "error" in batch.schema.names:
                report.error_rows += batch.num_rows - batch.column("error").null_count
    log.debug(
        "flattened %s rows into %s rows (%s responses) -> %s", report.rows, report.output_rows, report.responses, out
    )
    return report


def _merged_batches(source: Source):  # noqa: ANN202 - iterator of RecordBatch
    drop = set(INTERNAL_COLUMNS) | {PART_ROW}
    keep = [n for n in source.schema.names if n not in drop]
    return source.batches(keep if len(keep) != len(source.schema.names) else None)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, output="parquet")


def main(args: argparse.Namespace) -> int:
    r = flatten(args.input, args.output, args.batch_rows, args.compression)
    print(
        f"flattened {r.rows:,} rows ({r.responses:,} responses, {r.error_rows:,} error rows) "
        f"into {r.output_rows:,} rows -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_standalone(__doc__.splitlines()[0], add_cli_args, main))
