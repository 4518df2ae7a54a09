"""Score every response against its row's reference answer, streaming: ``hpcrollout score INPUT``.

INPUT is a merged file, a flattened file or a run directory. A merged output gains ``scores`` (list<double>,
aligned with ``responses``) and ``score_details`` (list<struct<answer, status, message>>: the extracted answer,
or why there is none); a flattened output gains ``score`` and ``score_detail``. Every other column is left
alone, in order (columns of those names already present are replaced where they stand).

Invariants:
- Memory is bounded by a few input batches and ``workers x 3`` chunks in flight, whatever the input size.
- Every response gets exactly one outcome (see verifiers.py); no response can hang the run (see pool.py).
- A run directory is scored shard by shard into ``scores/SHARD.parquet`` (uid, scores, score_details), each
  written atomically and stamped with the verifier settings and the shard output it was made from, so a killed
  run resumes at the first shard not scored, and a changed setting or a regenerated shard is scored again.
  The output is then assembled from the shard outputs and score files in input order, uid checked row by row.
- One shard is also the unit of a SLURM CPU array: ``hpcrollout score RUN_DIR --shards $SLURM_ARRAY_TASK_ID``
  (or ``--slurm``, which submits that array through submitit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout.errors import HpcRolloutError
from hpcrollout.rundir import RunDir
from hpcrollout.schema import INTERNAL_COLUMNS, PART_ROW
from hpcrollout.scoring.pool import Outcomes, RowTask, VerifierPool, default_workers
from hpcrollout.scoring.verifiers import STATUSES, VerifierSpec
from hpcrollout.sources import (
    DEFAULT_COMPRESSION,
    add_input_args,
    check_output,
    open_source,
    parquet_output,
    run_standalone,
)

log = logging.getLogger("hpcrollout")

SCORES, DETAILS = "scores", "score_details"  # merged layout
SCORE, DETAIL = "score", "score_detail"  # flattened layout
DETAIL_TYPE = pa.struct([("answer", pa.string()), ("status", pa.string()), ("message", pa.string())])
SCORES_FIELD = pa.field(SCORES, pa.list_(pa.float64()))
DETAILS_FIELD = pa.field(DETAILS, pa.list_(DETAIL_TYPE))
# Where the reference usually is, tried in order when --reference is not given.
REFERENCE_CANDIDATES = ("reference", "answer", "ground_truth", "reward_model.ground_truth", "solution")
# Not handed to a python verifier's row dict: the response itself, and the heavy per-token lists.
NOT_IN_ROW = {"responses", "response", "token_ids", "logprobs", SCORES, DETAILS, SCORE, DETAIL}
SPEC_KEY = b"hpcrollout.scoring"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CHUNK = 256  # responses per task handed to a worker (whole rows)
LOG_EVERY_S = 30.0


@dataclass
class ScoreReport:
    """What was scored."""

    input: str = ""
    output: str | None = None
    kind: str = ""
    verifier: str = ""
    reference: str | None = None
    rows: int = 0  # scored by this call
    responses: int = 0
    rows_out: int | None = None  # rows written to the output
    statuses: dict[str, int] = field(default_factory=dict)
    mean_score: float | None = None
    seconds: float = 0.0
    responses_per_s: float | None = None
    workers_killed: int = 0
    shards_scored: list[int] = field(default_factory=list)
    shards_reused: list[int] = field(default_factory=list)
    shards_not_finished: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sum, self._n = 0.0, 0  # not fields: left out of the JSON report

    def add(self, outcomes: Outcomes) -> None:
        for status, count in Counter(outcomes.statuses).items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        scored = [x for x in outcomes.scores if x is not None]
        self._sum += math.fsum(scored)
        self._n += len(scored)
        self.responses += len(outcomes)

    def finish(self, started: float) -> None:
        self.seconds = round(time.monotonic() - started, 3)
        self.mean_score = round(self._sum / self._n, 6) if self._n else None
        self.responses_per_s = round(self.responses / self.seconds, 1) if self.seconds > 0 else None


@dataclass(frozen=True)
class Settings:
    """How to score: the verifier, where the reference is, and the resources."""

    verifier: str
    reference: str | None = None  # None: auto (REFERENCE_CANDIDATES) for built-ins, none for python verifiers
    timeout_s: float = DEFAULT_TIMEOUT_S
    workers: int | None = None  # None: default_workers(); 0: score in this process
    chunk: int = DEFAULT_CHUNK

    def fingerprint(self, reference: str | None) -> dict[str, Any]:
        """What makes two scorings of a shard the same (resources excluded)."""
        return {"verifier": self.verifier, "reference": reference, "timeout_s": float(self.timeout_s)}


# ---------------------------------------------------------------------------------------------- references


_SCALAR_OK = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_integer,
    pa.types.is_floating,
    pa.types.is_boolean,
    pa.types.is_null,
)


def _reference_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return any(check(t) for check in _SCALAR_OK)


def resolve_reference(schema: pa.Schema, path: Path, name: str | None, required: bool) -> tuple[str | None, list[str]]:
    """The reference's name and its dotted path (column, then struct fields); an error names what is wrong."""
    if name is None:
        if not required:  # a python verifier reads what it wants from the row
            return None, []
        for candidate in REFERENCE_CANDIDATES:
            try:
                return resolve_reference(schema, path, candidate, True)
            except HpcRolloutError:
                continue
        raise HpcRolloutError(
            f"{path} has none of the usual reference columns ({', '.join(REFERENCE_CANDIDATES)}); name it with "
            f"--reference COLUMN (or COLUMN.FIELD for a nested field); its columns are: {', '.join(schema.names)}"
        )
    if name in schema.names:
        parts = [name]
    else:
        parts = name.split(".")
        if parts[0] not in schema.names:
            raise HpcRolloutError(
                f"--reference {name}: {path} has no column {parts[0]!r}; its columns are: {', '.join(schema.names)}"
            )
    t = schema.field(parts[0]).type
    for i, part in enumerate(parts[1:], start=1):
        if not pa.types.is_struct(t) or t.get_field_index(part) < 0:
            where = ".".join(parts[:i])
            fields = ", ".join(t.field(k).name for k in range(t.num_fields)) if pa.types.is_struct(t) else None
            raise HpcRolloutError(
                f"--reference {name}: {where} ({t}) has no field {part!r}"
                + (f"; its fields are: {fields}" if fields else "")
            )
        t = t.field(part).type
    if not _reference_type_ok(t):
        raise HpcRolloutError(
            f"--reference {name}: the reference holds {t}; it must be a string, a number, or a list of them "
            "(for a struct, name the field: --reference COLUMN.FIELD)"
        )
    return name, parts


