"""The transformers backend: the same pipeline on CPU (what CI runs) or one GPU, without vLLM.

Each prompt is decoded as one batch of its n samples with a KV cache, every sample drawing from its own
torch.Generator seeded with (prompt seed + sample index). A prompt's samples therefore depend only on the
model, the prompt, the sampling settings and the seed, never on which other prompts ran before it: a killed
and resumed shard reproduces exactly the samples an uninterrupted run would have drawn.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from hpcrollout.config import get_dotted
from hpcrollout.engines import cpu_threads, tensor_parallel_size
from hpcrollout.engines.base import NOTHING_NOW, Engine, PromptRequest, PromptResult, Sample
from hpcrollout.engines.render import PromptRenderer
from hpcrollout.errors import HpcRolloutError

log = logging.getLogger("hpcrollout")


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, config) -> None:
        super().__init__(config)
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        started = time.time()
        for key in ("sampling.structured_outputs", "data.structured_outputs_column"):
            if get_dotted(config, key) is not None:
                raise HpcRolloutError(
                    f"{key}: the transformers backend does not constrain decoding; the vLLM backend has "
                    "structured outputs (backend: vllm)"
                )
        self.torch = torch
        torch.set_num_threads(cpu_threads(config))  # this process's share of the CPUs, not every core
        mc, ec = config.model, config.engine
        device = ec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = {
            "auto": None,
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "half": torch.float16,
            "float": torch.float32,
        }.get(ec.dtype)
        if dtype is None:
            if ec.dtype != "auto":
                raise HpcRolloutError(f"engine.dtype: {ec.dtype!r} is not supported by the transformers backend")
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                mc.tokenizer or mc.path, trust_remote_code=mc.trust_remote_code
            )
            # a vision-language model (a vision_config beside its text config) takes image prompts too
            model_config = AutoConfig.from_pretrained(mc.path, trust_remote_code=mc.trust_remote_code)
            auto = AutoModelForImageTextToText if hasattr(model_config, "vision_config") else AutoModelForCausalLM
            self.model = auto.from_pretrained(mc.path, dtype=dtype, trust_remote_code=mc.trust_remote_code)
        except (OSError, ValueError) as exc:  # ValueError: the hub's "Repo id must be in the form ..."
            raise HpcRolloutError(f"model.path: cannot load {mc.path!r}: {exc}") from None
        self.model.to(self.device).eval()
        self.base_model = self.model
        self._adapters: dict[str, str | None] = {}  # adapter path -> peft adapter name, or why it cannot be used
        if mc.lora:
            reason = self._load_adapter(mc.lora)
            if reason is not None:
                raise HpcRolloutError(f"model.lora: {reason}")
        self.renderer = PromptRenderer(config, tokenizer=self.tokenizer)
        text_config = self.model.config.get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        self.max_model_len = ec.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
        self._processor: Any = None  # the model's processor, loaded on the first image prompt
        eos = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(source)
        self.eos_ids = eos
        self.stop_ids = set(config.sampling.stop_token_ids)
        self.extra = SamplingExtras(config.sampling, self.tokenizer, self.vocab_size)
        # transformers 5.2x renamed past_key_values to cache; older releases only know the old name
        self._cache_arg = "cache" if "cache" in inspect.signature(self.base_model.forward).parameters else "past_key_values"
        self.start_s = time.time() - started
        self.generated = 0  # tokens decoded so far, counted per step (read by the worker for live throughput)
        self._versions = {"transformers": transformers.__version__, "torch": torch.__version__}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "tensor_parallel_size": tensor_parallel_size(self.config),
            "engine_start_s": round(self.start_s, 3),
            "cpu_threads": self.torch.get_num_threads(),
            **self._versions,
        }

    def close(self) -> None:
        self.model = self.base_model = None

    def tokens_generated(self) -> int:
        return self.generated

    def generate(self, requests: Iterable[PromptRequest]) -> Iterator[PromptResult]:
        for request in requests:
            if request is NOTHING_NOW:  # nothing to read ahead: this engine holds no request between pulls
                continue
            vision: dict[str, Any] = {}
            if request.images:  # chat template, then the processor: image tokens expanded, pixel inputs
                ids, vision = self._encode_images(request)
            else:
                (ids,) = self.renderer.encode([request])  # the same rendering as the vLLM backend's
            if isinstance(ids, str):  # a template that rejects this conversation fails the row, not the shard
                yield PromptResult.failed(request, ids)
                continue
            if len(ids) >= self.max_model_len:
                yield PromptResult.failed(
                    request, f"prompt has {len(ids)} tokens, more than max_model_len={self.max_model_len} allows"
                )
                continue
            lora = request.lora or self.config.model.lora
            reason = self._use_adapter(lora)
            if reason is not None:
                yield PromptResult.failed(request, reason)
                continue
            result = self._sample(request, ids, vision)
            result.lora = lora
            yield result

    # LoRA adapters (hpcrollout/lora.py), loaded with peft on first use; the base model is the adapters disabled
    def _load_adapter(self, path: str) -> str | None:
        """Load an adapter once; None, or why it cannot be used (its rows become error records)."""
        if path in self._adapters:
            return None if self._adapters[path] is not None else f"LoRA adapter {path}: failed to load before"
        from hpcrollout.lora import adapter_rank

        try:
            adapter_rank(path)
            from peft import PeftModel
        except ValueError as exc:
            self._adapters[path] = None
            return str(exc)
        except ImportError:
            raise HpcRolloutError(
                "model.lora / data.lora_column: the transformers backend needs peft for LoRA adapters "
                "(pip install peft), or use the vLLM backend (backend: vllm)"
            ) from None
        name = f"a{len(self._adapters)}"
        try:
            if self.model is self.base_model:
                self.model = PeftModel.from_pretrained(self.base_model, path, adapter_name=name).to(self.device).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
                self.model.to(self.device)
        except Exception as exc:  # a damaged or mismatched adapter fails its rows, not the run
            self._adapters[path] = None
            return f"LoRA adapter {path}: cannot load it onto {self.config.model.path}: {type(exc).__name__}: {exc}"
        self._adapters[path] = name
        return None

    def _use_adapter(self, path: str | None) -> str | None:
        """Make ``path`` (None: no adapter) the active one for the next prompt; None, or why it cannot be."""
        if path is not None:
            reason = self._load_adapter(path)
            if reason is not None:
                return reason
        if self.model is self.base_model:
            return None
        if path is None:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(self._adapters[path])
        return None

    def _encode_images(self, request: PromptRequest) -> tuple[list[int] | str, dict[str, Any]]:
        """Prompt ids with the image tokens expanded and the model's pixel inputs, through the model's processor;
        or why this row cannot be rendered (an image that does not decode, a template without image parts)."""
        from hpcrollout.images import BadImage, decode_all

        if self._processor is None:
            from transformers import AutoProcessor

            mc = self.config.model
            if not hasattr(self.model.config, "vision_config"):
                raise HpcRolloutError(
                    f"model.path: the input has image prompts, but {mc.path} is a text-only model; "
                    "image prompts need a vision-language model"
                )
            try:
                self._processor = AutoProcessor.from_pretrained(mc.path, trust_remote_code=mc.trust_remote_code)
            except (OSError, ValueError, TypeError) as exc:
                raise HpcRolloutError(
                    f"model.path: the input has image prompts, but no processor loads from {mc.path!r} ({exc}); "
                    "image prompts need a vision-language model with its processor config"
                ) from None
            if not hasattr(self._processor, "image_processor"):
                raise HpcRolloutError(
                    f"model.path: the input has image prompts, but {mc.path} has no image processor; "
                    "image prompts need a vision-language model"
                )
        try:
            pictures = decode_all(request.images)
        except BadImage as exc:
            return f"bad image: row {request.row}, {exc}", {}
        try:
            text = self.renderer.render(request.messages or [])
            encoded = self._processor(text=[text], images=pictures, return_tensors="pt")
        except HpcRolloutError:
            raise
        except Exception as exc:  # the template or processor rejects this prompt: its row fails, not the shard
            return f"image prompt failed in the processor: {type(exc).__name__}: {exc}", {}
        ids = encoded["input_ids"][0].tolist()
        vision = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
        return ids, vision

    def _sample(
        self, request: PromptRequest, prompt_ids: list[int], vision: dict[str, Any] | None = None
    ) -> PromptResult:
        torch = self.torch
        sp = self.config.sampling
        n = sp.n
        budget = min(request.max_tokens or sp.max_tokens, self.max_model_len - len(prompt_ids))
        gens = [torch.Generator().manual_seed(request.seed + i) for i in range(n)]
        prompt = torch.tensor([prompt_ids] * n, dtype=torch.long, device=self.device)
        generated: list[list[int]] = [[] for _ in range(n)]
        chosen_logprobs: list[list[float]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        stop_reason: list[str | None] = [None] * n
        texts: list[str | None] = [None] * n  # set when a stop string cut the text
        counts = torch.zeros((n, self.vocab_size), dtype=torch.float32)
        seen = torch.zeros_like(counts, dtype=torch.bool)
        seen[:, torch.tensor(prompt_ids)] = True
        past, step_input = None, prompt
        with torch.inference_mode():
            for _ in range(budget):
                self.stepped()
                # the first step also takes the images, once per sample (each sample is a row of the batch)
                first = {}
                if past is None and vision:
                    first = {k: torch.cat([v] * n).to(self.device) for k, v in vision.items()}
                out = self.model(
                    input_ids=step_input, use_cache=True, logits_to_keep=1, **first, **{self._cache_arg: past}
                )
                past = getattr(out, self._cache_arg)
                logits = out.logits[:, -1, :].float().cpu()
                logits = self.extra.constrain(logits, generated, self.eos_ids | self.stop_ids)
                raw_logprobs = torch.log_softmax(logits, dim=-1) if sp.logprobs else None
                tokens = self._choose(self._process(logits, counts, seen), gens)
                for i, tok in enumerate(tokens):
                    if finish[i] is not None:
                        continue
                    generated[i].append(tok)
                    self.generated += 1
                    if raw_logprobs is not None:
                        chosen_logprobs[i].append(float(raw_logprobs[i, tok]))
                    counts[i, tok] += 1
                    seen[i, tok] = True
                    if not sp.ignore_eos and tok in self.eos_ids:
                        finish[i] = "stop"
                    elif tok in self.stop_ids:
                        finish[i], stop_reason[i] = "stop", str(tok)
                    elif sp.stop and len(generated[i]) > self.extra.min_tokens:  # vLLM: not within min_tokens
                        text = self._decode(generated[i])
                        hit = min(((text.find(s), s) for s in sp.stop if s in text), default=None)
                        if hit is not None:
                            end = hit[0] + len(hit[1]) * self.extra.include_stop_str
                            finish[i], stop_reason[i], texts[i] = "stop", hit[1], text[:end]
                if all(f is not None for f in finish):
                    break
                step_input = torch.tensor(
                    [[g[-1] if g else 0] for g in generated], dtype=torch.long, device=self.device
                )
        samples = []
        for i in range(n):
            reason = finish[i] or "length"
            text = texts[i]
            if text is None:
                ended_by_token = reason == "stop" and generated[i] and generated[i][-1] in self.eos_ids | self.stop_ids
                text = self._decode(generated[i][:-1] if ended_by_token else generated[i])
            samples.append(
                Sample(
                    text=text,
                    num_tokens=len(generated[i]),
                    finish_reason=reason,
                    stop_reason=stop_reason[i],
                    seed=request.seed + i,
                    token_ids=list(generated[i]) if sp.return_token_ids else None,
                    logprobs=chosen_logprobs[i] if sp.logprobs else None,
                    cumulative_logprob=sum(chosen_logprobs[i]) if sp.logprobs else None,
                )
            )
        return PromptResult(uid=request.uid, row=request.row, samples=samples, prompt_tokens=len(prompt_ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.config.sampling.skip_special_tokens)

    def _process(self, logits, counts, seen):
        """Penalties, temperature, top-k, top-p, min-p: the same order and meaning as vLLM's sampler."""
        torch = self.torch
        sp = self.config.sampling
        if sp.repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / sp.repetition_penalty, logits * sp.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if sp.frequency_penalty:
            logits = logits - sp.frequency_penalty * counts
        if sp.presence_penalty:
            logits = logits - sp.presence_penalty * (counts > 0).float()
        if sp.temperature == 0:
            return logits  # greedy: argmax below
        logits = logits / sp.temperature
        if sp.top_k and sp.top_k > 0 and sp.top_k < logits.shape[-1]:
            kth = torch.topk(logits, sp.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(dim=-1) - probs > sp.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        if sp.min_p > 0:
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < sp.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        return logits

    def _choose(self, logits, gens) -> list[int]:
        torch = self.torch
        if self.config.sampling.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits, dim=-1)
        return [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in enumerate(gens)]


