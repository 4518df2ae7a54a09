"""hpcrollout score: files (merged, flattened), references, bad input, run directories resumable per shard, the
CLI, and the end-to-end path: generate with the tiny model, score with a user function, filter, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcrollout import cli
from hpcrollout.errors import HpcRolloutError
from hpcrollout.export import export_jsonl
from hpcrollout.filter import Criteria, filter_file
from hpcrollout.flatten import flatten
from hpcrollout.rundir import RunDir
from hpcrollout.scoring.score import Settings, score_file, score_run_dir
from tests.scoring_helpers import write_scored_input, write_user_module

ROWS: list[dict[str, Any]] = [
    {"answer": "Paris", "responses": ["Paris", "the answer is paris.", "Lyon"]},
    {"answer": None, "responses": ["Paris"]},  # no reference: a per-row detail
    {"answer": "Rome", "responses": [], "error": "prompt too long"},
    {"answer": "42", "responses": ["\\boxed{42}", "#### 41"]},
    {"answer": "x", "responses": []},
]


def _table(path: Path) -> pa.Table:
    return pq.read_table(path)


@pytest.mark.parametrize(("workers", "batch_rows"), [(0, None), (2, 1), (1, 3)])
def test_merged_file_full_input_plus_scores(tmp_path: Path, workers: int, batch_rows: int | None) -> None:
    src = write_scored_input(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "s.parquet"
    r = score_file(src, out, Settings("exact", workers=workers, chunk=2), batch_rows=batch_rows)
    got = _table(out)
    inp = _table(src)
    assert got.schema.names == [*inp.schema.names, "scores", "score_details"]
    assert got.drop_columns(["scores", "score_details"]).equals(inp)
    assert got.column("scores").to_pylist() == [[1.0, 1.0, 0.0], [None], [], [1.0, 0.0], []]
    details = got.column("score_details").to_pylist()
    assert [d["answer"] for d in details[0]] == ["paris", "paris", "lyon"]
    assert details[1] == [{"answer": None, "status": "no_reference", "message": "the row has no reference answer"}]
    assert (r.rows, r.responses, r.statuses, r.reference) == (5, 6, {"ok": 5, "no_reference": 1}, "answer")
    assert r.mean_score == pytest.approx(3 / 5)


def test_flattened_file_and_replacing_scores(tmp_path: Path) -> None:
    src = write_scored_input(tmp_path / "m.parquet", ROWS)
    flat = tmp_path / "flat.parquet"
    flatten(src, flat)
    out = tmp_path / "fs.parquet"
    score_file(flat, out, Settings("exact", workers=0))
    got = _table(out)
    assert got.schema.names == [*_table(flat).schema.names, "score", "score_detail"]
    # score then flatten == flatten then score; the error records keep a null score
    score_file(src, tmp_path / "ms.parquet", Settings("exact", workers=0))
    flatten(tmp_path / "ms.parquet", tmp_path / "msf.parquet")
    assert _table(tmp_path / "msf.parquet").equals(got)
    assert got.column("score").to_pylist() == [1.0, 1.0, 0.0, None, None, 1.0, 0.0, None]
    # Scoring a scored file again replaces the columns where they stand.
    again = tmp_path / "again.parquet"
    score_file(tmp_path / "ms.parquet", again, Settings("regex:(\\d+)", workers=0))
    assert _table(again).schema.names == _table(tmp_path / "ms.parquet").schema.names
    assert _table(again).column("scores").to_pylist()[3] == [1.0, 0.0]  # 42 right, 41 wrong


def test_references_nested_and_bad(tmp_path: Path) -> None:
    rows = [
        {"reward_model": {"ground_truth": "B", "style": "rule"}, "meta": {"x": 1}, "responses": ["(B)", "A"]},
        {"reward_model": {"ground_truth": None, "style": "rule"}, "meta": {"x": 2}, "responses": ["B"]},
    ]
    src = write_scored_input(tmp_path / "verl.parquet", rows)
    out = tmp_path / "s.parquet"
    r = score_file(src, out, Settings("choice", reference="reward_model.ground_truth", workers=0))
    assert _table(out).column("scores").to_pylist() == [[1.0, 0.0], [None]]
    # Without --reference, reward_model.ground_truth is found among the usual places.
    assert score_file(src, out, Settings("choice", workers=0)).reference == "reward_model.ground_truth" == r.reference
    with pytest.raises(
        HpcRolloutError, match=r"--reference reward_model.truth: reward_model .* has no field 'truth'; "
    ):
        score_file(src, out, Settings("choice", reference="reward_model.truth", workers=0))
    with pytest.raises(
        HpcRolloutError, match=r"--reference meta: the reference holds struct<x: int64>; .*COLUMN.FIELD"
    ):
        score_file(src, out, Settings("choice", reference="meta", workers=0))
    with pytest.raises(HpcRolloutError, match=r"--reference gold: .*verl.parquet has no column 'gold'; its columns"):
        score_file(src, out, Settings("choice", reference="gold", workers=0))
    bare = write_scored_input(tmp_path / "bare.parquet", [{"responses": ["A"]}])
    with pytest.raises(HpcRolloutError, match=r"bare.parquet has none of the usual reference columns .*--reference"):
        score_file(bare, out, Settings("exact", workers=0))
    with pytest.raises(HpcRolloutError, match=r"module 'not_a_module_qq' does not import"):
        score_file(bare, out, Settings("python:not_a_module_qq:f", workers=0))


def test_python_verifier_in_workers_with_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user function from a module, imported in each worker; one response hangs in C: killed, recorded, done."""
    write_user_module(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"answer": i, "responses": [f"{i}", "hang" if i == 1 else "x", f"{i + 1}"]} for i in range(6)]
    src = write_scored_input(tmp_path / "m.parquet", rows)
    out = tmp_path / "s.parquet"
    r = score_file(src, out, Settings("python:user_verifiers:hangs_in_c", timeout_s=2.0, workers=2, chunk=3))
    assert r.workers_killed == 1 and r.statuses == {"ok": 17, "timeout": 1}
    details = _table(out).column("score_details").to_pylist()
    assert details[1][1]["status"] == "timeout" and "killed after 5 s" in details[1][1]["message"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> RunDir:
    """A real run with the tiny model: 10 prompts in 3 shards, n=3; each prompt's answer column is its index."""
    from hpcrollout.shard import prepare_run
    from hpcrollout.worker import run_task
    from tests.conftest import make_config, make_prompts, write_input

    tmp = tmp_path_factory.mktemp("scored_run")
    prompts = [
        dict(p, answer=str(i), data_source="even" if i % 2 == 0 else "odd") for i, p in enumerate(make_prompts(10))
    ]
    inp = write_input(tmp / "in.parquet", prompts)
    config = make_config(tmp, tiny_model, inp, sharding={"num_shards": 3})
    rundir = prepare_run(config)
    run_task(rundir.root, 0)
    return rundir


LENGTH_RULE = "def even_length(response, row):\n    return len(response) % 2 == 0\n"


def _user_fn(tmp_path: Path) -> str:
    (tmp_path / "length_rule.py").write_text(LENGTH_RULE)
    return f"python:{tmp_path / 'length_rule.py'}:even_length"


def test_run_directory_per_shard_resume(finished_run: RunDir, tmp_path: Path) -> None:
    from hpcrollout.merge import merge_run

    rd = finished_run
    for s in range(3):
        rd.shard_scores(s).unlink(missing_ok=True)
    settings = Settings(_user_fn(tmp_path), workers=1)
    r = score_run_dir(rd.root, None, settings, shards="0")
    assert r.shards_scored == [0] and rd.shard_scores(0).is_file() and not rd.shard_scores(1).exists()
    out = tmp_path / "scored.parquet"
    r = score_run_dir(rd.root, out, settings)
    assert (r.shards_reused, r.shards_scored, r.rows_out) == ([0], [1, 2], 10) and r.rows < 10
    # The same as scoring the merged file in one go.
    merged = tmp_path / "merged.parquet"
    merge_run(rd.root, merged)
    score_file(merged, tmp_path / "direct.parquet", settings)
    assert _table(out).equals(_table(tmp_path / "direct.parquet"))
    responses = _table(out).column("responses").to_pylist()
    assert _table(out).column("scores").to_pylist() == [[float(len(x) % 2 == 0) for x in row] for row in responses]
    # Nothing to do the second time; a changed setting or a regenerated shard output is scored again.
    assert score_run_dir(rd.root, out, settings).shards_scored == []
    assert score_run_dir(rd.root, out, Settings(settings.verifier, timeout_s=3, workers=1)).shards_scored == [0, 1, 2]
    os.utime(rd.shard_output(1), ns=(time.time_ns(), time.time_ns()))
    assert score_run_dir(rd.root, out, Settings(settings.verifier, timeout_s=3, workers=1)).shards_scored == [1]
    assert score_run_dir(rd.root, out, Settings(settings.verifier, timeout_s=3), rescore=True).shards_scored == [
        0,
        1,
        2,
    ]
    with pytest.raises(HpcRolloutError, match=r"--shards '7': the run has shards 0-2, not 7"):
        score_run_dir(rd.root, None, settings, shards="7")


def test_killed_scoring_resumes_at_the_next_shard(finished_run: RunDir, tmp_path: Path) -> None:
    """SIGKILL the score command while it scores shard 2: shards 0 and 1 are kept, shard 2 has no half file."""
    rd = finished_run
    for s in range(3):
        rd.shard_scores(s).unlink(missing_ok=True)
    ids = pq.read_table(rd.shard_input(2), columns=["_hpcr_row"]).column(0).to_pylist()
    stop_row = ids[0]
    module = tmp_path / "stalls.py"
    module.write_text(
        "import time\n"
        "def stall(response, row):\n"
        f"    if row['answer'] == '{stop_row}':\n"
        "        time.sleep(3600)\n"
        "    return 1.0\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "hpcrollout",
        "score",
        str(rd.root),
        "--verifier",
        f"python:{module}:stall",
        "--timeout",
        "3000",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (rd.shard_scores(0).is_file() and rd.shard_scores(1).is_file()):
            assert proc.poll() is None, "the score command ended early"
            assert time.monotonic() < deadline, "shards 0 and 1 were not scored in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not rd.shard_scores(2).exists()
    assert not [p for p in rd.shard_scores(2).parent.iterdir() if p.suffix == ".parquet" and "00002" in p.name]
    module.write_text("def stall(response, row):\n    return 1.0\n")
    r = score_run_dir(rd.root, tmp_path / "out.parquet", Settings(f"python:{module}:stall", timeout_s=3000, workers=1))
    assert (r.shards_reused, r.shards_scored) == ([0, 1], [2])
    assert all(s == [1.0] * 3 for s in _table(tmp_path / "out.parquet").column("scores").to_pylist())


def test_end_to_end_generate_score_filter_export(finished_run: RunDir, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The tiny model's responses, scored by a user function through the CLI, filtered, exported as SFT data."""
    rd = finished_run
    fn = _user_fn(tmp_path)
    scored = tmp_path / "scored.parquet"
    assert cli.main(["score", str(rd.root), "-o", str(scored), "--verifier", fn, "--workers", "2", "--rescore"]) == 0
    printed = capsys.readouterr().out
    assert "scored 30 responses of 10 rows with python:" in printed and "-> " + str(scored) in printed
    table = _table(scored)
    expected = [[float(len(x) % 2 == 0) for x in row] for row in table.column("responses").to_pylist()]
    assert table.column("scores").to_pylist() == expected
    assert cli.main(["analyze", str(scored), "--by", "data_source", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["scoring"]
    correct = sum(sum(row) for row in expected)
    assert report["accuracy"] == pytest.approx(correct / 30, abs=1e-6)
    assert set(report["groups"]) == {"even", "odd"}
    assert sum(report["solve_rate"].values()) == 10
    kept = tmp_path / "kept.parquet"
    r = filter_file(scored, kept, Criteria(correct=True, drop_empty_rows=True))
    assert r.responses_out == correct
    e = export_jsonl(kept, tmp_path / "sft.jsonl", fmt="messages")
    records = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert e.records_out == len(records) == correct
    assert all(len(rec["messages"][-1]["content"]) % 2 == 0 and rec["score"] == 1.0 for rec in records)


def test_cli_errors(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    src = write_scored_input(tmp_path / "m.parquet", ROWS)
    assert cli.main(["score", str(src), "--verifier", "exact"]) == 2
    assert "--output is required unless INPUT is a run directory" in capsys.readouterr().err
    assert (
        cli.main(["score", str(src), "-o", str(tmp_path / "o.parquet"), "--verifier", "exact", "--timeout", "0"]) == 2
    )
    assert "--timeout must be > 0" in capsys.readouterr().err
    argv = ["score", str(src), "-o", str(tmp_path / "o.parquet"), "--verifier", "python:nope_mod_zz:f"]
    assert cli.main(argv) == 2
    assert "module 'nope_mod_zz' does not import" in capsys.readouterr().err
    argv = ["score", str(src), "-o", str(tmp_path / "o.parquet"), "--verifier", "exact", "--workers", "0", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["statuses"] == {"ok": 5, "no_reference": 1}


def test_follow_scores_shards_as_they_finish(finished_run: RunDir, tmp_path: Path) -> None:
    """--follow beside a run whose shard 2 is not finished yet: shards 0 and 1 get scored, then shard 2 once done."""
    import threading

    from hpcrollout.scoring.score import follow_run_dir

    rd = finished_run
    for s in range(3):
        rd.shard_scores(s).unlink(missing_ok=True)
    marker = rd.done_marker(2)
    hidden = tmp_path / "marker.json"
    marker.rename(hidden)  # shard 2 looks unfinished
    out = tmp_path / "followed.parquet"
    result: dict[str, Any] = {}
    stop = threading.Event()

    def follow() -> None:
        try:
            result["report"] = follow_run_dir(
                rd.root, out, Settings(_user_fn(tmp_path), workers=1), 0.2, should_stop=stop.is_set
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["error"] = exc

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (rd.shard_scores(0).is_file() and rd.shard_scores(1).is_file()):
            assert thread.is_alive() and time.monotonic() < deadline, result
            time.sleep(0.1)
        assert not rd.shard_scores(2).exists() and not out.exists()
        hidden.rename(marker)  # shard 2 finishes
        thread.join(timeout=120)
        assert not thread.is_alive(), "follow did not return after the last shard finished"
    finally:
        if hidden.exists():
            hidden.rename(marker)
        stop.set()
        thread.join(timeout=60)
    if "error" in result:
        raise result["error"]
    r = result["report"]
    assert sorted(r.shards_scored) == [0, 1, 2] and r.rows_out == 10 and r.responses == 30
    assert pq.read_table(out).num_rows == 10