def reference_array(batch: pa.RecordBatch, parts: list[str]) -> pa.Array:
    col = batch.column(parts[0])
    for part in parts[1:]:
        col = pc.struct_field(col, part)
    return col


# ---------------------------------------------------------------------------------------------- batches


def _row_columns(schema: pa.Schema) -> list[str]:
    return [n for n in schema.names if n not in NOT_IN_ROW]


def _chunks(
    batch: pa.RecordBatch, flat: bool, parts: list[str], with_rows: bool, chunk: int
) -> Iterator[list[RowTask]]:
    """The batch's rows as verifier tasks of about ``chunk`` responses each (rows are never split)."""
    if flat:
        responses = [[r] for r in batch.column("response").to_pylist()]
    else:
        responses = [r or [] for r in batch.column("responses").to_pylist()]
    refs = reference_array(batch, parts).to_pylist() if parts else [None] * batch.num_rows
    rows = batch.select(_row_columns(batch.schema)).to_pylist() if with_rows else [None] * batch.num_rows
    tasks: list[RowTask] = []
    size = 0
    for resp, ref, row in zip(responses, refs, rows, strict=True):
        if flat and resp == [None]:  # an error record of a flattened file: no response to score
            resp = []
        tasks.append((resp, ref, row))
        size += max(1, len(resp))
        if size >= chunk:
            yield tasks
            tasks, size = [], 0
    if tasks:
        yield tasks


def score_arrays(batch: pa.RecordBatch, outcomes: Outcomes, flat: bool) -> tuple[pa.Array, pa.Array]:
    """The new columns of one batch from its outcomes (in row, then response order)."""
    scores = pa.array(outcomes.scores, pa.float64())
    details = pa.StructArray.from_arrays(
        [
            pa.array(outcomes.answers, pa.string()),
            pa.array(outcomes.statuses, pa.string()),
            pa.array(outcomes.messages, pa.string()),
        ],
        fields=list(DETAIL_TYPE),
    )
    if flat:
        resp = batch.column("response")
        if len(outcomes) != batch.num_rows:  # error records got no outcome: put nulls in their place
            has = pc.is_valid(resp).to_numpy(zero_copy_only=False)
            idx = np.full(batch.num_rows, -1, dtype=np.int64)
            idx[has] = np.arange(int(has.sum()))
            take = pa.array(idx, mask=~has)
            return scores.take(take), details.take(take)
        return scores, details
    resp_list = batch.column("responses")
    lengths = pc.list_value_length(resp_list).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]), pa.int32())
    mask = pc.is_null(resp_list) if resp_list.null_count else None
    return (
        pa.ListArray.from_arrays(offsets, scores, mask=mask),
        pa.ListArray.from_arrays(offsets, details, mask=mask),
    )


