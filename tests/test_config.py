from __future__ import annotations

import pytest

from hpcrollout.config import load_config, parse_override
from hpcrollout.errors import HpcRolloutError


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "sampling:\n  n: 4\n  temperature: 0.9\nengine:\n  kwargs: {swap_space: 4}\n")
    c = load_config(p, ["sampling.temperature=0.7", "sampling.stop=['</s>', '###']", "engine.max_model_len=4096"])
    assert c.sampling.n == 4 and c.sampling.temperature == 0.7
    assert c.sampling.stop == ["</s>", "###"]
    assert c.engine.max_model_len == 4096 and c.engine.kwargs == {"swap_space": 4}


def test_unknown_key_names_dotted_key(tmp_path):
    p = write(tmp_path, "sampling:\n  temprature: 0.7\n")
    with pytest.raises(HpcRolloutError, match=r"sampling\.temprature: unknown key"):
        load_config(p)


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(HpcRolloutError, match=r"sampling\.top_p: .*1\.5"):
        load_config(None, ["sampling.top_p=1.5"])
    with pytest.raises(HpcRolloutError, match=r"backend"):
        load_config(None, ["backend=tgi"])
    with pytest.raises(HpcRolloutError, match=r"sampling\.n"):
        load_config(None, ["sampling.n=zero"])


def test_override_syntax_errors():
    with pytest.raises(HpcRolloutError, match="KEY=VALUE"):
        parse_override("sampling.temperature")
    with pytest.raises(HpcRolloutError, match="not a section"):
        load_config(None, ["sampling.n=2", "sampling.n.x=1"])


def test_config_file_errors(tmp_path):
    with pytest.raises(HpcRolloutError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(HpcRolloutError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(HpcRolloutError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [\n"))


def test_greedy_with_n_is_refused():
    with pytest.raises(HpcRolloutError, match="identical"):
        load_config(None, ["sampling.n=4", "sampling.temperature=0"])


def test_generation_fingerprint_ignores_resources():
    a = load_config(None, ["sampling.n=2"])
    b = load_config(None, ["sampling.n=2", "slurm.partition=gpu", "executor.num_tasks=8"])
    c = load_config(None, ["sampling.n=3"])
    assert a.generation_fingerprint() == b.generation_fingerprint()
    assert a.generation_fingerprint()["sampling"] != c.generation_fingerprint()["sampling"]


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_template_lists_every_key_with_its_default():
    """configs/template.yaml claims to be every key with its default: it is, key for key, value for value."""
    from pathlib import Path

    import yaml

    from hpcrollout.config import RunConfig

    template = yaml.safe_load(Path(__file__).parent.parent.joinpath("configs", "template.yaml").read_text())
    assert template == RunConfig().model_dump(mode="json")


def test_relative_paths_resolve_against_the_config_file_and_the_command_line_against_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    p = tmp_path / "conf" / "c.yaml"
    p.write_text("run_dir: ../runs/r\ndata: {input: in.parquet}\nmodel: {path: models/tiny/v1, tokenizer: Qwen/Qwen3-4B}\n")
    monkeypatch.chdir(tmp_path)
    c = load_config(p)
    assert c.run_dir == str(tmp_path / "runs" / "r") and c.data.input == str(tmp_path / "conf" / "in.parquet")
    assert c.model.path == str(tmp_path / "conf" / "models" / "tiny" / "v1")  # a path, though it does not exist
    assert c.model.tokenizer == "Qwen/Qwen3-4B"  # a hub name stays one
    c = load_config(p, ["data.input=other.parquet"], base={"run_dir": "here"})
    assert c.data.input == str(tmp_path / "other.parquet") and c.run_dir == str(tmp_path / "here")


def test_engines_per_task_must_fit_the_task_gpus():
    """K engines x tensor x pipeline parallel size may not exceed slurm.gpus_per_task; the error names the keys."""
    ok = load_config(None, ["executor.type=slurm", "slurm.gpus_per_task=4", "engine.tensor_parallel_size=2",
                            "executor.engines_per_task=2"])
    assert ok.executor.engines_per_task == 2
    assert load_config(None, ["executor.engines_per_task=auto"]).executor.engines_per_task == "auto"
    with pytest.raises(HpcRolloutError) as err:
        load_config(None, ["executor.type=slurm", "slurm.gpus_per_task=4", "engine.tensor_parallel_size=2",
                           "executor.engines_per_task=3"])
    for key in ("executor.engines_per_task", "engine.tensor_parallel_size", "slurm.gpus_per_task"):
        assert key in str(err.value)
    with pytest.raises(HpcRolloutError, match="executor.engines_per_task: must be at least 1"):
        load_config(None, ["executor.engines_per_task=0"])


def test_engines_per_task_auto_and_slices():
    """auto = the task's GPUs / (tp x pp); each engine gets its own consecutive slice."""
    from hpcrollout.executors.engine_group import engines_for_task, gpu_slices

    gpus = ["0", "1", "2", "3"]
    tp2 = load_config(None, ["engine.tensor_parallel_size=2", "executor.engines_per_task=auto"])
    assert engines_for_task(tp2, gpus) == 2
    assert gpu_slices(gpus, 2, 2) == [["0", "1"], ["2", "3"]]
    assert engines_for_task(load_config(None, ["executor.engines_per_task=auto"]), gpus) == 4
    assert engines_for_task(load_config(None, ["executor.engines_per_task=auto"]), []) == 1
    with pytest.raises(HpcRolloutError, match="executor.engines_per_task is 3 x 2 GPUs"):
        engines_for_task(load_config(None, ["engine.tensor_parallel_size=2", "executor.engines_per_task=3"]), gpus)