class SamplingExtras:
    """The ``sampling.kwargs`` this backend implements (config.TRANSFORMERS_SAMPLING_KWARGS), with vLLM's meaning.

    Applied to the raw logits before penalties and temperature, as vLLM's sampler applies its logits
    processors: ``allowed_token_ids`` keeps only those tokens, ``logit_bias`` adds to a token's logit (clamped
    to [-100, 100] as vLLM does), ``min_tokens`` bans EOS and the stop tokens (and defers stop strings) until
    that many tokens are out, ``bad_words`` bans the last token of each word's token sequence (with and
    without a leading space) whenever the output so far ends with the rest of it. Any other key is refused
    here, at load time.
    """

    def __init__(self, sp: Any, tokenizer: Any, vocab_size: int) -> None:
        from hpcrollout.config import TRANSFORMERS_SAMPLING_KWARGS

        kw = dict(sp.kwargs)
        for key in kw:
            if key not in TRANSFORMERS_SAMPLING_KWARGS:
                raise HpcRolloutError(
                    f"sampling.kwargs.{key}: the transformers backend does not support it (it takes "
                    f"{', '.join(TRANSFORMERS_SAMPLING_KWARGS)}); the vLLM backend has it (backend: vllm)"
                )
        self.min_tokens = _int_key(kw.get("min_tokens", 0) or 0, "min_tokens", 0, sp.max_tokens)
        self.include_stop_str = bool(kw.get("include_stop_str_in_output", False))
        bias = kw.get("logit_bias") or {}
        if not isinstance(bias, dict):
            raise HpcRolloutError(f"sampling.kwargs.logit_bias: expected a mapping token id -> bias, got {bias!r}")
        self.bias = {
            _int_key(t, "logit_bias", 0, vocab_size - 1): min(100.0, max(-100.0, float(b))) for t, b in bias.items()
        }
        allowed = kw.get("allowed_token_ids")
        if allowed is not None and (not isinstance(allowed, list) or not allowed):
            raise HpcRolloutError(f"sampling.kwargs.allowed_token_ids: expected a non-empty list, got {allowed!r}")
        self.allowed = [_int_key(t, "allowed_token_ids", 0, vocab_size - 1) for t in allowed or []]
        self.bad_words: list[list[int]] = []
        for word in kw.get("bad_words") or []:
            if not isinstance(word, str) or not word.strip():
                raise HpcRolloutError(f"sampling.kwargs.bad_words: expected non-empty strings, got {word!r}")
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            self.bad_words.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):  # the same rule as vLLM's update_from_tokenizer
                self.bad_words.append(spaced)
        self.active = bool(self.min_tokens or self.bias or self.allowed or self.bad_words)

    def constrain(self, logits: Any, generated: list[list[int]], stop_ids: set[int]) -> Any:
        """The logits of each of the n samples, with the constraints applied (``generated``: tokens so far)."""
        if not self.active:
            return logits
        import torch

        if self.allowed:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
            keep[self.allowed] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        for token, bias in self.bias.items():
            logits[:, token] += bias
        for i, tokens in enumerate(generated):
            if len(tokens) < self.min_tokens and stop_ids:
                logits[i, sorted(t for t in stop_ids if t < logits.shape[-1])] = float("-inf")
            for word in self.bad_words:
                prefix = len(word) - 1
                if prefix == 0 or (len(tokens) >= prefix and tokens[len(tokens) - prefix :] == word[:-1]):
                    logits[i, word[-1]] = float("-inf")
        return logits


def _int_key(value: Any, key: str, low: int, high: int) -> int:
    """An integer in [low, high] from sampling.kwargs.KEY (YAML may give a token id as a string)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not low <= number <= high:
        raise HpcRolloutError(f"sampling.kwargs.{key}: expected an integer in [{low}, {high}], got {value!r}")
    return number
