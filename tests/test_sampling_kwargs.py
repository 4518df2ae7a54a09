"""sampling.kwargs on the transformers backend (the tiny model, real decoding): each supported field has vLLM's
meaning, the others are refused at load time naming the key; and a resume with sampling.kwargs changed is
refused. The vLLM side (what reaches SamplingParams) is in test_vllm_admission.py, against its stand-in."""

from __future__ import annotations

import pytest

from hpcrollout.config import build_config
from hpcrollout.engines.base import PromptRequest
from hpcrollout.engines.transformers_engine import TransformersEngine
from hpcrollout.errors import HpcRolloutError
from hpcrollout.shard import prepare_run
from tests.conftest import make_config, make_prompts, write_input


def engine_with(tmp_path, tiny_model, **sampling):
    inp = write_input(tmp_path / "in.parquet", make_prompts(2))
    sections = {"n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 7, **sampling}
    return TransformersEngine(make_config(tmp_path, tiny_model, inp, sampling=sections))


def sample(engine) -> list:
    request = PromptRequest(uid="u", row=0, messages=[{"role": "user", "content": "Tell me"}], text=None, seed=11)
    (result,) = engine.generate([request])
    assert result.error is None
    return result.samples


def test_allowed_token_ids_and_logit_bias(tmp_path, tiny_model):
    allowed = [300, 301, 302]
    engine = engine_with(tmp_path, tiny_model, return_token_ids=True, kwargs={"allowed_token_ids": allowed})
    assert all(set(s.token_ids) <= set(allowed) and s.num_tokens == 8 for s in sample(engine))
    # YAML may give token ids as strings (a mapping key); +100 makes the token all but certain
    engine = engine_with(tmp_path, tiny_model, return_token_ids=True, kwargs={"logit_bias": {"300": 100}})
    assert all(s.token_ids == [300] * 8 for s in sample(engine))


def test_min_tokens_defers_eos(tmp_path, tiny_model):
    eos = engine_with(tmp_path, tiny_model).tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = {"logit_bias": {eos: 100}}
    engine = engine_with(tmp_path, tiny_model, kwargs=forced)
    assert [(s.num_tokens, s.finish_reason) for s in sample(engine)] == [(1, "stop")] * 3
    engine = engine_with(tmp_path, tiny_model, return_token_ids=True, kwargs={**forced, "min_tokens": 5})
    got = sample(engine)
    assert [(s.num_tokens, s.finish_reason) for s in got] == [(6, "stop")] * 3
    assert all(eos not in s.token_ids[:5] and s.token_ids[5] == eos for s in got)


def test_bad_words_are_never_completed(tmp_path, tiny_model):
    engine = engine_with(tmp_path, tiny_model)
    word = engine.tokenizer.decode([300])
    spaced = engine.tokenizer.encode(" " + word, add_special_tokens=False)
    bias = {300: 100, spaced[-1]: 100}
    engine = engine_with(tmp_path, tiny_model, return_token_ids=True, kwargs={"logit_bias": bias})
    assert all(300 in s.token_ids for s in sample(engine))  # without bad_words the biased token comes
    engine = engine_with(tmp_path, tiny_model, return_token_ids=True, kwargs={"logit_bias": bias, "bad_words": [word]})
    got = sample(engine)
    assert all(s.num_tokens == 8 and 300 not in s.token_ids for s in got)
    if len(spaced) == 1:  # the word with a leading space is banned too
        assert all(spaced[0] not in s.token_ids for s in got)


def test_include_stop_str_in_output(tmp_path, tiny_model):
    engine = engine_with(tmp_path, tiny_model)
    word = engine.tokenizer.decode([300])
    settings = {"stop": [word], "kwargs": {"logit_bias": {300: 100}}}
    assert [s.text for s in sample(engine_with(tmp_path, tiny_model, **settings))] == [""] * 3
    settings["kwargs"]["include_stop_str_in_output"] = True
    got = sample(engine_with(tmp_path, tiny_model, **settings))
    assert [(s.text, s.finish_reason, s.stop_reason) for s in got] == [(word, "stop", word)] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"truncate_prompt_tokens": 8},
            r"sampling.kwargs.truncate_prompt_tokens: the transformers backend does not "
            r"support it .*the vLLM backend has it \(backend: vllm\)",
        ),
        ({"logit_bias": {99999: 1.0}}, r"sampling.kwargs.logit_bias: expected an integer in \[0, \d+\], got 99999"),
        ({"min_tokens": 50}, r"sampling.kwargs.min_tokens: expected an integer in \[0, 8\], got 50"),
        ({"bad_words": [""]}, r"sampling.kwargs.bad_words: expected non-empty strings"),
    ],
)
def test_unsupported_or_bad_kwargs_are_refused_at_load(tmp_path, tiny_model, kwargs, message):
    with pytest.raises(HpcRolloutError, match=message):
        engine_with(tmp_path, tiny_model, kwargs=kwargs)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("temperature", "temperature has its own key: set sampling.temperature instead"),
        ("output_kind", "output_kind cannot be set here"),
        ("structured_outputs", "set sampling.structured_outputs instead"),
    ],
)
def test_kwargs_may_not_shadow_what_hpcrollout_sets(key, message):
    with pytest.raises(HpcRolloutError, match=f"sampling.kwargs: .*{message}"):
        build_config({"sampling": {"kwargs": {key: 1}}})


def test_kwargs_are_fingerprinted_but_unset_leaves_the_old_fingerprint(tmp_path, tiny_model):
    inp = write_input(tmp_path / "in.parquet", make_prompts(3))
    prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"kwargs": {"min_tokens": 2}}))
    with pytest.raises(
        HpcRolloutError, match=r"sampling settings[\s\S]*sampling.kwargs: \{'min_tokens': 2\} -> \{'min_tokens': 3\}"
    ):
        prepare_run(make_config(tmp_path, tiny_model, inp, sampling={"kwargs": {"min_tokens": 3}}), busy=True)
    with pytest.raises(HpcRolloutError, match="sampling settings"):
        prepare_run(make_config(tmp_path, tiny_model, inp), busy=True)
    # a run directory from before these keys existed (its hash has none of them) still resumes
    config = build_config({"sampling": {"temperature": 0.5}})
    old = config.model_dump(mode="json")["sampling"]
    del old["kwargs"], old["structured_outputs"]
    from hpcrollout.config import _digest

    assert config.generation_fingerprint()["sampling"] == _digest(old)
