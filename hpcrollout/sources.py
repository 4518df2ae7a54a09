"""Open any post-processing input as a stream of Arrow batches: a merged file, a flattened file, or a run directory.

Every post-processing command (flatten, analyze, filter, export) reads through here, so memory stays bounded by
one batch whatever the file size: Parquet is read with ``ParquetFile.iter_batches`` (batches of about 12 MiB), a run
directory through ``hpcrollout.merge.iter_merged_batches``. Outputs are written incrementally with a
``ParquetWriter`` on a temp file that is renamed over the destination only on success.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir, atomic_path

log = logging.getLogger("hpcrollout")

MERGED = "merged"
FLATTENED = "flattened"

# Per-sample list columns of a merged file -> their scalar column in a flattened file.
SAMPLE_COLUMNS = {
    "responses": "response",
    "response_tokens": "response_tokens",
    "finish_reasons": "finish_reason",
    "stop_reasons": "stop_reason",
    "sample_seeds": "sample_seed",
    "token_ids": "token_ids",
    "logprobs": "logprobs",
    "cumulative_logprobs": "cumulative_logprob",
    "schema_valid": "schema_valid",
    "scores": "score",  # hpcrollout score
    "score_details": "score_detail",
}
# The per-sample columns hpcrollout score adds (not generation results: a user column may share their flat names).
SCORE_COLUMNS = ("scores", "score_details")

# Aim for batches of about this many (Parquet-encoded, uncompressed) bytes; long rows get fewer rows per batch.
# Flattening 10^6 rows peaked at 392 MiB RSS with 16k-row batches, 833 MiB with 64k, for the same CPU time.
TARGET_BATCH_BYTES = 12 << 20
MAX_BATCH_ROWS = 65_536
MIN_BATCH_ROWS = 16
READ_BUFFER_BYTES = 4 << 20
# snappy, Arrow's default: writing a flattened 10^6-row file took 27% less CPU than zstd, for files ~50% larger.
DEFAULT_COMPRESSION = "snappy"
COMPRESSIONS = ("snappy", "zstd", "lz4", "gzip", "none")


@dataclass
class Source:
    """One opened input: its kind, schema and a way to stream its batches."""

    path: Path
    kind: str  # MERGED or FLATTENED
    schema: pa.Schema
    run_dir: RunDir | None = None
    num_rows: int | None = None  # known up front for Parquet files
    batch_rows: int = MAX_BATCH_ROWS
    partial: bool = False  # run directory: only the finished shards
    _file: pq.ParquetFile | None = None

    @property
    def is_flattened(self) -> bool:
        return self.kind == FLATTENED

    def has(self, column: str) -> bool:
        return column in self.schema.names

    def require(self, *columns: str, why: str = "") -> None:
        """Raise naming the file if a needed column is absent."""
        missing = [c for c in columns if not self.has(c)]
        if missing:
            raise HpcRolloutError(
                f"{self.path} has no column {', '.join(repr(c) for c in missing)}"
                + (f" (needed {why})" if why else "")
                + f"; its columns are: {', '.join(self.schema.names)}"
            )

    def batches(self, columns: Sequence[str] | None = None, prefetch: int = 2) -> Iterator[pa.RecordBatch]:
        """Stream the input in batches, projected to ``columns`` (those present, in that order) if given.

        With ``prefetch`` > 0 a thread reads up to that many batches ahead, so decoding overlaps the caller's
        work (Arrow releases the GIL); memory grows by at most that many batches.
        """
        it = self._read(None if columns is None else [c for c in columns if self.has(c)])
        return _prefetched(it, prefetch) if prefetch > 0 else it

    def _read(self, cols: list[str] | None) -> Iterator[pa.RecordBatch]:
        if self._file is not None:
            yield from self._file.iter_batches(batch_size=self.batch_rows, columns=cols, use_threads=True)
            return
        assert self.run_dir is not None
        _, it = _iter_run_dir(self.run_dir, self.batch_rows, self.partial)
        for batch in it:
            yield batch if cols is None else batch.select(cols)


_DONE = object()


def _prefetched(it: Iterator[pa.RecordBatch], depth: int) -> Iterator[pa.RecordBatch]:
    """Iterate ``it`` in a background thread, at most ``depth`` items ahead; errors re-raise here."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(exc)

    thread = threading.Thread(target=produce, name="hpcrollout-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(timeout=0.05)


def _iter_run_dir(run_dir: RunDir, batch_rows: int, partial: bool) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    # Imported lazily: merge pulls in the run machinery, which the file-only commands never need.
    from hpcrollout.merge import iter_merged_batches

    return iter_merged_batches(run_dir.root, batch_rows=batch_rows, partial=partial)


def _kind_of(path: Path, schema: pa.Schema) -> str:
    names = set(schema.names)
    if "responses" in names:
        return MERGED
    if "response" in names:
        return FLATTENED
    raise HpcRolloutError(
        f"{path} has neither a 'responses' column (merged output) nor a 'response' column (flattened output); "
        f"its columns are: {', '.join(schema.names) or '(none)'}. Pass a file written by hpcrollout merge or flatten, "
        "or a run directory"
    )


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _list_of(pred):  # noqa: ANN001, ANN202 - a type predicate -> a list-of-that predicate
    # an all-null column (pyarrow infers type null) fits any type
    return lambda t: (
        (pa.types.is_list(t) or pa.types.is_large_list(t)) and (pa.types.is_null(t.value_type) or pred(t.value_type))
    )


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


# The result columns post-processing reads, with the types merge and flatten write (and a name for messages).
RESULT_TYPES: dict[str, dict[str, tuple[Any, str]]] = {
    MERGED: {
        "responses": (_list_of(_is_str), "list<string>"),
        "response_tokens": (_list_of(pa.types.is_integer), "list<int32>"),
        "finish_reasons": (_list_of(_is_str), "list<string>"),
        "stop_reasons": (_list_of(_is_str), "list<string>"),
        "sample_seeds": (_list_of(pa.types.is_integer), "list<int64>"),
        "prompt_tokens": (pa.types.is_integer, "int32"),
        "error": (_is_str, "string"),
        "token_ids": (_list_of(_list_of(pa.types.is_integer)), "list<list<int32>>"),
        "logprobs": (_list_of(_list_of(_is_num)), "list<list<float32>>"),
        "cumulative_logprobs": (_list_of(_is_num), "list<float64>"),
        "schema_valid": (_list_of(pa.types.is_boolean), "list<bool>"),
        "lora_adapter": (_is_str, "string"),
    },
    FLATTENED: {
        "response": (_is_str, "string"),
        "response_tokens": (pa.types.is_integer, "int32"),
        "finish_reason": (_is_str, "string"),
        "stop_reason": (_is_str, "string"),
        "sample_seed": (pa.types.is_integer, "int64"),
        "sample_index": (pa.types.is_integer, "int32"),
        "schema_valid": (pa.types.is_boolean, "bool"),
        "lora_adapter": (_is_str, "string"),
        "prompt_tokens": (pa.types.is_integer, "int32"),
        "error": (_is_str, "string"),
    },
}


def check_result_types(path: Path, schema: pa.Schema, kind: str) -> None:
    """Refuse a file whose result columns have other types than merge/flatten write, naming the column."""
    for name, (ok, expected) in RESULT_TYPES[kind].items():
        if name in schema.names and not (pa.types.is_null(schema.field(name).type) or ok(schema.field(name).type)):
            raise HpcRolloutError(
                f"{path}: column {name!r} is {schema.field(name).type}, but a {kind} hpcrollout output has {expected} "
                "there; pass a file written by hpcrollout merge or flatten (or rename that column)"
            )


def _auto_batch_rows(meta: pq.FileMetaData) -> int:
    if meta.num_rows == 0 or meta.num_row_groups == 0:
        return MAX_BATCH_ROWS
    nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(1.0, nbytes / meta.num_rows)
    return int(min(MAX_BATCH_ROWS, max(MIN_BATCH_ROWS, TARGET_BATCH_BYTES // per_row)))


def open_source(path: str | Path, batch_rows: int | None = None, partial: bool = False) -> Source:
    """Open a merged or flattened Parquet file, or a run directory (read as its merged output).

    ``partial``: a run directory may be unfinished; read the shards finished so far.
    """
    path = Path(path)
    if path.is_dir():
        rd = RunDir(path)
        if not rd.exists():
            raise HpcRolloutError(
                f"{path} is a directory but not a run directory (no manifest.json); "
                "pass a merged or flattened Parquet file, or a run directory made by hpcrollout submit"
            )
        rows = batch_rows or 16_384
        schema, it = _iter_run_dir(rd, rows, partial)
        close = getattr(it, "close", None)
        if close is not None:  # only the schema was wanted here; batches() starts a fresh iteration
            close()
        return Source(
            path=path, kind=_kind_of(path, schema), schema=schema, run_dir=rd, batch_rows=rows, partial=partial
        )
    if not path.exists():
        raise HpcRolloutError(f"{path} does not exist; pass a merged or flattened Parquet file or a run directory")
    try:
        # pre_buffer (the default) caches the raw column chunks of every row group read so far until the file is
        # closed: reading a 10^6-row merged file peaked at 218 MiB of Arrow memory with it, 61 MiB without.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise HpcRolloutError(f"{path} is not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    kind = _kind_of(path, schema)
    check_result_types(path, schema, kind)
    return Source(
        path=path,
        kind=kind,
        schema=schema,
        num_rows=pf.metadata.num_rows,
        batch_rows=batch_rows or _auto_batch_rows(pf.metadata),
        _file=pf,
    )


class WholePrompts:
    """Flattened rows re-cut at prompt boundaries, so that no prompt (a run of one uid) spans two tables.

    ``push(table)`` takes the next rows and returns the complete prompts among everything pushed so far, the last
    uid run held back because the next rows may continue it; ``push(None)`` at the end returns what was held
    back. A null uid is a prompt of its own row. Used by analyze, scoring metrics and filter, which read
    flattened files in batches of rows, not of prompts.
    """

    def __init__(self) -> None:
        self._pending: pa.Table | None = None

    def push(self, table: pa.Table | None) -> pa.Table | None:
        """Complete prompts so far as one-chunk table (None: nothing complete yet); ``table`` None: the end."""
        if table is None:
            table, self._pending = self._pending, None
            return table.combine_chunks() if table is not None and table.num_rows else None
        if self._pending is not None:
            table = pa.concat_tables([self._pending, table])
        table = table.combine_chunks()
        if table.num_rows == 0:
            self._pending = None
            return None
        cut = int(np.flatnonzero(prompt_starts(table.column("uid").chunk(0)))[-1])
        self._pending = table.slice(cut)
        return table.slice(0, cut) if cut else None


def prompt_starts(uid: pa.Array) -> np.ndarray:
    """True where a prompt starts in flattened rows: the first row and every change of uid (a null uid included)."""
    starts = np.ones(len(uid), dtype=bool)
    if len(uid) > 1:
        starts[1:] = pc.not_equal(uid[1:], uid[:-1]).fill_null(True).to_numpy(zero_copy_only=False)
    return starts


def whole_prompt_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Flattened batches re-cut so that no prompt (a run of one uid) spans two of them (see WholePrompts)."""
    prompts = WholePrompts()
    for batch in batches:
        if (table := prompts.push(pa.Table.from_batches([batch]))) is not None:
            yield from table.to_batches()
    if (table := prompts.push(None)) is not None:
        yield from table.to_batches()


class BackgroundWriter:
    """Writes batches in a thread (Arrow releases the GIL), so encoding overlaps reading and computing.

    At most ``depth`` batches wait in the queue; the first write error re-raises in the caller.
    """

    def __init__(self, writer: pq.ParquetWriter, depth: int = 2) -> None:
        self._writer = writer
        self._queue: queue.Queue[pa.RecordBatch | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hpcrollout-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write_batch(batch)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def finish(self) -> None:
        """Wait until every queued batch is written; re-raise a write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def parquet_output(
    dest: str | Path, schema: pa.Schema, compression: str = DEFAULT_COMPRESSION
) -> Iterator[BackgroundWriter]:
    """A writer on a temp file next to ``dest``, renamed over it only if the block (and every write) succeeds."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression=compression)
        background = BackgroundWriter(writer)
        try:
            yield background
        finally:
            try:
                background.finish()
            finally:
                writer.close()


def check_sample_lists(batch: pa.RecordBatch, path: Path, first_row: int) -> None:
    """Refuse a merged batch whose per-sample list columns do not have one entry per response."""
    lengths = pc.list_value_length(batch.column("responses")).fill_null(0).to_numpy(zero_copy_only=False)
    for name in SAMPLE_COLUMNS:
        if name == "responses" or name not in batch.schema.names:
            continue
        other = pc.list_value_length(batch.column(name)).fill_null(0).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(other != lengths)
        if bad.size:
            i = int(bad[0])
            raise HpcRolloutError(
                f"{path}: row {first_row + i} has {lengths[i]} responses but {other[i]} {name}; "
                "per-sample list columns must have one entry per response"
            )


def check_output(source: Source, output: str | Path) -> Path:
    """Refuse to overwrite the input with the output (the rename would destroy it mid-read)."""
    out = Path(output)
    if out.exists() and source._file is not None and out.resolve() == source.path.resolve():
        raise HpcRolloutError(f"--output {out} is the input file; choose another output path")
    if out.is_dir():
        raise HpcRolloutError(f"--output {out} is a directory; give a file path")
    return out


def add_input_args(parser, output: bool | str) -> None:  # noqa: ANN001 - argparse parser or subparser
    """The input argument (and --output) shared by every post-processing command."""
    parser.add_argument("input", help="Merged or flattened Parquet file, or a run directory.")
    if output:
        parser.add_argument("--output", "-o", required=True, help="Output path (written atomically).")
        if output == "parquet":
            parser.add_argument(
                "--compression",
                choices=COMPRESSIONS,
                default=DEFAULT_COMPRESSION,
                help="Parquet compression of the output (default: %(default)s; zstd gives smaller files, slower).",
            )
    parser.add_argument(
        "--batch_rows",
        "--batch-rows",
        type=int,
        default=None,
        help="Rows per batch read (default: sized from the file to about 12 MiB per batch).",
    )


def run_standalone(description: str, add_cli_args, main) -> int:  # noqa: ANN001 - the module's own functions
    """``python -m hpcrollout.<command>``: parse, run, and print user errors without a traceback."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    add_cli_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(parser.parse_args())
    except HpcRolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
