"""What the vLLM backend needs from vLLM that may differ between releases, in one place.

The backend is exercised on ``TESTED_VLLM`` (0.26.0) and keeps to vLLM's public API where one exists:
``vllm.LLM``, ``LLMEngine.add_request`` / ``step`` / ``abort_request``, ``SamplingParams``, ``LLM.get_metrics``
and the prompt types of ``vllm.inputs``. ``VllmApi`` is decided once per engine from ``vllm.__version__``
(packaging.version) and, for releases other than the tested ones, from what the installed vLLM has:
- prompts: 0.26 takes token ids in its processed form (``vllm.inputs.tokens_input``) and renders images with
  ``LLM.renderer.render_cmpl`` (vLLM's own offline path) just before ``add_request``, which gives the prompt's
  exact length with the image tokens expanded; where either is missing, the long-standing ``TokensPrompt`` dict
  (``{"prompt_token_ids", "multi_modal_data"}``), which ``add_request`` renders itself;
- ``SamplingParams(flat_logprobs=True)`` where vLLM has that field;
- ``StructuredOutputsParams`` (vllm.sampling_params) for structured outputs, else a clear error.

A few facts have no public accessor, and the backend reads them where 0.26 keeps them (``lookup``): the engine's
max_model_len, max_num_seqs and KV cache size (config objects), and the output processor's per-sample stream
(``output_processor.process_outputs`` / ``request_states``), which feeds the KV admission and the live token
count. Each one, when missing, turns its feature off with one warning (``missing``) rather than failing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hpcrollout")

TESTED_VLLM = ("0.26.0",)
_MISSING = object()
_warned: set[str] = set()


def missing(feature: str, message: str) -> None:
    """Warn once per process that ``feature`` is off because this vLLM lacks what it reads."""
    if feature not in _warned:
        _warned.add(feature)
        log.warning("vLLM compatibility: %s", message)


def lookup(obj: Any, dotted: str, default: Any = _MISSING) -> Any:
    """``obj.a.b.c`` for ``dotted`` "a.b.c", or ``default`` (``MISSING``) where an attribute is absent."""
    for name in dotted.split("."):
        obj = getattr(obj, name, _MISSING)
        if obj is _MISSING:
            return default
    return obj


MISSING = _MISSING


@dataclass(frozen=True)
class VllmApi:
    """The ways this vLLM is driven (see the module docstring)."""

    version: str
    tested: bool
    tokens_input: Any  # vllm.inputs.tokens_input, or None: TokensPrompt dicts
    flat_logprobs: bool

    def token_prompt(self, ids: list[int]) -> Any:
        """A token-id prompt for add_request."""
        if self.tokens_input is not None:
            return self.tokens_input(ids)  # processed form: no second tokenization, no raw-prompt deprecation
        return {"prompt_token_ids": ids}

    def image_prompt(self, llm: Any, ids: list[int], pictures: list[Any], digests: list[str]) -> tuple[Any, int | None]:
        """An image prompt for add_request and its length in tokens (None: known only to vLLM).

        ``ids`` hold one placeholder per image, as the chat template writes it; vLLM's multi-modal processor
        expands them. ``digests`` are the images' content hashes (vLLM's multi_modal_uuids), so vLLM need not
        hash the pixels again."""
        prompt = {
            "prompt_token_ids": ids,
            "multi_modal_data": {"image": pictures},
            "multi_modal_uuids": {"image": digests},
        }
        render = lookup(llm, "renderer.render_cmpl", None)
        if render is None:
            missing(
                "render_cmpl",
                f"vLLM {self.version} has no LLM.renderer.render_cmpl; image prompts go to "
                "add_request as TokensPrompt and their length is checked by vLLM only",
            )
            return prompt, None
        try:
            # skip_mm_cache: the renderer's sender-side cache must mirror the engine core's, and add_request may
            # still refuse this prompt after rendering; the processor-only cache is used instead
            (engine_input,) = render([prompt], skip_mm_cache=True)
        except TypeError:  # a release without skip_mm_cache: render at submission instead (add_request does)
            missing(
                "skip_mm_cache",
                f"vLLM {self.version}: render_cmpl takes no skip_mm_cache; image prompts are rendered by add_request",
            )
            return prompt, None
        return engine_input, len(engine_input["prompt_token_ids"])


def vllm_api(vllm: Any) -> VllmApi:
    """How to drive the installed vLLM; logs the tested versions, and warns (never fails) on another one."""
    from packaging.version import InvalidVersion, Version

    version = str(getattr(vllm, "__version__", "unknown"))
    try:
        release = Version(version).base_version
    except InvalidVersion:
        release = version
    tested = release in TESTED_VLLM
    if tested:
        log.info("vLLM %s (hpcrollout is tested with vLLM %s)", version, ", ".join(TESTED_VLLM))
    else:
        log.warning(
            "vLLM %s is not a version hpcrollout was tested with (%s); it uses vLLM's public API and turns off, "
            "with a warning, what this version lacks",
            version,
            ", ".join(TESTED_VLLM),
        )
    try:
        from vllm.inputs import tokens_input
    except ImportError:
        tokens_input = None
    sampling_params = getattr(vllm, "SamplingParams", None)
    fields = getattr(sampling_params, "__struct_fields__", None)
    flat = tested or fields is None or "flat_logprobs" in fields
    return VllmApi(version=version, tested=tested, tokens_input=tokens_input, flat_logprobs=flat)


def structured_outputs_params(version: str) -> Any:
    """vllm.sampling_params.StructuredOutputsParams, or an error naming the key and the version."""
    from hpcrollout.errors import HpcRolloutError

    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        raise HpcRolloutError(
            f"sampling.structured_outputs / data.structured_outputs_column: vLLM {version} has no "
            "StructuredOutputsParams; use vLLM >= 0.26"
        ) from None
    return StructuredOutputsParams