def output_schema(schema: pa.Schema, flat: bool) -> pa.Schema:
    """Input columns (internal ones dropped) with the score columns replaced in place or appended."""
    names = (SCORE, DETAIL) if flat else (SCORES, DETAILS)
    types = (pa.float64(), DETAIL_TYPE) if flat else (SCORES_FIELD.type, DETAILS_FIELD.type)
    drop = set(INTERNAL_COLUMNS) | {PART_ROW}
    fields = [f for f in schema if f.name not in drop]
    for name, t in zip(names, types, strict=True):
        idx = next((i for i, f in enumerate(fields) if f.name == name), None)
        if idx is None:
            fields.append(pa.field(name, t))
        else:
            log.info("the input already has a %r column: replacing it", name)
            fields[idx] = pa.field(name, t)
    return pa.schema(fields)


def with_scores(batch: pa.RecordBatch, schema: pa.Schema, new: dict[str, pa.Array]) -> pa.RecordBatch:
    cols = [new[f.name] if f.name in new else batch.column(f.name) for f in schema]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class Progress:
    """A tqdm bar on a terminal, a log line every 30 s elsewhere (SLURM logs)."""

    def __init__(self, total_rows: int | None, what: str) -> None:
        self.rows = self.responses = 0
        self.started = self._last = time.monotonic()
        self.total = total_rows
        self.what = what
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_rows, unit="row", desc=what, dynamic_ncols=True)

    def update(self, rows: int, responses: int) -> None:
        self.rows += rows
        self.responses += responses
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.monotonic()
        if now - self._last >= LOG_EVERY_S:
            self._last = now
            rate = self.responses / max(1e-9, now - self.started)
            of = f"/{self.total:,}" if self.total is not None else ""
            log.info(
                "%s: %s%s rows, %s responses (%.0f responses/s)",
                self.what,
                f"{self.rows:,}",
                of,
                f"{self.responses:,}",
                rate,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def scored_batches(
    batches: Iterator[pa.RecordBatch],
    pool: VerifierPool,
    flat: bool,
    parts: list[str],
    with_rows: bool,
    chunk: int,
    report: ScoreReport,
    progress: Progress | None = None,
) -> Iterator[tuple[pa.RecordBatch, tuple[pa.Array, pa.Array]]]:
    """Each input batch with its (scores, details) arrays, in input order; the pool scores several at once."""
    # Batches whose chunks went to the pool: [batch, chunks yielded, all yielded?, outcomes received so far].
    pending: deque[list[Any]] = deque()

    def all_chunks() -> Iterator[list[RowTask]]:
        for batch in batches:
            entry = [batch, 0, False, Outcomes()]
            pending.append(entry)
            for tasks in _chunks(batch, flat, parts, with_rows, chunk):
                entry[1] += 1
                yield tasks
            entry[2] = True

    received = 0  # chunks of pending[0] received

    def ready() -> Iterator[tuple[pa.RecordBatch, tuple[pa.Array, pa.Array]]]:
        nonlocal received
        while pending and pending[0][2] and received == pending[0][1]:
            batch, _, _, got = pending.popleft()
            received = 0
            report.add(got)
            report.rows += batch.num_rows
            if progress is not None:
                progress.update(batch.num_rows, len(got))
            yield batch, score_arrays(batch, got, flat)

    for outcomes in pool.imap(all_chunks()):
        yield from ready()
        # Chunks come back in order, and the head batch is unfinished, or still owed chunks: this one is its.
        pending[0][3].extend(outcomes)
        received += 1
        yield from ready()
    yield from ready()
    assert not pending, "every batch is written"


# ---------------------------------------------------------------------------------------------- files


def _with_rows(spec: VerifierSpec) -> bool:
    return spec.text.startswith("python:")


def build_spec(settings: Settings, schema: pa.Schema, path: Path) -> tuple[VerifierSpec, list[str]]:
    """The verifier to build in each worker and the reference path, built once here so user errors come first."""
    python = settings.verifier.startswith("python:")
    ref, parts = resolve_reference(schema, path, settings.reference, required=not python)
    spec = VerifierSpec(settings.verifier, ref)
    spec.build()  # fail here, once, with the user's error (bad regex, missing module, math-verify not installed)
    if ref and settings.reference is None:
        log.info("reference answers from column %r (--reference to choose another)", ref)
    return spec, parts


def _pool(spec: VerifierSpec, settings: Settings) -> VerifierPool:
    return VerifierPool(spec, default_workers() if settings.workers is None else settings.workers, settings.timeout_s)


def score_file(
    input_path: str | Path,
    output: str | Path,
    settings: Settings,
    batch_rows: int | None = None,
    compression: str = DEFAULT_COMPRESSION,
) -> ScoreReport:
    """Score a merged or flattened file (or a finished run directory, unstaged) into a Parquet file."""
    started = time.monotonic()
    source = open_source(input_path, batch_rows)
    out = check_output(source, output)
    flat = source.is_flattened
    spec, parts = build_spec(settings, source.schema, source.path)
    schema = output_schema(source.schema, flat)
    report = ScoreReport(
        input=str(source.path), output=str(out), kind=source.kind, verifier=spec.text, reference=spec.reference
    )
    read = [n for n in source.schema.names if n in schema.names]
    names = (SCORE, DETAIL) if flat else (SCORES, DETAILS)
    progress = Progress(source.num_rows, "scoring")
    try:
        with _pool(spec, settings) as pool, parquet_output(out, schema, compression) as writer:
            stream = scored_batches(
                source.batches(read), pool, flat, parts, _with_rows(spec), settings.chunk, report, progress
            )
            for batch, (scores, details) in stream:
                writer.write_batch(with_scores(batch, schema, dict(zip(names, (scores, details), strict=True))))
            report.workers_killed = pool.killed
        report.rows_out = report.rows
    finally:
        progress.close()
    report.finish(started)
    return report


# ---------------------------------------------------------------------------------------------- run directories


def _shard_stamp(rd: RunDir, shard: int, fingerprint: dict[str, Any]) -> str:
    st = rd.shard_output(shard).stat()
    return json.dumps({**fingerprint, "output_size": st.st_size, "output_mtime_ns": st.st_mtime_ns}, sort_keys=True)


def shard_is_scored(rd: RunDir, shard: int, fingerprint: dict[str, Any]) -> bool:
    """A score file exists for this shard, made with these settings from its current output."""
    path = rd.shard_scores(shard)
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return False
    return meta.get(SPEC_KEY, b"").decode() == _shard_stamp(rd, shard, fingerprint)


def score_shard(
    rd: RunDir,
    shard: int,
    spec: VerifierSpec,
    parts: list[str],
    settings: Settings,
    pool: VerifierPool,
    report: ScoreReport,
    batch_rows: int | None = None,
) -> None:
    """Write scores/SHARD.parquet (uid, scores, score_details) for one finished shard, atomically."""
    from hpcrollout.merge import iter_shard, merged_schema

    stamp = _shard_stamp(rd, shard, settings.fingerprint(spec.reference))
    merged = merged_schema(rd, [shard])
    schema = pa.schema([pa.field("uid", pa.string()), SCORES_FIELD, DETAILS_FIELD], metadata={SPEC_KEY: stamp})
    progress = Progress(pq.ParquetFile(rd.shard_output(shard)).metadata.num_rows, f"scoring shard {shard:05d}")
    try:
        with parquet_output(rd.shard_scores(shard), schema, "zstd") as writer:
            batches = iter_shard(rd, shard, merged, batch_rows or shard_batch_rows(rd, shard), None)
            stream = scored_batches(batches, pool, False, parts, _with_rows(spec), settings.chunk, report, progress)
            for batch, (scores, details) in stream:
                writer.write_batch(pa.RecordBatch.from_arrays([batch.column("uid"), scores, details], schema=schema))
    finally:
        progress.close()


def shard_batch_rows(rd: RunDir, shard: int) -> int:
    """Rows per batch for this shard: about 12 MiB of its output per batch, as for files (sources.py)."""
    return open_source(rd.shard_output(shard)).batch_rows


class _Rows:
    """Take exactly k rows at a time from a Parquet file's batches."""

    def __init__(self, path: Path, batch_rows: int) -> None:
        self._it = pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows)
        self._buf: pa.Table | None = None

    def take(self, k: int) -> pa.Table:
        while self._buf is None or self._buf.num_rows < k:
            try:
                nxt = pa.Table.from_batches([next(self._it)])
            except StopIteration:
                break
            self._buf = nxt if self._buf is None else pa.concat_tables([self._buf, nxt])
        assert self._buf is not None
        out, self._buf = self._buf.slice(0, k), self._buf.slice(k)
        return out.combine_chunks()


