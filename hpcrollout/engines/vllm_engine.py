"""The vLLM backend: a shard's backlog streamed through vLLM 0.26's LLMEngine, results yielded as they finish.

What may differ between vLLM releases is decided in one place, vllm_compat.py: the tested versions are logged
at engine start, another version is warned about (not refused), and each fact read off vLLM's internals turns
its feature off with one warning where it is missing. Image prompts go to vLLM as multi-modal data (the
images decoded here, one placeholder per image in the token ids, expanded by vLLM's multi-modal processor).

How it keeps the GPU at least as busy as one ``LLM.generate`` call on everything:
- vLLM's engine core runs in its own process and schedules whatever requests it holds. A window of at least
  ``_WINDOW_PROMPTS`` prompts is read ahead (refilled as prompts finish), so the core never runs dry and memory
  stays bounded for 10^5-prompt shards.
- From that window, prompts go to vLLM only while the projected KV-cache peak of everything in flight stays
  within the cache (``engine.kv_budget``, see ``admission.py``), the progress of every sample read from
  vLLM's output stream: vLLM then need not preempt and recompute sequences, which ``LLM.generate`` on
  everything does whenever the samples outgrow the cache, staggered prompts share the cache instead of each
  reserving its largest size, and prompts finish (and are checkpointed) steadily instead of all near the end.
- Prompts are rendered (chat template) and tokenized here in batches, ahead of the engine, and handed over
  as token ids; the time this takes is measured (``describe()["tokenize_s"]``).
- One request per prompt with ``n`` samples (the prompt's KV is shared by prefix caching) and
  ``seed = prompt seed``; vLLM gives child ``i`` the seed ``seed + i`` (v1/engine/parallel_sampling.py,
  ``ParentRequest._get_child_sampling_params``), which is what each sample records.
- A prompt vLLM rejects (too long, empty) becomes an error record for its row; the others go on.

torch.compile artifacts go to ``engine.compile_cache``: by default VLLM_CACHE_ROOT or vLLM's own
``~/.cache/vllm``, shared by every run (a fresh run directory used to mean a cold compile, 20-60 s of each
run's start); ``run`` keeps them in ``RUN_DIR/cache/vllm``. The first task to start a given model/settings compiles under a file
lock; tasks starting meanwhile wait for it and then load its artifacts instead of compiling the same graphs
concurrently into the same files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hpcrollout import raycluster
from hpcrollout.engines import tensor_parallel_size
from hpcrollout.engines.admission import Admission
from hpcrollout.engines.base import NOTHING_NOW, Engine, PromptRequest, PromptResult, Sample
from hpcrollout.engines.render import PromptRenderer
from hpcrollout.engines.vllm_compat import MISSING, lookup, missing, structured_outputs_params, vllm_api
from hpcrollout.errors import HpcRolloutError
from hpcrollout.images import BadImage, ImageTokens, decode_all
from hpcrollout.lora import adapter_rank, uses_lora, vllm_lora_kwargs
from hpcrollout.structured import is_valid

log = logging.getLogger("hpcrollout")

_AUTO_PACING = 0.1  # engine.pacing 'auto' with equal known lengths (benchmarks/admission_bound.py chose it)
_WINDOW_PROMPTS = 1024  # prompts submitted ahead at least; more when 4 * max_num_seqs sequences need more
_TOKENIZE_BATCH = 256  # prompts rendered and tokenized per refill
_LOCK_TIMEOUT_S = 1800.0  # a compile that holds the lock longer than this is presumed dead; start anyway

# Engine options passed to vllm.LLM under the same names (None means: vLLM's default).
_ENGINE_KEYS = (
    "pipeline_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "kv_cache_dtype",
    "dtype",
    "quantization",
    "enforce_eager",
    "seed",
    "load_format",
)


def llm_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments for ``vllm.LLM`` from the config: model, parallelism, engine.*, engine.kwargs."""
    mc, ec = config.model, config.engine
    kwargs: dict[str, Any] = {
        "model": mc.path,
        "tokenizer": mc.tokenizer,
        "trust_remote_code": mc.trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size(config),
    }
    kwargs.update({key: getattr(ec, key) for key in _ENGINE_KEYS})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["disable_log_stats"] = False  # keeps vLLM's counters, read for live throughput (tokens_generated)
    kwargs.update(vllm_lora_kwargs(config))  # model.lora / data.lora_column: sized from the adapters found
    kwargs.update(raycluster.vllm_kwargs(config))  # slurm.nodes > 1: Ray executor, TP per node x PP over nodes
    kwargs.update(ec.kwargs)  # engine.kwargs wins: any EngineArgs field, passed as is
    return kwargs


