"""The commands as a user types them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from hpcrollout.cli import main as cli_main
from tests.conftest import make_prompts, write_input

REPO = Path(__file__).resolve().parent.parent


def hpcrollout(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcrollout", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_seed_compatible_run_with_dash_and_underscore_spellings(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(6))
    out = tmp_path / "out.parquet"
    r = hpcrollout("run", "--model_path", str(tiny_model), "--input", str(inp), "--output", str(out), "--n_samples", "2",
                   "--max-tokens", "8", "--backend", "transformers", "--set", "sampling.top_k=20", "--num-tasks", "2")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out)
    assert table.num_rows == 6 and all(len(x) == 2 for x in table.column("responses").to_pylist())
    assert "wrote 6 prompts, 12 responses" in r.stdout
    run_dir = tmp_path / "out.run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["sampling"]["top_k"] == 20
    # the same command again resumes (nothing left to do) and rewrites the same output
    again = hpcrollout("run", "--model_path", str(tiny_model), "--input", str(inp), "--output", str(out), "--n_samples", "2",
                       "--max-tokens", "8", "--backend", "transformers", "--set", "sampling.top_k=20", "--num-tasks", "2")
    assert again.returncode == 0, again.stderr
    assert pq.read_table(out).equals(table)
    # a changed sampling setting on the same run directory is refused, naming it
    changed = hpcrollout("run", "--model_path", str(tiny_model), "--input", str(inp), "--output", str(out), "--n_samples", "3",
                         "--backend", "transformers", "--max-tokens", "8", "--set", "sampling.top_k=20")
    assert changed.returncode == 2 and "sampling.n: 2 -> 3" in changed.stderr and "Traceback" not in changed.stderr


def test_default_backend_without_vllm_names_the_alternative(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(2))
    r = hpcrollout("run", "--model-path", str(tiny_model), "--input", str(inp), "--output", str(tmp_path / "o.parquet"))
    assert r.returncode == 2
    assert "vLLM" in r.stderr and "--backend transformers" in r.stderr and "Traceback" not in r.stderr


def test_run_with_a_missing_model_says_so_and_creates_nothing(tmp_path):
    inp = write_input(tmp_path / "in.parquet", make_prompts(2))
    r = hpcrollout("run", "--model_path", str(tmp_path / "models" / "Qwen3-4B"), "--input", str(inp),
                   "--output", str(tmp_path / "out.parquet"), "--backend", "transformers")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"model.path: {tmp_path / 'models' / 'Qwen3-4B'} does not exist" in r.stderr
    assert not (tmp_path / "out.run").exists()  # no run directory for a run that cannot start


def test_config_errors_are_one_line_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sampling:\n  top_p: 3\n")
    r = hpcrollout("run", "--config", str(cfg), "--output", str(tmp_path / "o.parquet"))
    assert r.returncode == 2 and "sampling.top_p" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_command(capsys):
    assert cli_main([]) == 0
    text = capsys.readouterr().out
    for command in ("run", "submit", "resume", "status", "merge", "flatten", "analyze", "filter", "export", "demo"):
        assert command in text


def test_demo_config_matches_embedded_default():
    from hpcrollout.demo import EMBEDDED

    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()) == EMBEDDED


def test_demo_runs_end_to_end(tmp_path):
    r = hpcrollout("demo", "--dir", str(tmp_path / "demo"), "--prompts", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    merged = pq.read_table(tmp_path / "demo" / "merged.parquet")
    assert merged.num_rows == 8 and {"topic", "difficulty", "responses"} <= set(merged.column_names)


def test_local_tasks_leave_no_orphans(tmp_path):
    """A task's leftover child processes (vLLM's engine core) die with it."""
    import time

    from hpcrollout.executors.local import _kill_group

    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                             "print(p.pid, flush=True)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    orphan = int(proc.stdout.readline())
    proc.wait()
    _kill_group(proc)
    deadline = time.time() + 120  # a generous bound: a loaded machine may take a while to reap
    while time.time() < deadline:
        try:
            os.kill(orphan, 0)
            with open(f"/proc/{orphan}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the orphaned child survived")


def test_help_and_flags_a_user_meets(capsys, tmp_path):
    """--help opens with what the tool does; -v works after the subcommand; every argument has help."""
    import pytest

    assert cli_main([]) == 0
    head = capsys.readouterr().out
    assert "n sampled responses per chat prompt" in head and "wires one subcommand" not in head
    for command, wanted in (
        ("demo", "prompts in the demo input"),
        ("merge", "the run directory (run_dir of the config)"),
        ("run", "[-v] --output OUTPUT "),  # required: not shown in brackets
    ):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert wanted in text, text
    with pytest.raises(SystemExit):
        cli_main(["run", "--input", "x.parquet"])  # --output is required, and says so
    assert "the following arguments are required: --output" in capsys.readouterr().err
    r = hpcrollout("status", str(tmp_path / "nope"), "-v")
    assert r.returncode == 2 and "unrecognized arguments" not in r.stderr and "does not exist" in r.stderr


def test_status_of_a_file_says_it_is_a_file(tmp_path):
    f = tmp_path / "merged.parquet"
    f.write_bytes(b"PAR1")
    r = hpcrollout("status", str(f))
    assert r.returncode == 2 and f"{f} is a file, not a run directory" in r.stderr