def parse_shards(text: str, num_shards: int) -> list[int]:
    """'3', '0,4,7' or '2-5' -> shard numbers, each checked against the run."""
    out: list[int] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        lo, _, hi = piece.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise HpcRolloutError(f"--shards {text!r}: expected numbers like 3, 0,4,7 or 2-5")
        out.extend(range(int(lo), int(hi or lo) + 1))
    bad = [s for s in out if s >= num_shards]
    if bad:
        raise HpcRolloutError(f"--shards {text!r}: the run has shards 0-{num_shards - 1}, not {bad[0]}")
    return sorted(set(out))


def score_run_dir(
    run_dir: str | Path,
    output: str | Path | None,
    settings: Settings,
    shards: str | None = None,
    rescore: bool = False,
    batch_rows: int | None = None,
    compression: str = DEFAULT_COMPRESSION,
) -> ScoreReport:
    """Score a run's finished shards (resumably), then assemble ``output`` if given (needs every shard)."""
    from hpcrollout.merge import check_complete, iter_shard, merged_schema

    started = time.monotonic()
    rd = RunDir(run_dir)
    rd.require()
    num = rd.num_shards()
    done = {s for s in rd.done_shards() if rd.shard_output(s).exists()}
    if shards is not None:
        wanted = parse_shards(shards, num)
        unfinished = [s for s in wanted if s not in done]
        if unfinished:
            raise HpcRolloutError(
                f"{rd.root}: shard {unfinished[0]:05d} is not finished, so it cannot be scored yet; "
                f"see: hpcrollout status {rd.root}"
            )
    elif output is not None:
        wanted = check_complete(rd)
    else:
        wanted = sorted(done)
    if not wanted:
        raise HpcRolloutError(f"{rd.root}: no shard is finished yet; nothing to score")
    schema = merged_schema(rd, wanted)
    spec, parts = build_spec(settings, schema, rd.root)
    fingerprint = settings.fingerprint(spec.reference)
    report = ScoreReport(
        input=str(rd.root),
        output=str(output) if output else None,
        kind="run directory",
        verifier=spec.text,
        reference=spec.reference,
    )
    report.shards_not_finished = [s for s in range(num) if s not in done]
    todo = [s for s in wanted if rescore or not shard_is_scored(rd, s, fingerprint)]
    report.shards_reused = [s for s in wanted if s not in todo]
    if report.shards_reused:
        log.info("%d shard(s) already scored with these settings: reusing them", len(report.shards_reused))
    if todo:
        with _pool(spec, settings) as pool:
            for s in todo:
                score_shard(rd, s, spec, parts, settings, pool, report, batch_rows)
                report.shards_scored.append(s)
            report.workers_killed = pool.killed
    if output is not None:
        out = Path(output)
        if out.is_dir():
            raise HpcRolloutError(f"--output {out} is a directory; give a file path")
        out_schema = output_schema(schema, flat=False)
        with parquet_output(out, out_schema, compression) as writer:
            expect = 0
            for s in wanted:
                rows = batch_rows or shard_batch_rows(rd, s)
                scores = _Rows(rd.shard_scores(s), rows)
                for batch in iter_shard(rd, s, schema, rows, expect):
                    expect += batch.num_rows
                    got = scores.take(batch.num_rows)
                    if got.num_rows != batch.num_rows or not got.column("uid").equals(
                        pa.chunked_array([batch.column("uid")])
                    ):
                        raise HpcRolloutError(
                            f"{rd.shard_scores(s)} does not match shard {s:05d}'s output row for row; delete it "
                            f"and run: hpcrollout score {rd.root} --verifier {spec.text} ..."
                        )
                    new = {SCORES: got.column(SCORES).chunk(0), DETAILS: got.column(DETAILS).chunk(0)}
                    writer.write_batch(with_scores(batch, out_schema, new))
        report.rows_out = expect
    report.finish(started)
    return report


