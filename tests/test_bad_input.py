"""Bad input: file-level problems are clear errors naming the file/row; bad rows become error records."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.errors import HpcRolloutError
from hpcrollout.merge import merge_run
from hpcrollout.shard import prepare_run
from hpcrollout.worker import run_task
from tests.conftest import make_config, make_prompts, write_input


def run_all(config, tmp_path):
    prepare_run(config)
    run_task(config.run_dir, 0)
    merge_run(config.run_dir, tmp_path / "out.parquet")
    return pq.read_table(tmp_path / "out.parquet").to_pylist()


def prepare_error(tmp_path, model, input_path, **sections) -> str:
    with pytest.raises(HpcRolloutError) as info:
        prepare_run(make_config(tmp_path, model, input_path, **sections))
    return str(info.value)


def test_missing_input(tmp_path, tiny_model):
    msg = prepare_error(tmp_path, tiny_model, tmp_path / "nope.parquet")
    assert "nope.parquet does not exist" in msg


def test_input_is_not_parquet(tmp_path, tiny_model):
    bad = tmp_path / "in.parquet"
    bad.write_text("prompt\nhello\n")
    assert "in.parquet is not a readable Parquet file" in prepare_error(tmp_path, tiny_model, bad)
    (tmp_path / "empty").mkdir()
    assert "is a directory with no .parquet files" in prepare_error(tmp_path, tiny_model, tmp_path / "empty")
    assert "matches no file" in prepare_error(tmp_path, tiny_model, tmp_path / "nothing-*.parquet")


def test_missing_prompt_column(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", [{"question": "x"}])
    msg = prepare_error(tmp_path, tiny_model, inp)
    assert "in.parquet has no 'prompt' column (columns: question)" in msg and "data.prompt_column" in msg


def test_empty_input(tmp_path, tiny_model):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), inp)
    assert "in.parquet has no rows" in prepare_error(tmp_path, tiny_model, inp)


def test_duplicate_and_null_ids(tmp_path, tiny_model):
    rows = make_prompts(5)
    rows[3]["qid"] = rows[1]["qid"]
    inp = write_input(tmp_path / "in.parquet", rows)
    msg = prepare_error(tmp_path, tiny_model, inp, data={"id_column": "qid"})
    assert "'q0001' at rows 1 and 3" in msg
    rows[3]["qid"] = None
    inp = write_input(tmp_path / "in2.parquet", rows)
    assert "row 3: id column 'qid' is null" in prepare_error(tmp_path, tiny_model, inp, data={"id_column": "qid"})
    assert "no id column 'nope'" in prepare_error(tmp_path, tiny_model, inp, data={"id_column": "nope"})


def test_output_column_clash(tmp_path, tiny_model):
    rows = [dict(r, responses=["old"]) for r in make_prompts(3)]
    inp = write_input(tmp_path / "in.parquet", rows)
    assert "responses" in prepare_error(tmp_path, tiny_model, inp)
    rows = [dict(r, uid=str(i)) for i, r in enumerate(make_prompts(3))]
    inp = write_input(tmp_path / "in2.parquet", rows)
    assert "data.id_column: uid" in prepare_error(tmp_path, tiny_model, inp)


def test_bad_rows_become_error_records(tmp_path, tiny_model):
    good = [{"role": "user", "content": "hello there"}]
    prompts = [
        good,
        None,
        [],
        [{"role": "wizard", "content": "abracadabra"}],
        [{"role": "user", "content": ""}],
        [{"role": None, "content": "no role"}],
        [{"role": "user", "content": "é" * 500}],  # longer than data.max_prompt_chars below
        [{"role": "user", "content": "unicode ✓ 日本語 🙂"}],
        good,
    ]
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts, "k": list(range(len(prompts)))}), inp)
    config = make_config(tmp_path, tiny_model, inp, data={"max_prompt_chars": 400})
    rows = run_all(config, tmp_path)
    assert [r["k"] for r in rows] == list(range(len(prompts)))
    errors = {r["k"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {1, 2, 3, 4, 5, 6}
    assert "null" in errors[1] and "empty message list" in errors[2] and "unknown role 'wizard'" in errors[3]
    assert "every message" in errors[4] and "no role" in errors[5] and "max_prompt_chars=400" in errors[6]
    for r in rows:
        assert len(r["responses"]) == (0 if r["error"] else 3)


def test_content_parts_and_non_utf8(tmp_path, tiny_model):
    parts = pa.array(
        [
            [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}],
            [{"role": "user", "content": [{"type": "image_url", "text": None}]}],
        ]
    )
    inp = tmp_path / "parts.parquet"
    pq.write_table(pa.table({"prompt": parts}), inp)
    rows = run_all(make_config(tmp_path, tiny_model, inp), tmp_path)
    assert rows[0]["error"] is None and len(rows[0]["responses"]) == 3
    assert "image_url" in rows[1]["error"]

    inp2 = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"plain text prompt", b"bad \xff\xfe bytes"], pa.binary())}), inp2)
    rows = run_all(make_config(tmp_path / "b", tiny_model, inp2), tmp_path)
    assert rows[0]["error"] is None
    assert "not valid UTF-8" in rows[1]["error"]


def test_prompt_longer_than_model_context(tmp_path, tiny_model):
    prompts = [[{"role": "user", "content": "word " * 300}], [{"role": "user", "content": "short"}]]
    inp = write_input(tmp_path / "in.parquet", [{"prompt": p} for p in prompts])
    rows = run_all(make_config(tmp_path, tiny_model, inp, engine={"max_model_len": 128}), tmp_path)
    assert "more than max_model_len=128" in rows[0]["error"]
    assert rows[1]["error"] is None and all(t <= 12 for t in rows[1]["response_tokens"])


def test_per_prompt_max_tokens_column(tmp_path, tiny_model):
    rows = [dict(r, budget=b) for r, b in zip(make_prompts(4), [2, None, 5, 0])]
    inp = write_input(tmp_path / "in.parquet", rows)
    config = make_config(tmp_path, tiny_model, inp, data={"max_tokens_column": "budget"},
                         sampling={"ignore_eos": True, "max_tokens": 9})
    out = run_all(config, tmp_path)
    assert out[0]["response_tokens"] == [2, 2, 2]
    assert out[1]["response_tokens"] == [9, 9, 9]  # null: sampling.max_tokens
    assert out[2]["response_tokens"] == [5, 5, 5]
    assert "budget must be a positive integer, got 0" in out[3]["error"]
    missing = prepare_error(tmp_path / "x", tiny_model, inp, data={"max_tokens_column": "nope"})
    assert "no max_tokens column 'nope'" in missing


def test_input_files_of_different_schemas_are_refused(tmp_path, tiny_model):
    (tmp_path / "d").mkdir()
    write_input(tmp_path / "d" / "a.parquet", make_prompts(3))
    write_input(tmp_path / "d" / "b.parquet", [{"prompt": r["prompt"]} for r in make_prompts(2)])
    msg = prepare_error(tmp_path, tiny_model, tmp_path / "d")
    assert "b.parquet has the schema" in msg and "must share one schema" in msg
