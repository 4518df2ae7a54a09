"""VllmEngine on a real GPU: n samples with recorded seeds, reproducibility across a stop and resume, chat
templates, rejected prompts as error rows, optional outputs, bounded backlog. Needs vLLM and a GPU."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest

from tests.gpu.helpers import by_row, chat_request, text_request

pytestmark = pytest.mark.gpu


def reference_ids(engine, request) -> list[int]:
    """The prompt's token ids computed straight from the tokenizer files, not through the engine."""
    from transformers import AutoTokenizer

    mc = engine.config.model
    tok = AutoTokenizer.from_pretrained(mc.path)
    if request.messages is None:
        return tok(request.text)["input_ids"]
    template = Path(mc.chat_template).read_text() if mc.chat_template else None
    text = tok.apply_chat_template(
        request.messages, chat_template=template, tokenize=False, add_generation_prompt=True, **mc.chat_template_kwargs
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def test_n_samples_per_prompt_with_recorded_seeds(engine_for):
    engine = engine_for()
    requests = [chat_request(i) for i in range(6)]
    results = by_row(engine.generate(requests))
    assert sorted(results) == list(range(6))
    for req in requests:
        res = results[req.row]
        assert res.error is None and res.uid == req.uid
        assert [s.seed for s in res.samples] == [req.seed + i for i in range(4)]  # vLLM's child seed rule
        assert [s.num_tokens for s in res.samples] == [16] * 4
        assert {s.finish_reason for s in res.samples} == {"length"}
        assert res.prompt_tokens == len(reference_ids(engine, req))
        assert len({s.text for s in res.samples}) > 1  # n different samples, not one repeated


def test_per_prompt_max_tokens_overrides_the_sampling_setting(engine_for):
    engine = engine_for()  # sampling.max_tokens 16, ignore_eos: every sample runs to its budget
    requests = [dataclasses.replace(chat_request(i), max_tokens=m) for i, m in enumerate([3, 16, 7])]
    results = by_row(engine.generate(requests + [chat_request(3)]))
    assert [[s.num_tokens for s in results[i].samples] for i in range(4)] == [[3] * 4, [16] * 4, [7] * 4, [16] * 4]


def test_same_seed_same_samples_whatever_the_batch_and_after_a_stop(engine_for):
    engine = engine_for({"sampling": {"return_token_ids": True}})
    requests = [chat_request(i) for i in range(10)]
    full = by_row(engine.generate(requests))

    # Stop after 3 results (what a killed worker leaves behind), then resume with the rest in another order.
    stream = engine.generate(requests)
    got = by_row(itertools.islice(stream, 3))
    stream.close()
    assert not engine.engine.has_unfinished_requests()  # closing aborted what was in flight
    rest = [r for r in reversed(requests) if r.row not in got]
    got.update(by_row(engine.generate(rest)))

    assert sorted(got) == sorted(full)
    for row, res in full.items():
        assert [s.token_ids for s in got[row].samples] == [s.token_ids for s in res.samples], f"row {row}"
        assert [s.seed for s in got[row].samples] == [s.seed for s in res.samples]
    # A single prompt on its own draws the same samples too.
    alone = next(iter(engine.generate([requests[4]])))
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in full[4].samples]


