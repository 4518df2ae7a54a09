"""Prepare a run directory: validate the input, cut it into shards balanced by estimated work.

Two streaming passes over the input's row groups, so 10^7 rows fit in bounded memory:
1. the prompt (and id) column only: estimated work per row = prompt tokens (image tokens included, see
   images.ImageTokens) + n * max_tokens (a float32 array, 40 MB for 10^7 rows), id uniqueness checked
   through 64-bit hashes;
2. all columns: each row gets its global row index and uid and is written to its shard's Parquet file.
Shards are contiguous row ranges, so merge restores input order by concatenating shards.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcrollout import __version__
from hpcrollout.config import RunConfig, add_override_arg, load_config, sample_engine_settings
from hpcrollout.errors import HpcRolloutError
from hpcrollout.images import ImageTokens, column_digest, image_base, row_image_tokens
from hpcrollout.prompts import derive_uid, prompt_chars
from hpcrollout.rundir import RunDir, atomic_path, write_atomic, write_json_atomic
from hpcrollout.schema import INTERNAL_COLUMNS, INTERNAL_PREFIX, RESULT_COLUMNS, ROW, UID

log = logging.getLogger("hpcrollout")

MANIFEST_VERSION = 1
CHARS_PER_TOKEN = 4.0  # estimate only: balancing needs relative sizes, not exact counts
READ_BATCH_ROWS = 8192


def input_files(spec: str | Path) -> list[Path]:
    """data.input: one Parquet file, a directory of them (recursively), or a glob pattern; in name order."""
    text = str(spec)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise HpcRolloutError(f"input {text} matches no file")
        return files
    path = Path(text)
    if not path.exists():
        raise HpcRolloutError(f"input {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise HpcRolloutError(f"input {path} is a directory with no .parquet files in it")
        return files
    return [path]


class InputFiles:
    """One logical input over one or more Parquet files of one schema, read in order, batch by batch."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.parts: list[pq.ParquetFile] = []
        for path in files:
            try:
                self.parts.append(pq.ParquetFile(path, pre_buffer=False))
            except (pa.ArrowInvalid, OSError) as exc:
                raise HpcRolloutError(f"input {path} is not a readable Parquet file: {exc}") from None
        self.schema_arrow = self.parts[0].schema_arrow
        for path, part in zip(files[1:], self.parts[1:]):
            if not part.schema_arrow.equals(self.schema_arrow, check_metadata=False):
                raise HpcRolloutError(
                    f"input {path} has the schema ({part.schema_arrow.to_string(show_schema_metadata=False)}), unlike "
                    f"{files[0]} ({self.schema_arrow.to_string(show_schema_metadata=False)}); all input files must share one schema"
                )
        self.num_rows = sum(part.metadata.num_rows for part in self.parts)

    def iter_batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for part in self.parts:
            yield from part.iter_batches(batch_size=batch_size, columns=columns)

    def read(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables(part.read(columns=columns) for part in self.parts)


def open_input(spec: str | Path) -> InputFiles:
    """Open data.input (a file, a directory or a glob), with errors that name the file."""
    return InputFiles(input_files(spec))


def input_fingerprint(spec: str | Path, inp: InputFiles | None = None) -> dict[str, Any]:
    """Sizes, row count, schema and a hash of each file's head and footer: cheap, and changes when the data does."""
    inp = inp or open_input(spec)
    files = inp.files
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return {
        "path": str(Path(spec).resolve()) if len(files) == 1 else str(spec),
        "files": len(files),
        "size": sum(p.stat().st_size for p in files),
        "num_rows": inp.num_rows,
        "schema": inp.schema_arrow.to_string(show_schema_metadata=False),
        "sha256_head_footer": h.hexdigest()[:32],
    }


def check_columns(path: Path, schema: pa.Schema, config: RunConfig) -> None:
    names = schema.names
    col = config.data.prompt_column
    if col not in names:
        raise HpcRolloutError(
            f"input {path} has no {col!r} column (columns: {', '.join(names)}); "
            "name the prompt column with data.prompt_column"
        )
    budget = config.data.max_tokens_column
    if budget and budget not in names:
        raise HpcRolloutError(f"input {path} has no max_tokens column {budget!r} (data.max_tokens_column); columns: {', '.join(names)}")
    if budget and not pa.types.is_integer(schema.field(budget).type):
        raise HpcRolloutError(f"input {path}: column {budget!r} (data.max_tokens_column) must hold integers, not {schema.field(budget).type}")
    for key in ("structured_outputs_column", "lora_column", "image_column"):
        column = getattr(config.data, key)
        if column and column not in names:
            raise HpcRolloutError(f"input {path} has no column {column!r} (data.{key}); columns: {', '.join(names)}")
    lora = config.data.lora_column
    if lora and not (pa.types.is_string(schema.field(lora).type) or pa.types.is_large_string(schema.field(lora).type)):
        raise HpcRolloutError(
            f"input {path}: column {lora!r} (data.lora_column) must hold adapter paths (strings), "
            f"not {schema.field(lora).type}"
        )
    if config.data.id_column and config.data.id_column not in names:
        raise HpcRolloutError(
            f"input {path} has no id column {config.data.id_column!r} (data.id_column); columns: {', '.join(names)}"
        )
    internal = [c for c in names if c.startswith(INTERNAL_PREFIX) or c in INTERNAL_COLUMNS]
    if internal:
        raise HpcRolloutError(
            f"input {path} has column(s) {', '.join(internal)}, named like hpcrollout's internal columns "
            f"({INTERNAL_PREFIX}*); rename them in the input"
        )
    clashes = [c for c in names if c in RESULT_COLUMNS and c != config.data.id_column]
    if clashes:
        hint = " (to use it as the prompt id, set data.id_column: uid)" if clashes == ["uid"] else ""
        raise HpcRolloutError(
            f"input {path} has column(s) {', '.join(clashes)} that hpcrollout writes into the output; rename them{hint}"
        )


def _prompt_chars(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Characters per prompt, vectorised for the usual list<struct<role, content: string>> and string columns."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    try:
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return pc.fill_null(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.float64)
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
            content = t.value_type.get_field_index("content")
            if content >= 0 and pa.types.is_string(t.value_type.field(content).type):
                flat = pc.list_flatten(arr)
                lengths = pc.fill_null(pc.utf8_length(flat.field(content)), 0).to_numpy(zero_copy_only=False)
                parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
                return np.bincount(parents, weights=lengths, minlength=len(arr)).astype(np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    return np.array([prompt_chars(c) for c in arr.to_pylist()], dtype=np.float64)


def _hash64(values: list[Any]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(repr(v).encode(), digest_size=8).digest(), "little") for v in values],
        dtype=np.uint64,
    )


IMAGE_PART_PATTERN = r'"type"\s*:\s*"image'  # an image part in a prompt stored as a JSON string


def scan_input(pf: InputFiles, path: Path, config: RunConfig) -> np.ndarray:
    """Pass 1: estimated work per row (prompt tokens + n x max_tokens); checks the id column (non-null, unique)."""
    data, sp = config.data, config.sampling
    cols = list(
        dict.fromkeys(c for c in (data.prompt_column, data.id_column, data.max_tokens_column, data.image_column) if c)
    )
    work = np.empty(pf.num_rows, dtype=np.float32)
    hashes = []
    offset = 0
    # image parts: their tokens, estimated from each image's size (hpcrollout/images.py, ImageTokens); in string
    # prompts (JSON message lists) only the rows whose text names an image part are parsed
    prompt_type = pf.schema_arrow.field(data.prompt_column).type
    images = data.image_column is not None or "image" in str(prompt_type)
    strings = pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)
    count = ImageTokens(config.model.path) if images else None
    base = image_base(config)
    for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=cols):
        prompts = batch.column(data.prompt_column)
        chars = _prompt_chars(prompts)
        rows = None  # which rows may hold image parts (None: all of them)
        if strings:
            named = pc.fill_null(pc.match_substring_regex(prompts, IMAGE_PART_PATTERN), False)
            rows = np.flatnonzero(named.to_numpy(zero_copy_only=False))
            if count is None and len(rows):
                count = ImageTokens(config.model.path)
        if count is not None and (rows is None or len(rows)):
            column = data.image_column
            pictures = batch.column(column).to_pylist() if column else [None] * len(chars)
            cells = prompts.to_pylist()
            extra = np.zeros(len(chars), dtype=np.float64)
            for i in range(len(chars)) if rows is None else rows:
                extra[i] = row_image_tokens(cells[i], pictures[i], column, base, count)
            chars = chars + CHARS_PER_TOKEN * extra
        budget: np.ndarray | float = sp.max_tokens
        if data.max_tokens_column:
            budget = pc.fill_null(batch.column(data.max_tokens_column), sp.max_tokens).to_numpy(zero_copy_only=False)
        work[offset : offset + len(chars)] = chars / CHARS_PER_TOKEN + sp.n * budget
        if data.id_column:
            ids = batch.column(data.id_column)
            missing = ids.is_null(nan_is_null=True) if pa.types.is_floating(ids.type) else ids.is_null()
            if pc.any(missing).as_py():
                row = offset + int(np.flatnonzero(missing.to_numpy(zero_copy_only=False))[0])
                what = "null" if ids.null_count else "NaN"
                raise HpcRolloutError(f"input {path} row {row}: id column {data.id_column!r} is {what}; ids must be set and unique")
            hashes.append(_hash64([str(v) for v in ids.to_pylist()]))  # the uid is str(id): unique as strings
        offset += len(chars)
    if hashes:
        _check_unique_ids(pf, path, data.id_column, np.concatenate(hashes))
    return work