def sampling_kwargs(config: Any) -> dict[str, Any]:
    """``vllm.SamplingParams`` fields from ``sampling.*`` and ``sampling.kwargs`` (seed and output kind are set
    per request)."""
    sp = config.sampling
    extra = dict(sp.kwargs)
    bias = extra.get("logit_bias")
    if isinstance(bias, dict):
        # The run directory's config is JSON-typed, so token ids come back as strings; the SamplingParams
        # constructor (unlike its from_optional) does not convert them.
        extra["logit_bias"] = {int(t) if str(t).lstrip("-").isdigit() else t: b for t, b in bias.items()}
    return {**listed_sampling_kwargs(config), **extra}


def listed_sampling_kwargs(config: Any) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` fields hpcrollout lists as ``sampling.*`` keys."""
    sp = config.sampling
    return {
        "n": sp.n,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k,
        "min_p": sp.min_p,
        "max_tokens": sp.max_tokens,
        "stop": list(sp.stop),
        "stop_token_ids": list(sp.stop_token_ids),
        "ignore_eos": sp.ignore_eos,
        "repetition_penalty": sp.repetition_penalty,
        "presence_penalty": sp.presence_penalty,
        "frequency_penalty": sp.frequency_penalty,
        "skip_special_tokens": sp.skip_special_tokens,
        # logprobs=0: only the chosen token's logprob; flat lists keep the garbage collector out of the loop.
        "logprobs": 0 if sp.logprobs else None,
        "flat_logprobs": True,
    }


# ---------------------------------------------------------------------------------------------- compile cache
def compile_cache_root(config: Any) -> Path:
    """Where vLLM keeps its torch.compile cache (``engine.compile_cache``; see the module docstring)."""
    choice = config.engine.compile_cache
    if choice == "run" and config.run_dir:
        from hpcrollout.rundir import RunDir

        return RunDir(config.run_dir).vllm_cache_dir
    if choice not in ("shared", "run"):
        return Path(os.path.expandvars(choice)).expanduser()
    if os.environ.get("VLLM_CACHE_ROOT"):
        return Path(os.environ["VLLM_CACHE_ROOT"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "vllm"  # vLLM's own default


def compile_cache_key(kwargs: dict[str, Any]) -> str:
    """What decides the compiled graphs, roughly: model architecture file and engine settings."""
    model_cfg = Path(str(kwargs.get("model", ""))) / "config.json"
    try:
        arch = model_cfg.read_text()
    except OSError:
        arch = str(kwargs.get("model"))
    try:
        import vllm

        version = vllm.__version__
    except ImportError:
        version = "?"
    settings = {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer", "gpu_memory_utilization", "seed")}
    blob = json.dumps([version, arch, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def compile_lock(root: Path | None, key: str, timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """Serialize the first (compiling) start per cache key; later starts find the ready marker and skip the lock.

    Yields facts for describe(): whether the cache was ready, how long this start waited for another's compile.
    A filesystem without working flock degrades to no lock (a warning), never to a failure.
    """
    info: dict[str, Any] = {"root": str(root) if root else None, "key": key, "ready_before": False, "waited_s": 0.0}
    if root is None:
        yield info
        return
    locks = root / "hpcrollout-locks"
    ready = locks / f"{key}.ready"
    if ready.is_file():
        info["ready_before"] = True
        yield info
        return
    locks.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(locks / f"{key}.lock", "a+") as f:
        held = False
        try:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() - started > timeout_s:
                        log.warning("compile cache %s: lock held for over %.0f s; starting without it", root, timeout_s)
                        break
                    time.sleep(1.0)
                except OSError as exc:  # e.g. ENOLCK on a filesystem without locks
                    log.warning("compile cache %s: cannot lock (%s); starting without the lock", root, exc)
                    break
            info["waited_s"] = round(time.monotonic() - started, 3)
            info["ready_before"] = ready.is_file()
            if info["ready_before"] and held:  # another task compiled while this one waited: no need to hold it
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                held = False
            yield info
            if not info["ready_before"]:
                ready.write_text(
                    json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}) + "\n"
                )
        finally:
            if held:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- the engine
class VllmEngine(Engine):
    """vLLM's LLMEngine behind the Engine interface (see the module docstring)."""

    name = "vllm"

    def __init__(self, config: Any, *, llm: Any = None, imported_s: float = 0.0) -> None:
        """Start vLLM for ``config`` (or reuse ``llm``, an already started ``vllm.LLM`` of the same model);
        ``imported_s``: time the caller spent importing vLLM before, counted in ``import_s``."""
        super().__init__(config)
        importing = time.monotonic()
        import vllm
        from vllm import SamplingParams

        self.import_s = imported_s + time.monotonic() - importing

        self._vllm_version = vllm.__version__
        self.api = vllm_api(vllm)  # what differs between vLLM releases (vllm_compat.py); logs the tested versions
        self._SamplingParams = SamplingParams
        from vllm.sampling_params import RequestOutputKind

        config.require("model.path")
        # FINAL_ONLY: one output per prompt, once all its n samples are done (what LLM.generate asks for too).
        self.base_sampling = dict(sampling_kwargs(config), output_kind=RequestOutputKind.FINAL_ONLY)
        # vLLM's own validation, before a minute of engine start, with the config's names in the message: the
        # listed keys first, so an error of sampling.kwargs is told apart from one of sampling.*.
        listed = dict(listed_sampling_kwargs(config), output_kind=RequestOutputKind.FINAL_ONLY)
        if not self.api.flat_logprobs:
            missing(
                "flat_logprobs", f"vLLM {vllm.__version__} has no SamplingParams.flat_logprobs; per-position logprobs"
            )
            self.base_sampling.pop("flat_logprobs", None)
            listed.pop("flat_logprobs", None)
        checks = [("sampling", lambda: listed), ("sampling.kwargs", lambda: self.base_sampling)]
        self._StructuredOutputsParams: Any = None
        if config.uses_structured_outputs():
            StructuredOutputsParams = structured_outputs_params(vllm.__version__)
            self._StructuredOutputsParams = StructuredOutputsParams
            if (constraint := config.sampling.structured_outputs) is not None:
                checks.append(
                    (
                        "sampling.structured_outputs",
                        lambda: {**self.base_sampling, "structured_outputs": StructuredOutputsParams(**constraint)},
                    )
                )
        for key, fields in checks:
            try:
                SamplingParams(**fields())
            except (ValueError, TypeError) as exc:
                raise HpcRolloutError(f"{key}: vLLM {vllm.__version__} rejects these settings: {exc}") from None
        self.kwargs = llm_kwargs(config)
        self._LoRARequest: Any = None
        self._adapters: dict[str, Any] = {}  # adapter path -> its LoRARequest, or why it cannot be used
        if uses_lora(config):
            from vllm.lora.request import LoRARequest

            self._LoRARequest = LoRARequest
        self.cache: dict[str, Any] = {}
        started = time.monotonic()
        if llm is None:
            root = compile_cache_root(config)
            previous = os.environ.get("VLLM_CACHE_ROOT")
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
                os.environ["VLLM_CACHE_ROOT"] = str(root)  # inherited by the engine core process vLLM starts
            try:
                with compile_lock(root, compile_cache_key(self.kwargs)) as self.cache:
                    llm = self._start(vllm)
            finally:  # the engine's processes have their copy; a later engine here may use another run_dir
                if previous is None:
                    os.environ.pop("VLLM_CACHE_ROOT", None)
                else:
                    os.environ["VLLM_CACHE_ROOT"] = previous
        self.engine_start_s = time.monotonic() - started - float(self.cache.get("waited_s", 0.0))
        self.llm = llm
        self.engine = llm.llm_engine
        self.max_model_len, self.max_num_seqs = self._limits()
        self.renderer = PromptRenderer(config, tokenizer=llm.get_tokenizer())
        self._image_tokens = ImageTokens(config.model.path)  # image prompts' length until vLLM renders them
        self._ids = itertools.count()
        self.window = max(_WINDOW_PROMPTS, -(-4 * self.max_num_seqs // config.sampling.n))
        self.admission: Admission | None = None
        self._flight_keys: dict[str, int] = {}  # request id -> admission flight key, while in flight
        self.generated_tokens = 0  # output tokens the engine has generated, counted as they stream
        self._watching = False  # the output-stream hook is installed (_watch_outputs)
        self.output_steps = 0  # engine steps whose outputs went through the hook (raw LLM.chat's included)
        self.preemptions = 0  # vLLM preemptions seen (counted when vLLM's stats are on: disable_log_stats false)
        log.info(
            "vLLM %s ready in %.1f s (max_model_len %d, max_num_seqs %d, compile cache %s)",
            self._vllm_version,
            self.engine_start_s,
            self.max_model_len,
            self.max_num_seqs,
            self.cache.get("root"),
        )

    def _limits(self) -> tuple[int, int]:
        """The engine's max_model_len and max_num_seqs, read from its config objects (no public accessor); where
        this vLLM keeps them elsewhere, the config's values (or no length check here: vLLM's own remains)."""
        ec = self.config.engine
        length = lookup(self.engine, "model_config.max_model_len")
        if length is MISSING:
            length = ec.max_model_len or 2**31
            missing(
                "max_model_len",
                f"vLLM {self._vllm_version}: no LLMEngine.model_config.max_model_len; prompts "
                f"are checked against engine.max_model_len ({ec.max_model_len}) here, and by vLLM",
            )
        seqs = lookup(self.engine, "vllm_config.scheduler_config.max_num_seqs")
        if seqs is MISSING:
            seqs = ec.max_num_seqs or 256
            missing("max_num_seqs", f"vLLM {self._vllm_version}: no scheduler_config.max_num_seqs; assuming {seqs}")
        return int(length), int(seqs)

    def _start(self, vllm: Any) -> Any:
        try:
            return vllm.LLM(**self.kwargs)
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise HpcRolloutError(f"engine.kwargs: vLLM {vllm.__version__} does not accept {exc}") from None
            raise

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.name,
            "vllm": self._vllm_version,
            "vllm_tested": self.api.tested,
            "model": self.config.model.path,
            "tensor_parallel_size": self.kwargs.get("tensor_parallel_size"),
            "pipeline_parallel_size": self.kwargs.get("pipeline_parallel_size", 1),
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "import_s": round(self.import_s, 3),
            "engine_start_s": round(self.engine_start_s, 3),
            "compile_cache": dict(self.cache),
            "tokenize_s": round(self.renderer.tokenize_s, 3),
            "tokenized_prompts": self.renderer.prompts,
        }
        if self.admission is not None:
            info["admission"] = self.admission.describe()
        info["generated_tokens"] = self.generated_tokens
        info["preemptions"] = self.preemptions
        with contextlib.suppress(Exception):  # NVML, no CUDA context in this process
            from vllm.platforms import current_platform

            info["device"] = current_platform.get_device_name()
        return info

    def tokens_generated(self) -> int | None:
        """Generated tokens, requests still running included: counted from vLLM's output stream where the backend
        hooks it (every step's new tokens), else vLLM's own counter (vllm:generation_tokens)."""
        if getattr(self, "_watching", False):
            return self.generated_tokens
        try:
            metrics = self.llm.get_metrics()
        except Exception:  # stats disabled (engine.kwargs) or an older vLLM: the worker counts finished prompts
            return None
        values = [m.value for m in metrics if getattr(m, "name", "") == "vllm:generation_tokens"]
        return int(sum(values)) if values else None

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.engine_core.shutdown()
        self.engine = None
        self.llm = None

    # requests -> vLLM
    def _params(self, request: PromptRequest) -> Any:
        fields = dict(self.base_sampling, seed=request.seed)
        if request.max_tokens is not None:  # data.max_tokens_column: this prompt's own budget
            fields["max_tokens"] = request.max_tokens
        if (constraint := self._constraint(request)) is not None:
            fields["structured_outputs"] = self._StructuredOutputsParams(**constraint)
        return self._SamplingParams(**fields)

    def _constraint(self, request: PromptRequest) -> dict[str, Any] | None:
        """The row's structured-output constraint, else the run's (see hpcrollout/structured.py)."""
        return request.structured_outputs or self.config.sampling.structured_outputs

    def _read_ahead(self, batch: list[PromptRequest], pool: Admission, failed: list[PromptResult]) -> None:
        """Render and tokenize a batch into the lookahead pool; what cannot be submitted becomes an error row.

        An image prompt waits in the pool as token ids with one placeholder per image, its length estimated
        (images.ImageTokens); its pixels are processed only when it is submitted, so the read-ahead window holds
        compressed image bytes, not pixel tensors, and the exact length is checked then."""
        default_max = self.config.sampling.max_tokens
        for request, ids in zip(batch, self.renderer.encode(batch), strict=True):
            if isinstance(ids, str):
                failed.append(PromptResult.failed(request, ids))
                continue
            length = len(ids) + sum(self._image_tokens.of_bytes(i.data) - 1 for i in request.images)
            if length >= self.max_model_len and not request.images:
                failed.append(PromptResult.failed(request, self._too_long(length)))
                continue
            max_tokens = max(1, min(request.max_tokens or default_max, self.max_model_len - length))
            pool.add((request, ids if request.images else self.api.token_prompt(ids)), length, max_tokens)

    def _too_long(self, length: int) -> str:
        return (
            f"prompt has {length} tokens, more than engine.max_model_len={self.max_model_len} allows "
            "(at least one token must be generated); raise engine.max_model_len or shorten the prompt"
        )

    def _image_prompt(self, request: PromptRequest, ids: list[int]) -> tuple[Any, str | None]:
        """An image prompt as vLLM takes it (vllm_compat.VllmApi.image_prompt), or None and why the row cannot
        be submitted (an image that does not decode, vLLM's processor rejecting it, too long once expanded)."""
        if lookup(self.engine, "model_config.is_multimodal_model", True) is False:
            raise HpcRolloutError(
                f"model.path: the input has image prompts, but {self.config.model.path} is a text-only model; "
                "image prompts need a vision-language model"
            )
        try:
            pictures = decode_all(request.images)
        except BadImage as exc:
            return None, f"bad image: row {request.row}, {exc}"
        try:
            prompt, length = self.api.image_prompt(self.llm, ids, pictures, [i.digest for i in request.images])
        except Exception as exc:  # vLLM's multi-modal processor rejected this prompt
            return None, f"vLLM rejected the image prompt: {type(exc).__name__}: {exc}"
        if length is not None and length >= self.max_model_len:
            return None, self._too_long(length)
        return prompt, None

    def _submit(
        self, request: PromptRequest, prompt: Any, key: int, inflight: dict[str, tuple[PromptRequest, int]]
    ) -> PromptResult | None:
        """Hand one prompt (VllmApi.token_prompt / image_prompt) to vLLM; None, or the error record if vLLM
        rejects it."""
        if request.images:  # token ids with placeholders: the images are processed now (see _read_ahead)
            prompt, reason = self._image_prompt(request, prompt)
            if reason is not None:
                return PromptResult.failed(request, reason)
        request_id = f"{request.row}-{next(self._ids)}"
        adapter = request.lora or self.config.model.lora
        lora = self._lora_request(adapter) if adapter else None
        if isinstance(lora, str):
            return PromptResult.failed(request, lora)
        try:
            self.engine.add_request(request_id, prompt, self._params(request), lora_request=lora)
        except Exception as exc:  # vLLM rejected this one prompt (length, vocabulary, parameters)
            return PromptResult.failed(request, f"vLLM rejected the prompt: {type(exc).__name__}: {exc}")
        inflight[request_id] = (request, key)
        self._flight_keys[request_id] = key
        return None

    def _lora_request(self, path: str) -> Any:
        """The adapter's LoRARequest (one id per adapter for the engine's life), or why it cannot be used."""
        if path not in self._adapters:
            try:
                adapter_rank(path)
                self._adapters[path] = self._LoRARequest(
                    lora_name=path, lora_int_id=len(self._adapters) + 1, lora_path=path
                )
            except ValueError as exc:
                self._adapters[path] = str(exc)
        return self._adapters[path]

    def _admission(self) -> Admission:
        sp = self.config.sampling
        cache = lookup(self.engine, "vllm_config.cache_config")
        blocks, block_size = lookup(cache, "num_gpu_blocks", None), lookup(cache, "block_size", None) or 16
        if cache is MISSING or blocks is None:
            missing(
                "kv_budget",
                f"vLLM {self._vllm_version}: the KV cache size is not where 0.26 keeps it "
                "(vllm_config.cache_config.num_gpu_blocks); engine.kv_budget is off, vLLM schedules alone",
            )
        pacing = self.config.engine.pacing
        return Admission(
            capacity_tokens=blocks * block_size if blocks else None,
            fraction=self.config.engine.kv_budget,
            n=sp.n,
            ignore_eos=sp.ignore_eos,
            block_size=block_size,
            prefix_caching=bool(lookup(cache, "enable_prefix_caching", False)),
            max_seqs=self.max_num_seqs,
            longest_first=self.config.engine.longest_first,
            pacing=_AUTO_PACING if pacing == "auto" else pacing,
            pacing_auto=pacing == "auto",  # paced only while every length is known and equal
        )

    # progress, read from the engine's outputs as they stream
    def _watch_outputs(self) -> bool:
        """Hook vLLM's output processor: every step's new tokens per sample reach the admission and the token
        counter, and (with stats on) its preemptions are counted. False where this vLLM has no such hook."""
        processor = getattr(self.engine, "output_processor", None)
        original = getattr(processor, "process_outputs", None)
        states = getattr(processor, "request_states", None)
        if original is None or not isinstance(states, dict):
            self._watching = False
            missing(
                "progress",
                f"vLLM {self._vllm_version}: no LLMEngine.output_processor.process_outputs / "
                "request_states; per-sample progress is off (the KV admission learns from finished prompts "
                "only, live token counts come from vLLM's metrics)",
            )
            return False
        if getattr(original, "_hpcrollout", False):
            self._watching = True
            return True

        def process_outputs(outputs: Any, *args: Any, **kwargs: Any) -> Any:
            self.output_steps += 1
            self._observe(outputs, states)
            result = original(outputs, *args, **kwargs)
            stats = kwargs.get("iteration_stats", args[1] if len(args) > 1 else None)
            self.preemptions += int(getattr(stats, "num_preempted_reqs", 0) or 0)
            return result

        process_outputs._hpcrollout = True  # type: ignore[attr-defined]
        processor.process_outputs = process_outputs  # the instance attribute shadows the method
        self._watching = True
        return True

    def _observe(self, outputs: Any, states: dict[str, Any]) -> None:
        if not self._watching:
            return
        try:
            pool, flights = self.admission, self._flight_keys
            tokens = 0
            for out in outputs:
                new = len(out.new_token_ids)
                tokens += new
                state = states.get(out.request_id)
                if pool is None or state is None:
                    continue
                key = flights.get(state.external_req_id)
                if key is not None:
                    pool.advance(key, state.request_index, new, out.finish_reason is not None)
            self.generated_tokens += tokens
        except AttributeError as exc:  # another vLLM's output or request-state fields: never break its step
            self._watching = False
            missing(
                "progress-fields",
                f"vLLM {self._vllm_version}: its output stream lacks {exc.name or exc}; per-sample progress is off",
            )

    def generate(self, requests: Iterable[PromptRequest]) -> Iterator[PromptResult]:
        source = iter(requests)
        pool = self.admission = self._admission()
        self._watch_outputs()
        inflight: dict[str, tuple[PromptRequest, int]] = {}
        self._flight_keys = {}
        failed: list[PromptResult] = []
        exhausted = False
        size = max(1, min(_TOKENIZE_BATCH, self.window))
        try:
            while True:
                # Read ahead up to the window (until the backlog says NOTHING_NOW: then again after a step) ...
                paused = False
                while not exhausted and not paused and pool.waiting + len(inflight) + size <= self.window:
                    batch: list[PromptRequest] = []
                    for request in source:
                        if request is NOTHING_NOW:
                            paused = True
                            break
                        batch.append(request)
                        if len(batch) == size:
                            break
                    else:
                        exhausted = True
                    self._read_ahead(batch, pool, failed)
                pool.input_done = exhausted
                # ... and submit what the projected KV peak has room for (at most a window in flight).
                while len(inflight) < self.window and (taken := pool.take()) is not None:
                    (request, prompt), key = taken
                    rejected = self._submit(request, prompt, key, inflight)
                    if rejected is not None:
                        pool.done(key)
                        failed.append(rejected)
                while failed:
                    yield failed.pop(0)
                if not inflight:
                    if exhausted and not pool.waiting:
                        return
                    continue
                outputs = self.engine.step()
                pool.stepped()
                if not self._watching:
                    pool.tick()
                self.stepped()
                for output in outputs:
                    if output.finished and output.request_id in inflight:
                        request, key = inflight.pop(output.request_id)
                        self._flight_keys.pop(output.request_id, None)
                        result = self._result(request, output)
                        budget = min(
                            request.max_tokens or self.config.sampling.max_tokens,
                            self.max_model_len - result.prompt_tokens,
                        )
                        pool.done(key, [(s.num_tokens, budget) for s in result.samples])
                        yield result
        finally:
            if inflight:  # generator closed early or an error: leave the engine clean for the next shard
                self.engine.abort_request(list(inflight))
            self._flight_keys = {}

    def _result(self, request: PromptRequest, output: Any) -> PromptResult:
        sp = self.config.sampling
        constraint = self._constraint(request)
        samples = []
        for o in sorted(output.outputs, key=lambda o: o.index):
            token_ids = list(o.token_ids)
            samples.append(
                Sample(
                    text=o.text,
                    num_tokens=len(token_ids),
                    finish_reason=o.finish_reason or "abort",
                    seed=request.seed + o.index,
                    stop_reason=None if o.stop_reason is None else str(o.stop_reason),
                    token_ids=token_ids if sp.return_token_ids else None,
                    logprobs=chosen_logprobs(o.logprobs, token_ids) if sp.logprobs else None,
                    cumulative_logprob=o.cumulative_logprob if sp.logprobs else None,
                    schema_valid=is_valid(constraint, o.text),
                )
            )
        return PromptResult(
            uid=request.uid,
            row=request.row,
            samples=samples,
            prompt_tokens=len(output.prompt_token_ids or ()),
            lora=request.lora or self.config.model.lora,
        )


def chosen_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The logprob of each sampled token, from vLLM's flat or per-position logprobs."""
    if logprobs is None:
        return []
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs: the sampled token comes first at each position
        return [float(logprobs.logprobs[i]) for i in logprobs.start_indices]
    return [float(pos[tok].logprob) for pos, tok in zip(logprobs, token_ids, strict=False)]