def test_chat_template_file_and_kwargs_and_raw_text(engine_for, tmp_path):
    req = chat_request(1)
    plain = engine_for({"sampling": {"max_tokens": 2}})
    base = next(iter(plain.generate([req])))
    assert base.prompt_tokens == len(reference_ids(plain, req))

    no_think = engine_for(
        {"sampling": {"max_tokens": 2}, "model": {"chat_template_kwargs": {"enable_thinking": False}}}
    )
    res = next(iter(no_think.generate([req])))
    extra = len(no_think.renderer.tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"])
    assert res.prompt_tokens == base.prompt_tokens + extra == len(reference_ids(no_think, req))

    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    custom = engine_for({"sampling": {"max_tokens": 2}, "model": {"chat_template": str(template)}})
    res = next(iter(custom.generate([req])))
    assert res.error is None and res.prompt_tokens == len(reference_ids(custom, req))
    (ids,) = custom.renderer.encode([req])
    assert ids == reference_ids(custom, req)
    assert custom.renderer.tokenizer.decode(ids).startswith("[user] Tell me about")

    raw = text_request(7, "Once upon a time there was a raw prompt")
    res = next(iter(plain.generate([raw])))
    assert res.error is None and res.prompt_tokens == len(reference_ids(plain, raw))


def test_too_long_and_rejected_prompts_become_error_rows(engine_for):
    engine = engine_for()
    too_long = text_request(1, " ".join(f"word{i}" for i in range(2000)))  # far beyond max_model_len=512
    empty = text_request(2, "")  # passes our checks; vLLM itself rejects an empty prompt
    requests = [chat_request(0), too_long, empty, chat_request(3)]
    results = by_row(engine.generate(requests))
    assert sorted(results) == [0, 1, 2, 3]
    assert results[0].error is None and len(results[0].samples) == 4
    assert results[3].error is None and len(results[3].samples) == 4
    assert "max_model_len=512" in results[1].error and not results[1].samples
    assert "vLLM rejected the prompt" in results[2].error and not results[2].samples
    # The engine goes on serving after the rejections.
    assert next(iter(engine.generate([chat_request(5)]))).error is None


def test_token_ids_logprobs_and_stop_reasons(engine_for):
    stop_ids = list(range(100, 1000))  # most of the 1024-token vocabulary: samples stop within a few tokens
    engine = engine_for(
        {"sampling": {"ignore_eos": False, "logprobs": True, "return_token_ids": True, "stop_token_ids": stop_ids}}
    )
    results = list(engine.generate([chat_request(i) for i in range(4)]))
    stopped = 0
    for res in results:
        for s in res.samples:
            assert len(s.token_ids) == len(s.logprobs) == s.num_tokens
            assert all(lp <= 0 for lp in s.logprobs)
            assert math.isclose(s.cumulative_logprob, sum(s.logprobs), rel_tol=1e-3, abs_tol=1e-3)
            if s.finish_reason == "stop" and s.stop_reason is not None:
                stopped += 1
                assert int(s.stop_reason) == s.token_ids[-1] and int(s.stop_reason) in stop_ids
    assert stopped > 0

    strings = engine_for({"sampling": {"stop": ["a", "e"], "max_tokens": 64}})
    hits = 0
    for res in strings.generate([chat_request(i) for i in range(4)]):
        for s in res.samples:
            assert "a" not in s.text and "e" not in s.text  # vLLM cuts the text before the stop string
            if s.finish_reason == "stop":
                hits += 1
                assert s.stop_reason in ("a", "e")
    assert hits > 0


def test_backlog_is_bounded_by_the_window(engine_for):
    engine = engine_for({"sampling": {"n": 1, "max_tokens": 4}})
    engine.window = 32
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(200):
            pulled += 1
            yield chat_request(i)

    stream = engine.generate(source())
    first = next(stream)
    assert first.error is None
    assert pulled <= 32  # no more than the window was taken from the shard before results came back
    rest = list(stream)
    assert len(rest) + 1 == 200 and pulled == 200


def test_kv_budget_runs_a_few_prompts_at_a_time_with_the_same_samples(engine_for):
    free = engine_for({"engine": {"kv_budget": None}, "sampling": {"return_token_ids": True}})
    requests = [chat_request(i) for i in range(24)]
    reference = by_row(free.generate(requests))
    cache = free.engine.vllm_config.cache_config
    capacity = cache.num_gpu_blocks * cache.block_size
    # ~600 KV tokens: about three prompts (n=4 x 16 tokens, + a block each, + the prompt) at a time
    tight = engine_for({"engine": {"kv_budget": 600 / capacity}, "sampling": {"return_token_ids": True}})
    got = by_row(tight.generate(requests))
    info = tight.describe()["admission"]
    assert info["held_back"] > 0 and 0 < info["peak_projected_tokens"] <= info["kv_budget_tokens"] <= 600
    assert sorted(got) == list(range(24)) and all(r.error is None for r in got.values())
    assert {row: [s.token_ids for s in r.samples] for row, r in got.items()} == {
        row: [s.token_ids for s in r.samples] for row, r in reference.items()
    }


def test_describe_reports_parallelism_and_start_time(shared_llm):
    info = shared_llm.describe()
    assert info["backend"] == "vllm" and info["vllm"].startswith("0.")
    assert info["tensor_parallel_size"] == 1 and info["pipeline_parallel_size"] == 1
    assert info["engine_start_s"] > 0
    assert info["max_model_len"] == 512 and info["max_num_seqs"] == 64
    assert info["tokenized_prompts"] >= 0


def test_sampling_kwargs_reach_vllm(engine_for):
    """sampling.kwargs passed as is: with EOS all but forced by logit_bias, min_tokens holds it off for 5 tokens."""
    eos = engine_for().renderer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    over = {"ignore_eos": False, "max_tokens": 12, "kwargs": {"logit_bias": {eos: 100.0}}}
    forced = by_row(engine_for({"sampling": over}).generate([chat_request(0)]))[0]
    assert [(s.num_tokens, s.finish_reason) for s in forced.samples] == [(1, "stop")] * 4
    over["kwargs"]["min_tokens"] = 5
    held = by_row(engine_for({"sampling": over}).generate([chat_request(0)]))[0]
    assert [(s.num_tokens, s.finish_reason) for s in held.samples] == [(6, "stop")] * 4


def test_structured_outputs_constrain_and_flag_each_response(engine_for):
    """The run's choice constraint, and a row's own regex and JSON schema, decoded under vLLM's structured outputs."""
    engine = engine_for(
        {"sampling": {"ignore_eos": False, "max_tokens": 48, "structured_outputs": {"choice": ["alpha", "beta"]}}}
    )
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    requests = [
        chat_request(0),
        dataclasses.replace(chat_request(1), structured_outputs={"regex": "[0-9]{3}"}),
        dataclasses.replace(chat_request(2), structured_outputs={"json": schema}),
    ]
    results = by_row(engine.generate(requests))
    assert all(r.error is None for r in results.values())
    assert all(s.text in ("alpha", "beta") and s.schema_valid is True for s in results[0].samples)
    assert all(len(s.text) == 3 and s.text.isdigit() and s.schema_valid is True for s in results[1].samples)
    # a JSON object may be cut by max_tokens: then it is flagged, not dropped
    for s in results[2].samples:
        assert s.schema_valid is (s.finish_reason == "stop"), s.text


def test_lora_adapter_per_request(make_config, gpu_model, tmp_path):
    """A random PEFT adapter for the small model: vLLM starts with enable_lora, the adapter changes the greedy
    samples of the rows that name it, and each result records its adapter."""
    pytest.importorskip("peft")
    from hpcrollout.engines.vllm_engine import VllmEngine
    from hpcrollout.tinymodel import build_tiny_adapter

    adapter = str(build_tiny_adapter(gpu_model, tmp_path / "adapter", rank=8, seed=1))
    greedy = {"n": 1, "temperature": 0.0, "return_token_ids": True}
    engine = VllmEngine(make_config({"data": {"lora_column": "adapter"}, "sampling": greedy}))
    try:
        assert engine.kwargs["enable_lora"] is True
        same = dataclasses.replace(chat_request(0), row=1, uid="u0000-lora", lora=adapter)  # same prompt
        requests = [chat_request(0), same]
        results = by_row(engine.generate(requests))
    finally:
        engine.close()
    assert results[0].error is None and results[1].error is None
    assert (results[0].lora, results[1].lora) == (None, adapter)
    assert results[0].samples[0].token_ids != results[1].samples[0].token_ids


def test_image_prompts_reach_vllm_as_multimodal_data(make_config, tmp_path):
    """A tiny random Qwen2-VL (tinymodel.build_tiny_qwen2_vl: its vision transformer, a Qwen2 decoder with
    M-RoPE, head_dim 64): an image part reaches vLLM as multi-modal data and its merged patches count in
    prompt_tokens as the work estimate (images.ImageTokens) says, the same image from two sources gives the same
    greedy samples, and an image that does not decode is an error row naming it. (Not the LLaVA of the CPU tests:
    vLLM 0.26's LLaVA imports Pixtral classes that transformers 5.17 no longer has.)"""
    import io

    from PIL import Image

    from hpcrollout.engines.base import PromptRequest, prompt_seed
    from hpcrollout.engines.vllm_engine import VllmEngine
    from hpcrollout.images import ImageInput, ImageTokens
    from hpcrollout.tinymodel import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl(tmp_path / "qwen2vl")
    per_image = ImageTokens(str(model))(40, 30) + 2  # the merged patches, between <|vision_start|> and <|vision_end|>
    png = {}
    for name, color in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, "PNG")
        png[name] = buf.getvalue()
    text = {"type": "text", "text": "What is in the picture?"}

    def request(row: int, *images: ImageInput) -> PromptRequest:
        content = [{"type": "image"} for _ in images] + [text] if images else text["text"]
        uid = f"img{row}"
        messages = [{"role": "user", "content": content}]
        return PromptRequest(uid, row, messages, None, prompt_seed(1, uid), images=tuple(images))

    greedy = {"n": 1, "temperature": 0.0, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
    engine = VllmEngine(make_config({"model": {"path": str(model)}, "sampling": greedy}))
    try:
        results = by_row(
            engine.generate(
                [
                    request(0),
                    request(1, ImageInput("/data/red.png", png["red"])),
                    request(2, ImageInput("img[0]", png["red"])),
                    request(3, ImageInput("blue", png["blue"]), ImageInput("red", png["red"])),
                    request(4, ImageInput("/data/broken.png", b"not an image")),
                ]
            )
        )
    finally:
        engine.close()
    assert [results[r].error for r in range(4)] == [None] * 4
    assert per_image == 8  # 40 x 30 pixels raised to min_pixels: 3 x 2 cells of 28 pixels, plus the two markers
    assert results[1].prompt_tokens == results[0].prompt_tokens + per_image
    assert results[3].prompt_tokens == results[0].prompt_tokens + 2 * per_image
    assert results[1].samples[0].token_ids == results[2].samples[0].token_ids
    assert results[4].error.startswith("bad image: row 4, image 0 (/data/broken.png: not a readable image")
