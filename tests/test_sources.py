"""Opening post-processing inputs: merged/flattened files, errors naming the file, atomic Parquet output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.errors import HpcRolloutError
from hpcrollout.schema import OPTIONAL_FIELDS, RESULT_FIELDS
from hpcrollout.sources import FLATTENED, MERGED, WholePrompts, open_source, parquet_output, whole_prompt_batches

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def merged_rows() -> list[dict[str, Any]]:
    """Four prompts with known statistics (see test_analyze for the exact figures they give)."""

    def row(i: int, uid: str, responses: list[str], tokens: list[int], finish: list[str], error: str | None = None):
        return {
            "qid": f"q{i}",
            "prompt": [{"role": "user", "content": f"question {i} ¿qué?"}],
            "uid": uid,
            "responses": responses,
            "response_tokens": tokens,
            "finish_reasons": finish,
            "stop_reasons": [None] * len(responses),
            "sample_seeds": [100 * i + k for k in range(len(responses))],
            "prompt_tokens": 10 + i,
            "error": error,
        }

    return [
        row(0, "a", ["Hello", "Hello", "Bonjour 🙂", ""], [2, 2, 4, 1], ["stop", "stop", "length", "stop"]),
        row(1, "b", ["日本語の答え", "x" * 10, "  "], [8, 10, 1], ["length", "stop", "stop"]),
        row(2, "c", [], [], [], error="prompt has 2,000 characters, more than data.max_prompt_chars=1,000"),
        row(3, "d", ["same", "same", "same", "same"], [1, 1, 1, 1], ["stop", "stop", "stop", "stop"]),
    ]


def merged_schema(logprobs: bool = False) -> pa.Schema:
    fields = [pa.field("qid", pa.string()), pa.field("prompt", MESSAGES), *RESULT_FIELDS]
    if logprobs:
        fields += [OPTIONAL_FIELDS[k] for k in ("token_ids", "logprobs", "cumulative_logprobs")]
    return pa.schema(fields)


def write_merged(
    path: Path, rows: list[dict[str, Any]] | None = None, row_group_size: int = 2, logprobs: bool = False
) -> Path:
    """A merged Parquet file in the real merged schema, small row groups so streaming paths get exercised."""
    rows = merged_rows() if rows is None else rows
    table = pa.Table.from_pylist(rows, schema=merged_schema(logprobs))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_open_merged_and_flattened(tmp_path: Path) -> None:
    src = open_source(write_merged(tmp_path / "m.parquet"))
    assert src.kind == MERGED and src.num_rows == 4 and not src.is_flattened
    batches = list(src.batches(["uid", "responses", "not_there"]))
    assert sum(b.num_rows for b in batches) == 4
    assert batches[0].schema.names == ["uid", "responses"]

    flat = pa.table({"uid": ["a"], "sample_index": pa.array([0], pa.int32()), "response": ["hi"]})
    pq.write_table(flat, tmp_path / "f.parquet")
    assert open_source(tmp_path / "f.parquet").kind == FLATTENED


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(HpcRolloutError, match=r"missing\.parquet does not exist"):
        open_source(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet at all")
    with pytest.raises(HpcRolloutError, match=r"junk\.parquet is not a readable Parquet file"):
        open_source(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "inputs.parquet")
    with pytest.raises(HpcRolloutError, match=r"inputs\.parquet has neither a 'responses' column.*columns are: prompt"):
        open_source(tmp_path / "inputs.parquet")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(HpcRolloutError, match=r"somedir is a directory but not a run directory"):
        open_source(tmp_path / "somedir")
    src = open_source(write_merged(tmp_path / "m.parquet"))
    with pytest.raises(HpcRolloutError, match=r"m\.parquet has no column 'logprobs' \(needed for x\)"):
        src.require("logprobs", why="for x")


def test_parquet_output_is_atomic(tmp_path: Path) -> None:
    dest = tmp_path / "out.parquet"
    schema = pa.schema([("x", pa.int64())])
    with pytest.raises(RuntimeError), parquet_output(dest, schema) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], schema=schema))
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temp file is left
    with parquet_output(dest, schema) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], schema=schema))
    assert pq.read_table(dest).column("x").to_pylist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_batch_rows_sized_from_the_file(tmp_path: Path) -> None:
    # Distinct texts: Parquet sizes are of encoded data, and repeated strings would dictionary-encode to nothing.
    big = [dict(merged_rows()[0], responses=[f"{i} {k} " + "y" * 200_000 for k in range(4)]) for i in range(50)]
    src = open_source(write_merged(tmp_path / "big.parquet", big, row_group_size=50))
    assert 16 <= src.batch_rows < 100  # ~800 KB a row: far fewer rows per batch than the 65,536 cap
    assert open_source(write_merged(tmp_path / "m.parquet")).batch_rows > 10_000
    assert open_source(tmp_path / "m.parquet", batch_rows=3).batch_rows == 3


def test_prefetch_keeps_order_raises_and_stops_early() -> None:
    from hpcrollout.sources import _prefetched

    assert list(_prefetched(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad row group")

    it = _prefetched(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad row group"):
        next(it)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = _prefetched(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the reader thread stops instead of running on
    assert len(produced) <= 3 + 2 + 1


def test_background_write_error_reaches_the_caller(tmp_path: Path) -> None:
    dest = tmp_path / "out.parquet"
    schema = pa.schema([("x", pa.int64())])
    wrong = pa.record_batch([pa.array(["not an int"])], names=["y"])
    with pytest.raises(ValueError, match="schema does not match"), parquet_output(dest, schema) as w:
        w.write_batch(wrong)
        for _ in range(5):  # raises here once the writer thread has failed, or at the end of the block
            w.write_batch(pa.record_batch([pa.array([1])], schema=schema))
    assert list(tmp_path.iterdir()) == []


def test_whole_prompts_never_split_a_uid_run_whatever_the_batch_cuts():
    uids = ["a", "a", "b", None, None, "c", "c", "c", "d"]
    table = pa.table({"uid": uids, "i": list(range(len(uids)))})
    for size in range(1, len(uids) + 1):
        batches = table.to_batches(max_chunksize=size)
        out = list(whole_prompt_batches(iter(batches)))
        assert [r for b in out for r in b.column("i").to_pylist()] == list(range(len(uids)))
        for b, nxt in zip(out, out[1:]):  # a prompt that ends one batch does not go on in the next
            last, first = b.column("uid")[-1].as_py(), nxt.column("uid")[0].as_py()
            assert last is None or last != first, size
    prompts = WholePrompts()
    assert prompts.push(pa.table({"uid": ["x", "x"]})) is None  # the last run is held back
    assert prompts.push(pa.table({"uid": pa.array([], pa.string())})) is None
    assert prompts.push(pa.table({"uid": ["x", "y"]})).column("uid").to_pylist() == ["x", "x", "x"]
    assert prompts.push(None).column("uid").to_pylist() == ["y"]
    assert prompts.push(None) is None