def follow_run_dir(
    run_dir: str | Path,
    output: str | Path | None,
    settings: Settings,
    every_s: float = 30.0,
    batch_rows: int | None = None,
    compression: str = DEFAULT_COMPRESSION,
    should_stop: Callable[[], bool] | None = None,
) -> ScoreReport:
    """Score a run's shards as they finish (beside a running generation, on CPUs only) until every shard is
    finished and scored; then assemble ``output`` if given. ``should_stop()`` true: return what is done so far."""
    started = time.monotonic()
    rd = RunDir(run_dir)
    rd.require()
    num = rd.num_shards()
    total = ScoreReport(
        input=str(rd.root), output=str(output) if output else None, kind="run directory", verifier=settings.verifier
    )
    while True:
        done = [s for s in rd.done_shards() if rd.shard_output(s).exists()]
        if done:
            r = score_run_dir(rd.root, None, settings)
            total.reference = r.reference
            total.rows += r.rows
            total.responses += r.responses
            for k, v in r.statuses.items():
                total.statuses[k] = total.statuses.get(k, 0) + v
            total._sum += r._sum
            total._n += r._n
            total.workers_killed += r.workers_killed
            total.shards_scored += r.shards_scored
            total.shards_not_finished = r.shards_not_finished
        if len(done) == num:
            break
        if should_stop is not None and should_stop():
            total.finish(started)
            return total
        log.info("%d of %d shards finished and scored; checking again in %g s", len(done), num, every_s)
        deadline = time.monotonic() + every_s
        while time.monotonic() < deadline and not (should_stop is not None and should_stop()):
            time.sleep(min(1.0, every_s))
    total.shards_reused = [s for s in range(num) if s not in total.shards_scored]
    if output is not None:
        r = score_run_dir(rd.root, output, settings, batch_rows=batch_rows, compression=compression)
        total.rows_out = r.rows_out
    total.finish(started)
    return total