def _check_unique_ids(pf: InputFiles, path: Path, id_column: str, hashes: np.ndarray) -> None:
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    dup = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
    if not len(dup):
        return
    target = sorted_h[dup[0]]
    rows = np.flatnonzero(hashes == target)[:2].tolist()
    ids = pf.read(columns=[id_column]).column(0)
    a, b = ids[rows[0]].as_py(), ids[rows[1]].as_py()
    if str(a) == str(b):
        raise HpcRolloutError(
            f"input {path}: id column {id_column!r} has the value {a!r} at rows {rows[0]} and {rows[1]}; ids must be unique"
        )


def plan_shards(
    work: np.ndarray, num_shards: int, max_rows: int, fractions: list[float] | None = None
) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges, none longer than max_rows, with about equal estimated work each
    (or the given fractions of the total work, in order)."""
    n = len(work)
    cum = np.cumsum(work, dtype=np.float64)
    if fractions:
        targets = cum[-1] * np.cumsum(fractions)[:-1]
    else:
        num_shards = max(1, min(n, max(num_shards, -(-n // max_rows))))
        targets = cum[-1] * np.arange(1, num_shards) / num_shards
    idx = np.searchsorted(cum, targets, side="left")
    below = np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0)
    # cut after row idx or before it, whichever lands nearer the target
    cuts = np.where(cum[np.minimum(idx, n - 1)] - targets <= targets - below, idx + 1, idx)
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < n)), n]
    ranges = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        while b - a > max_rows:  # uneven work can still leave a long range: split it by count
            ranges.append((a, a + max_rows))
            a += max_rows
        if b > a:
            ranges.append((a, b))
    return ranges


SHARDS_PER_ENGINE = 4  # static mode, several engines per task: each task's shards, per engine


def default_num_shards(config: RunConfig, engines: int | None = None) -> int:
    """Static: one shard per task, or SHARDS_PER_ENGINE per engine when a task runs several (its engines share
    its shards, so one shard would feed one engine); dynamic: 8 per engine (tapered: see claims.py). ``engines``:
    a task's engines, if the caller already knows (engine_group.expected_engines)."""
    if config.sharding.num_shards:
        return config.sharding.num_shards
    from hpcrollout.executors.engine_group import expected_engines

    tasks = config.executor.num_tasks
    engines = engines or expected_engines(config)
    if config.sharding.mode == "static":
        return tasks if engines == 1 else tasks * engines * SHARDS_PER_ENGINE
    return 8 * tasks * engines


