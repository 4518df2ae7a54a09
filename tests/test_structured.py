"""Structured outputs without an engine: constraints (run and per row) are checked at load, every response is
checked after generation (schema_valid), analyze reports the valid share, and the transformers backend refuses
them at load. The vLLM path (what reaches SamplingParams, the per-row column end to end) is in
test_vllm_admission.py, against its stand-in."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout.analyze import analyze, format_report
from hpcrollout.config import build_config
from hpcrollout.engines.transformers_engine import TransformersEngine
from hpcrollout.errors import HpcRolloutError
from hpcrollout.flatten import flatten
from hpcrollout.shard import prepare_run
from hpcrollout.structured import constraint_of_cell, is_valid, parse_constraint
from tests.conftest import make_config, make_prompts, write_input

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize("jsonschema_installed", [True, False])
def test_each_kind_is_checked(monkeypatch, jsonschema_installed):
    if not jsonschema_installed:
        monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema raises ImportError
    json_c = parse_constraint({"json": SCHEMA})
    assert is_valid(json_c, '{"name": "a", "age": 3}') is True
    assert is_valid(json_c, '{"name": "a"}') is False  # a required key missing
    assert is_valid(json_c, '["name", "age"]') is False  # not an object
    assert is_valid(json_c, '{"name": "a", "age": 3') is False  # cut off (max_tokens)
    # only the full check sees a property of the wrong type
    assert is_valid(json_c, '{"name": "a", "age": "3"}') is (not jsonschema_installed)
    assert is_valid(parse_constraint({"regex": r"\d{3}-[a-z]+"}), "123-abc") is True
    assert is_valid(parse_constraint({"regex": r"\d{3}-[a-z]+"}), "123-abc ") is False  # fullmatch
    assert is_valid(parse_constraint({"choice": ["yes", "no"]}), "no") is True
    assert is_valid(parse_constraint({"choice": ["yes", "no"]}), "No") is False
    assert is_valid(parse_constraint({"grammar": 'root ::= "a"'}), "a") is None  # not checked
    assert is_valid(None, "anything") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"regex": "a", "choice": ["a"]}, "exactly one of json, regex, choice, grammar, got regex, choice"),
        ({}, "got none"),
        ({"regexp": "a"}, "unknown key"),
        ({"regex": "("}, "does not compile"),
        ({"choice": []}, "non-empty list of strings"),
        ({"json": "{not json"}, "not a JSON schema"),
    ],
)
def test_bad_run_constraints_are_refused_at_load_naming_the_key(value, message):
    with pytest.raises(HpcRolloutError, match=f"sampling.structured_outputs: .*{message}"):
        build_config({"sampling": {"structured_outputs": value}})


def test_row_cells_are_constraints_or_json_schemas():
    assert constraint_of_cell(None) is None
    assert constraint_of_cell('{"regex": "a+"}') == {"regex": "a+"}
    assert constraint_of_cell(SCHEMA) == {"json": SCHEMA}  # any other mapping is a JSON schema
    assert constraint_of_cell('{"type": "integer"}') == {"json": {"type": "integer"}}
    struct_cell = {"json": None, "regex": None, "choice": ["a", "b"], "grammar": None}  # a Parquet struct row
    assert constraint_of_cell(struct_cell) == {"choice": ["a", "b"]}
    with pytest.raises(ValueError, match="not JSON"):
        constraint_of_cell("a+")
    assert parse_constraint({"json": '{"type": "string"}'}) == {"json": {"type": "string"}}


def test_transformers_backend_refuses_structured_outputs_at_load(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(2))
    for section, values, key in [
        ("sampling", {"structured_outputs": {"choice": ["a"]}}, "sampling.structured_outputs"),
        ("data", {"input": str(inp), "structured_outputs_column": "schema"}, "data.structured_outputs_column"),
    ]:
        config = make_config(tmp_path, tiny_model, inp, **{section: values})
        with pytest.raises(HpcRolloutError, match=f"^{key}: the transformers backend .*the vLLM backend has"):
            TransformersEngine(config)


def test_structured_outputs_are_fingerprinted(tmp_path, tiny_model):
    rows = [dict(r, schema='{"regex": "a"}') for r in make_prompts(3)]
    inp = write_input(tmp_path / "in.parquet", rows)
    prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"structured_outputs": {"regex": "a+"}}))
    with pytest.raises(HpcRolloutError, match=r"sampling settings[\s\S]*sampling.structured_outputs: "):
        prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"structured_outputs": {"regex": "b+"}}), busy=True)
    config = make_config(
        tmp_path,
        tiny_model,
        inp,
        sampling={"structured_outputs": {"regex": "a+"}},
        data={"input": str(inp), "structured_outputs_column": "schema"},
    )
    with pytest.raises(HpcRolloutError, match=r"data settings[\s\S]*data.structured_outputs_column: None -> 'schema'"):
        prepare_run(config, busy=True)
    missing = make_config(
        tmp_path / "b", tiny_model, inp, data={"input": str(inp), "structured_outputs_column": "nope"}
    )
    with pytest.raises(HpcRolloutError, match=r"has no column 'nope' \(data.structured_outputs_column\)"):
        prepare_run(missing)


def test_analyze_and_flatten_report_schema_valid(tmp_path):
    merged = pa.table(
        {
            "uid": ["a", "b", "c"],
            "responses": [["1", "x", "2"], [], ["3", "4", "5"]],
            "response_tokens": pa.array([[1, 1, 1], [], [1, 1, 1]], pa.list_(pa.int32())),
            "finish_reasons": [["stop"] * 3, [], ["stop"] * 3],
            "error": [None, "bad prompt: empty", None],
            "schema_valid": pa.array([[True, False, True], [], [None, None, None]], pa.list_(pa.bool_())),
        }
    )
    pq.write_table(merged, tmp_path / "m.parquet")
    report = analyze(tmp_path / "m.parquet")
    assert (report["schema_checked"], report["schema_valid"], report["schema_valid_frac"]) == (3, 2, 0.666667)
    assert "schema valid        2 of 3 checked (66.7%" in format_report(report)
    flatten(tmp_path / "m.parquet", tmp_path / "f.parquet")
    flat = pq.read_table(tmp_path / "f.parquet")
    assert flat.column("schema_valid").to_pylist() == [True, False, True, None, None, None, None]
    again = analyze(tmp_path / "f.parquet")
    assert (again["schema_checked"], again["schema_valid"]) == (3, 2)
    pq.write_table(merged.drop_columns(["schema_valid"]), tmp_path / "plain.parquet")
    assert analyze(tmp_path / "plain.parquet")["schema_checked"] is None


def test_an_unset_column_leaves_the_data_fingerprint_of_older_runs():
    from hpcrollout.config import _digest

    config = build_config({"data": {"prompt_column": "p"}})
    old = {"prompt_column": "p", "id_column": None, "max_tokens_column": None, "max_prompt_chars": 1_000_000}
    assert config.generation_fingerprint()["data"] == _digest(old)