# ---------------------------------------------------------------------------------------------- CLI


def format_report(r: ScoreReport) -> str:
    statuses = "  ".join(f"{k} {r.statuses[k]:,}" for k in STATUSES if r.statuses.get(k))
    lines = [
        f"scored {r.responses:,} responses of {r.rows:,} rows with {r.verifier}"
        + (f" (reference: {r.reference})" if r.reference else "")
        + (f" in {r.seconds:,.1f} s ({r.responses_per_s:,.0f} responses/s)" if r.responses_per_s else ""),
    ]
    if statuses:
        lines.append(f"  outcomes   {statuses}")
    if r.mean_score is not None:
        lines.append(f"  mean score {r.mean_score:.4f}")
    if r.workers_killed:
        lines.append(f"  {r.workers_killed} worker(s) killed and restarted (hard timeout or crash; see the log)")
    if r.kind == "run directory":
        lines.append(
            f"  shards     {len(r.shards_scored)} scored, {len(r.shards_reused)} already scored"
            + (f", {len(r.shards_not_finished)} not finished" if r.shards_not_finished else "")
        )
    if r.output:
        lines.append(f"  -> {r.output}" + (f" ({r.rows_out:,} rows)" if r.rows_out is not None else ""))
    return "\n".join(lines)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser, output="parquet")
    out = next(a for a in parser._actions if a.dest == "output")
    out.required = False
    out.help = "Scored Parquet file (written atomically). Optional for a run directory: score its shards only."
    parser.add_argument(
        "--verifier",
        required=True,
        help="math | exact | choice | regex:PATTERN | python:MODULE:FUNCTION (FUNCTION(response, row) -> float).",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="Reference column, or COLUMN.FIELD for a nested field (reward_model.ground_truth). Default: the first "
        f"of {', '.join(REFERENCE_CANDIDATES)} present (python verifiers: none unless given).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="Seconds per response (default: %(default)s); a verifier that ignores it is killed at 2x + 1 s.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Scoring processes (default: SLURM_CPUS_PER_TASK, else the CPUs this process may use; 0: in-process).",
    )
    parser.add_argument(
        "--chunk", type=int, default=DEFAULT_CHUNK, help="Responses per task given to a worker (default: %(default)s)."
    )
    parser.add_argument(
        "--shards",
        default=None,
        help="Run directory: score only these shards (3, 0,4,7 or 2-5) and write nothing else; the unit of a "
        "SLURM array: --shards $SLURM_ARRAY_TASK_ID.",
    )
    parser.add_argument("--rescore", action="store_true", help="Run directory: score again shards already scored.")
    parser.add_argument(
        "--follow",
        nargs="?",
        type=float,
        const=30.0,
        default=None,
        metavar="SECONDS",
        help="Run directory still generating: score shards as they finish (checking every 30 s, or SECONDS) "
        "until all are finished and scored, then write --output if given. Needs CPUs only.",
    )
    slurm = parser.add_argument_group("SLURM CPU array (run directory)")
    slurm.add_argument(
        "--slurm",
        action="store_true",
        help="Submit one array task per finished shard not yet scored (the run's slurm: settings, no GPUs).",
    )
    slurm.add_argument(
        "--slurm_cpus", "--slurm-cpus", type=int, default=None, help="CPUs per task (default: the run's)."
    )
    slurm.add_argument(
        "--slurm_time_min", "--slurm-time-min", type=int, default=60, help="Minutes per task (default: 60)."
    )
    slurm.add_argument("--slurm_partition", "--slurm-partition", default=None, help="Partition (default: the run's).")
    slurm.add_argument("--slurm_mem_gb", "--slurm-mem-gb", type=float, default=None, help="Memory per task in GB.")
    slurm.add_argument("--wait", action="store_true", help="Wait for the array, then write --output if given.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def main(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise HpcRolloutError(f"--timeout must be > 0, got {args.timeout}")
    if args.chunk < 1:
        raise HpcRolloutError(f"--chunk must be >= 1, got {args.chunk}")
    workers = default_workers() if args.workers is None else args.workers
    if workers < 0:
        raise HpcRolloutError(f"--workers must be >= 0, got {workers}")
    settings = Settings(args.verifier, args.reference, args.timeout, workers, args.chunk)
    is_run = Path(args.input).is_dir()
    if not is_run and args.output is None:
        raise HpcRolloutError("--output is required unless INPUT is a run directory")
    if not is_run and (args.shards is not None or args.rescore):
        raise HpcRolloutError("--shards and --rescore apply to a run directory only")
    if args.slurm:
        if not is_run:
            raise HpcRolloutError("--slurm scores a run directory's shards; INPUT is not a run directory")
        return _submit(args, settings)
    if args.follow is not None:
        if not is_run or args.shards is not None or args.rescore:
            raise HpcRolloutError("--follow applies to a run directory, without --shards or --rescore")
        if args.follow <= 0:
            raise HpcRolloutError(f"--follow must be > 0 seconds, got {args.follow}")
        r = follow_run_dir(args.input, args.output, settings, args.follow, args.batch_rows, args.compression)
        print(json.dumps(asdict(r), indent=2) if args.json else format_report(r))
        return 0
    if is_run:
        if args.shards is not None and args.output is not None:
            raise HpcRolloutError("--shards scores some shards only; run again without --shards to write --output")
        r = score_run_dir(
            args.input, args.output, settings, args.shards, args.rescore, args.batch_rows, args.compression
        )
    else:
        r = score_file(args.input, args.output, settings, args.batch_rows, args.compression)
    print(json.dumps(asdict(r), indent=2) if args.json else format_report(r))
    return 0


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from hpcrollout.scoring.slurm import submit_scoring, wait_for

    rd = RunDir(args.input)
    shards, jobs = submit_scoring(
        rd.root,
        settings,
        cpus=args.slurm_cpus,
        time_min=args.slurm_time_min,
        partition=args.slurm_partition,
        mem_gb=args.slurm_mem_gb,
        rescore=args.rescore,
    )
    if jobs:
        print(f"submitted scoring array {jobs[0].job_id.split('_')[0]}: {len(jobs)} task(s), shards {shards}")
    else:
        print("every finished shard is already scored with these settings; nothing submitted")
    if not args.wait:
        if jobs:
            again = f"hpcrollout score {rd.root} --verifier {args.verifier!r}"
            print(f"when it is done, assemble with: {again} --output scored.parquet (it reuses the score files)")
        return 0
    wait_for(jobs, rd)
    if args.output is not None:
        local = dataclasses.replace(settings, workers=0)  # every shard is scored: only assembling is left
        r = score_run_dir(rd.root, args.output, local, None, False, args.batch_rows, args.compression)
        print(format_report(r))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(run_standalone(__doc__.splitlines()[0], add_cli_args, main))