def _write_shards(pf: InputFiles, rundir: RunDir, config: RunConfig, ranges: list[tuple[int, int]]) -> None:
    """Pass 2: stream all columns into the shard files, adding the global row index and uid."""
    schema = pf.schema_arrow.append(pa.field(ROW, pa.int64())).append(pa.field(UID, pa.string()))
    id_col = config.data.id_column
    prompt_col = config.data.prompt_column
    image_col = config.data.image_column
    shard, offset = 0, 0
    writer: pq.ParquetWriter | None = None
    cm = None

    def open_shard(i: int) -> None:
        nonlocal writer, cm
        cm = atomic_path(rundir.shard_input(i))
        tmp = cm.__enter__()
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")

    def close_shard() -> None:
        nonlocal writer, cm
        assert writer is not None and cm is not None
        writer.close()
        cm.__exit__(None, None, None)
        writer, cm = None, None

    try:
        open_shard(0)
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS):
            rows = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
            if id_col:
                uids = [str(v) for v in batch.column(id_col).to_pylist()]
            elif image_col:  # the row's images are part of its content (hpcrollout/images.py)
                pictures = batch.column(image_col).to_pylist()
                cells = batch.column(prompt_col).to_pylist()
                uids = [derive_uid(int(r), c, column_digest(p, image_col)) for r, c, p in zip(rows, cells, pictures)]
            else:
                uids = [derive_uid(int(r), c) for r, c in zip(rows, batch.column(prompt_col).to_pylist())]
            table = (
                pa.Table.from_batches([batch])
                .append_column(ROW, pa.array(rows))
                .append_column(UID, pa.array(uids, pa.string()))
            )
            pos = 0
            while pos < table.num_rows:
                end = ranges[shard][1]
                take = min(table.num_rows - pos, end - (offset + pos))
                writer.write_table(table.slice(pos, take), row_group_size=4096)
                pos += take
                if offset + pos == end and shard + 1 < len(ranges):
                    close_shard()
                    shard += 1
                    open_shard(shard)
            offset += batch.num_rows
        close_shard()
    except BaseException:
        if cm is not None:
            cm.__exit__(*sys.exc_info())
        raise


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    # Only keys the run was started with: a run from before a key was fingerprinted is not refused for lacking it.
    return [k for k in sorted(old) if old.get(k) != new.get(k)]


