"""Engine setup shared by the backends: each engine process's CPU threads come from its real share."""

from __future__ import annotations

import json

import pytest

from hpcrollout import engines
from hpcrollout.config import load_config
from hpcrollout.executors.local import run_local
from hpcrollout.rundir import RunDir
from hpcrollout.shard import prepare_run
from tests.conftest import make_config, make_prompts, write_input


@pytest.fixture
def eight_cpus(monkeypatch):
    """8 usable CPUs, no SLURM, no thread variables; the variables and torch's threads are restored after."""
    import torch

    monkeypatch.setattr(engines, "_usable_cpus", lambda: 8)
    for var in ("SLURM_CPUS_PER_TASK", engines._USER_THREADS, *engines.THREAD_VARS):
        monkeypatch.setenv(var, "0")  # recorded, so the test's own changes are undone too
        monkeypatch.delenv(var)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_threads_are_the_slurm_share_or_the_local_share(eight_cpus):
    local = load_config(None, ["executor.num_tasks=4", "executor.local_parallelism=2"])
    assert engines.cpu_threads(local) == 4  # 8 CPUs, 2 local tasks at once
    assert engines.cpu_threads(load_config(None, ["executor.num_tasks=1", "executor.local_parallelism=4"])) == 8
    assert engines.cpu_threads(load_config(None, ["executor.num_tasks=16", "executor.local_parallelism=16"])) == 1
    eight_cpus.setenv("SLURM_CPUS_PER_TASK", "2")  # slurm.cpus_per_task, whatever the node has
    assert engines.cpu_threads(local) == 2
    eight_cpus.setenv("SLURM_CPUS_PER_TASK", "32")  # never more than the process may run on
    assert engines.cpu_threads(local) == 8
    eight_cpus.setenv("OMP_NUM_THREADS", "1")  # the user's own, lower limit wins
    assert engines.cpu_threads(local) == 1


def test_limit_sets_the_thread_variables_and_keeps_the_users_cap(eight_cpus):
    import os

    config = load_config(None, ["executor.num_tasks=2", "executor.local_parallelism=2"])
    assert engines.limit_cpu_threads(config) == 4
    assert all(os.environ[v] == "4" for v in engines.THREAD_VARS)
    # a second engine in the same process (in-process runs): our own setting is not mistaken for the user's
    wide = load_config(None, ["executor.num_tasks=1"])
    assert engines.limit_cpu_threads(wide) == 8


def test_local_tasks_run_their_engines_on_their_share(tiny_model, tmp_path, monkeypatch):
    """2 local tasks at once: each engine gets half the CPUs (torch's default gave every task every core)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    inp = write_input(tmp_path / "in.parquet", make_prompts(4))
    config = make_config(
        tmp_path, tiny_model, inp, sharding={"num_shards": 2}, executor={"num_tasks": 2, "local_parallelism": 2}
    )
    rundir = prepare_run(config)
    assert run_local(rundir.root, [0, 1], parallelism=2) == {0: 0, 1: 0}
    expected = max(1, engines._usable_cpus() // 2)
    for shard in (0, 1):
        marker = json.loads(rundir.done_marker(shard).read_text())
        assert marker["engine"]["cpu_threads"] == expected, marker["engine"]


def test_a_missing_chat_template_file_is_a_user_error_not_a_crash(tiny_model, tmp_path):
    """A FileNotFoundError would be retried by SLURM; a setup error a user can fix is an HpcRolloutError."""
    from hpcrollout.errors import HpcRolloutError

    inp = write_input(tmp_path / "in.parquet", make_prompts(2))
    config = make_config(tmp_path, tiny_model, inp)
    config.model.chat_template = str(tmp_path / "t.jinja")
    with pytest.raises(HpcRolloutError, match=r"model.chat_template: \S+t.jinja does not exist"):
        engines.create_engine(config)


def test_a_tokenizer_without_chat_template_is_one_clear_error(tiny_model, tmp_path):
    """Chat input and no template: the task stops with one message saying so (not an error record per row)."""
    import shutil

    from hpcrollout.errors import HpcRolloutError
    from hpcrollout.worker import run_task

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink()
    inp = write_input(tmp_path / "in.parquet", make_prompts(3))
    rundir = prepare_run(make_config(tmp_path, model, inp))
    with pytest.raises(HpcRolloutError, match="tokenizer has no chat template.*set model.chat_template"):
        run_task(rundir.root, 0)
    # a template file fixes it, and the transformers backend renders as the vLLM backend does
    template = tmp_path / "chatml.jinja"
    shutil.copy(tiny_model / "chat_template.jinja", template)
    config = make_config(tmp_path / "fixed", model, inp)
    config.model.chat_template = str(template)
    run_task(prepare_run(config).root, 0)
    assert len(RunDir(config.run_dir).done_shards()) == 1