MODEL_FILES_CAP = 10_000  # a model directory is a few dozen files; stop listing a mistaken path (e.g. /) early


def model_fingerprint(path: str | None) -> dict[str, Any] | None:
    """Cheap identity of a model directory: its resolved path (a `latest` symlink followed), a hash of its
    config.json, and of every file's name, size and mtime. None for a hub name or a path not on this machine.

    Weights rebuilt or replaced at the same path change sizes or mtimes, so a resume notices them."""
    if not path or not Path(path).is_dir():
        return None
    root = Path(path).resolve()
    listing = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or count >= MODEL_FILES_CAP:
                continue
            file = Path(dirpath) / name
            try:
                st = file.stat()  # through symlinks: hub snapshots link to blobs
            except OSError:
                continue
            listing.update(f"{file.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    config = root / "config.json"
    try:
        config_hash = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    except OSError:
        config_hash = None
    return {"path": str(root), "config_sha256": config_hash, "files": count, "listing_sha256": listing.hexdigest()[:16]}


def model_changed(old: dict[str, Any] | None, model_path: str | None) -> str | None:
    """How the model directory differs from the one the run started with, or None (same, or not checkable)."""
    if not old:
        return None
    new = model_fingerprint(model_path)
    if new is None:
        return None  # not on this machine now (moved, a mount missing): whether it exists is checked elsewhere
    if new["path"] != old.get("path"):
        return f"model directory ({model_path} now resolves to {new['path']}, the run started with {old.get('path')})"
    if new["config_sha256"] != old.get("config_sha256"):
        return f"model directory ({new['path']}: config.json changed since the run started)"
    if (new["files"], new["listing_sha256"]) != (old.get("files"), old.get("listing_sha256")):
        return f"model directory ({new['path']}: its files (names, sizes or mtimes) changed since the run started)"
    return None


def plan_input(config: RunConfig) -> tuple[InputFiles, np.ndarray, list[tuple[int, int]]]:
    """Validate the input and plan its shards, writing nothing: (file, work per row, row ranges)."""
    input_path = Path(config.data.input)
    pf = open_input(input_path)
    check_columns(input_path, pf.schema_arrow, config)
    if pf.num_rows == 0:
        raise HpcRolloutError(f"input {input_path} has no rows")
    work = scan_input(pf, input_path, config)
    fractions = None
    engines = None
    if config.sharding.mode == "dynamic" and not config.sharding.num_shards:
        from hpcrollout.claims import tapered_unit_sizes
        from hpcrollout.executors.engine_group import expected_engines

        # Shrinking units (guided self-scheduling), one series for every engine of the run: claimed longest
        # first, the run ends on small ones.
        engines = expected_engines(config)
        fractions = tapered_unit_sizes(config.executor.num_tasks * engines)
    num_shards = default_num_shards(config, engines)
    return pf, work, plan_shards(work, num_shards, config.sharding.max_prompts_per_shard, fractions)


def prepare_run(config: RunConfig, *, force: bool = False, busy: bool = False) -> RunDir:
    """Create the run directory (config, shards, manifest) or reopen it, refusing changed generation settings.

    While no sample has been committed anywhere in the run directory and no task of it is queued or running
    (busy), any setting may change: the run is prepared again with the new config (a model path fixed after
    every task failed on it needs no --force).
    """
    config.require("run_dir", "data.input", "model.path")
    rundir = RunDir(config.run_dir)
    input_path = Path(config.data.input)
    if rundir.exists():
        changes = reopen_changes(rundir, config)
        if not changes or busy or rundir.has_committed_samples():
            return _reopen(rundir, config, force, changes)
        log.warning("%s: nothing generated yet; preparing it again with the changed %s", rundir.root, ", ".join(changes))
        _unprepare(rundir)
    if results := rundir.results_present():
        raise HpcRolloutError(
            f"{rundir.root} has results ({', '.join(p.name + '/' for p in results)}) but no manifest.json: sharding "
            "again would put new shards beside the old shards' results. Restore manifest.json, or move those "
            "folders out of the run directory, or use a new run_dir"
        )
    started = time.time()
    pf, work, ranges = plan_input(config)
    fingerprint = input_fingerprint(input_path, pf)
    rundir.root.mkdir(parents=True, exist_ok=True)
    try:
        _write_shards(pf, rundir, config, ranges)
    except BaseException:  # a half-sharded run directory is worth nothing: leave none behind
        shutil.rmtree(rundir.shard_input(0).parent, ignore_errors=True)
        raise
    write_atomic(rundir.config_path, config.to_yaml())
    manifest = {
        "version": MANIFEST_VERSION,
        "hpcrollout": __version__,
        "created": time.time(),
        "input": fingerprint,
        "generation": config.generation_fingerprint(),
        "model_dir": model_fingerprint(config.model.path),
        "num_rows": int(len(work)),
        "num_tasks": config.executor.num_tasks,
        "mode": config.sharding.mode,
        "shards": [
            {"shard": i, "rows": [a, b], "prompts": b - a, "est_work": float(work[a:b].sum())}
            for i, (a, b) in enumerate(ranges)
        ],
    }
    write_json_atomic(rundir.manifest_path, manifest)  # last: its presence means the run is prepared
    log.info("prepared %s: %d prompts in %d shards (%.1fs)", rundir.root, len(work), len(ranges), time.time() - started)
    return rundir


def _input_present(spec: str) -> bool:
    try:
        input_files(spec)
    except HpcRolloutError:
        return False  # moved or deleted since sharding: the shards in the run directory are what counts
    return True


def reopen_changes(rundir: RunDir, config: RunConfig) -> list[str]:
    """What differs between a run directory and this config in ways that decide the samples or the shards."""
    manifest = rundir.manifest()
    changes = [f"{k} settings" for k in fingerprint_changes(manifest["generation"], config.generation_fingerprint())]
    if config.data.input and _input_present(config.data.input):
        new_input = input_fingerprint(config.data.input)
        old_input = manifest["input"]
        if any(new_input[k] != old_input.get(k) for k in ("size", "num_rows", "schema", "sha256_head_footer")):
            changes.append(f"input file ({config.data.input} differs from the one sharded: {old_input['path']})")
    if (model := model_changed(manifest.get("model_dir"), config.model.path)) is not None:
        changes.append(model)
    old_mode = manifest.get("mode", "static")
    if old_mode != config.sharding.mode:
        # Tasks of the old mode may still run: static ones own shards i, i+N, ...; dynamic ones claim any.
        changes.append(f"sharding.mode ({old_mode} -> {config.sharding.mode}; make sure no task of this run is running)")
    return changes


def refuse_changes(rundir: RunDir, config: RunConfig, changes: list[str]) -> None:
    old = rundir.load_config()
    detail = _config_diff(old, config)
    raise HpcRolloutError(
        f"{rundir.root} was started with different settings; changed: {'; '.join(changes)}"
        + (f"\n  {detail}" if detail else "")
        + "\nResuming would mix samples from two configurations. Use a new run_dir, "
        "or pass --force to continue anyway (already finished shards are kept as they are)."
    )


def _unprepare(rundir: RunDir) -> None:
    """Drop what preparing and starting a run wrote that depends on its config (the manifest first: an
    interrupted reset leaves a run directory the next submit prepares from scratch); jobs.json, task records and
    logs stay, they are history."""
    rundir.manifest_path.unlink()
    for d in (rundir.shard_input(0).parent, rundir.heartbeat(0).parent, rundir.claims_dir, rundir.parts_dir(0).parent):
        shutil.rmtree(d, ignore_errors=True)


def _reopen(rundir: RunDir, config: RunConfig, force: bool, changes: list[str]) -> RunDir:
    manifest = rundir.manifest()
    if changes and not force:
        refuse_changes(rundir, config, changes)
    if changes:
        log.warning("continuing %s despite changed %s (--force)", rundir.root, ", ".join(changes))
        manifest["generation"] = config.generation_fingerprint()
        manifest["model_dir"] = model_fingerprint(config.model.path) or manifest.get("model_dir")
        manifest["mode"] = config.sharding.mode
        manifest.setdefault("forced", []).append({"time": time.time(), "changes": changes})
    # Resource settings (tasks, SLURM, checkpointing) may change freely between submissions.
    manifest["num_tasks"] = config.executor.num_tasks
    write_atomic(rundir.config_path, config.to_yaml())
    write_json_atomic(rundir.manifest_path, manifest)
    return rundir


def _config_diff(old: RunConfig, new: RunConfig) -> str:
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    diffs = []
    a["engine"], b["engine"] = sample_engine_settings(a["engine"]), sample_engine_settings(b["engine"])
    for section in ("backend", "model", "engine", "sampling", "data"):
        x, y = a[section], b[section]
        if isinstance(x, dict):
            diffs += [
                f"{section}.{k}: {x.get(k)!r} -> {y.get(k)!r}"
                for k in sorted(set(x) | set(y))
                if x.get(k) != y.get(k) and k != "input"
            ]
        elif x != y:
            diffs.append(f"{section}: {x!r} -> {y!r}")
    return "\n  ".join(diffs)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    add_override_arg(parser)
    parser.add_argument("--force", action="store_true", help="reopen a run directory despite changed settings")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from hpcrollout.submit import preflight

    preflight(config)  # as submit does: a missing model is found before a run directory exists
    rundir = RunDir(config.run_dir) if config.run_dir else None
    with rundir.lock("prepare") if rundir else contextlib.nullcontext():
        rundir = prepare_run(config, force=args.force)
    m = rundir.manifest()
    print(f"{rundir.root}: {m['num_rows']} prompts in {len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
