"""Run configuration: one YAML file, dotted overrides, validated once; errors name the dotted key."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcrollout.errors import HpcRolloutError
from hpcrollout.structured import parse_constraint


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """What to read."""

    input: str | None = Field(
        None, description="A Parquet file, a directory of them, or a glob (files read in name order)."
    )
    prompt_column: str = Field("prompt", description="Column holding a list of {role, content} messages, or a string.")
    id_column: str | None = Field(
        None, description="Column with a unique id per row; otherwise ids derive from content and position."
    )
    max_tokens_column: str | None = Field(
        None, description="Column with a per-prompt max_tokens (overrides sampling.max_tokens)."
    )
    max_prompt_chars: int = Field(
        1_000_000, gt=0, description="Longer prompts become error records instead of being sent."
    )
    lora_column: str | None = Field(
        None,
        description="Column with each row's LoRA adapter directory; a null cell takes model.lora (or the base model).",
    )
    image_column: str | None = Field(
        None,
        description=(
            "Column with each row's images (binary, a {bytes, path} struct as Hugging Face datasets store images, "
            "or a list of them), taken in order by the prompt's {type: image} content parts."
        ),
    )
    image_dir: str | None = Field(
        None,
        description=(
            "Directory that relative image paths in image_url parts resolve against; default: the directory of "
            "data.input (a file's parent, a directory input itself, a glob's directory before its first wildcard)."
        ),
    )
    structured_outputs_column: str | None = Field(
        None,
        description=(
            "vLLM backend: column with each row's structured-output constraint (a JSON schema, or a mapping as "
            "sampling.structured_outputs, as JSON text or a struct); a null cell takes sampling.structured_outputs."
        ),
    )


class ModelConfig(_Section):
    """Which model and how prompts are rendered."""

    path: str | None = Field(None, description="Model directory or hub name (no download happens without network).")
    tokenizer: str | None = Field(None, description="Tokenizer path if not the model's.")
    chat_template: str | None = Field(None, description="A Jinja chat template file overriding the tokenizer's.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {enable_thinking: false}.")
    trust_remote_code: bool = False
    lora: str | None = Field(
        None,
        description=(
            "A LoRA adapter directory (PEFT format) applied to every prompt; data.lora_column sets one per row. "
            "vLLM: enable_lora and max_lora_rank are set from the adapters found; transformers: loaded with peft."
        ),
    )


class EngineConfig(_Section):
    """Engine options. vLLM keys pass through to vllm.LLM; `kwargs` carries any other engine arg."""

    tensor_parallel_size: int | None = Field(
        None, ge=1, description="Default: the GPUs SLURM gave the task (1 without SLURM)."
    )
    pipeline_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    enforce_eager: bool = False
    seed: int = 0
    load_format: str | None = Field(None, description="'dummy' gives random weights (benchmarks without a download).")
    kv_budget: float | None = Field(
        1.0,
        gt=0,
        le=4,
        description=(
            "vLLM backend: a prompt is handed to vLLM only while the projected KV-cache usage of everything in "
            "flight (each sample growing to its known or learned length) stays within this fraction of the cache "
            "at every future step, so vLLM need not preempt and recompute; null hands vLLM the whole read-ahead "
            "window at once."
        ),
    )
    pacing: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] | None = Field(
        "auto",
        description=(
            "vLLM backend, with kv_budget: also hand prompts over no faster than the cache can hold them over their "
            "lives (a bucket of KV token-steps, refilled every step), so samples of equal known length start "
            "staggered instead of in waves that all finish at once. The number is the bucket's size in expected "
            "sample lengths; 'auto' (default): 0.1 while every sample's length is known and the same (ignore_eos and "
            "one max_tokens for every prompt read), else off; null: off. See hpcrollout/engines/admission.py."
        ),
    )
    compile_cache: str = Field(
        "shared",
        description=(
            "vLLM backend: where torch.compile artifacts go. 'shared' (default): VLLM_CACHE_ROOT if set, else "
            "vLLM's own ~/.cache/vllm, so every run after the first starts warm; 'run': RUN_DIR/cache/vllm, "
            "private to the run; or a directory (on a filesystem every node sees)."
        ),
    )
    longest_first: bool = Field(
        False,
        description=(
            "vLLM backend: submit the read-ahead prompts with the most expected tokens first (default: input order, "
            "which spreads prompt completions, and so checkpoints, over the run)."
        ),
    )
    device: str = Field("auto", description="transformers backend only: cpu, cuda, or auto.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Any other vLLM engine argument, passed as is.")


# SamplingParams fields hpcrollout sets itself, so sampling.kwargs may not: the reason, for the error.
MANAGED_SAMPLING_FIELDS = {
    "output_kind": "hpcrollout takes one output per prompt, once all its samples are done",
    "flat_logprobs": "hpcrollout chooses the logprobs format (see sampling.logprobs)",
}
# The sampling.kwargs the transformers backend implements (engines/transformers_engine.py); vLLM takes any.
TRANSFORMERS_SAMPLING_KWARGS = (
    "min_tokens",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "include_stop_str_in_output",
)


class SamplingConfig(_Section):
    """How each of the n samples is drawn."""

    n: int = Field(1, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1 (or 0) disables.")
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int = Field(1024, ge=1)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int = Field(0, description="Run seed: each prompt's seed derives from it and the prompt uid.")
    logprobs: bool = Field(False, description="Record each chosen token's logprob and the cumulative logprob.")
    return_token_ids: bool = Field(False, description="Record the generated token ids.")
    skip_special_tokens: bool = True
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Any other vllm.SamplingParams field (min_tokens, bad_words, logit_bias, allowed_token_ids, "
            "include_stop_str_in_output, truncate_prompt_tokens, ...), passed as is; vLLM validates it before the "
            "engine starts. The transformers backend takes only TRANSFORMERS_SAMPLING_KWARGS and refuses the rest."
        ),
    )

    structured_outputs: dict[str, Any] | None = Field(
        None,
        description=(
            "vLLM backend: constrain every response, {json: SCHEMA} | {regex: ...} | {choice: [...]} | "
            "{grammar: ...} (see hpcrollout/structured.py); each response is checked after generation (schema_valid)."
        ),
    )

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if v is None else parse_constraint(v)

    @field_validator("kwargs")
    @classmethod
    def _kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in cls.model_fields:
                raise ValueError(f"{key} has its own key: set sampling.{key} instead")
            if key in MANAGED_SAMPLING_FIELDS:
                raise ValueError(f"{key} cannot be set here: {MANAGED_SAMPLING_FIELDS[key]}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"must be -1 (off) or a positive number, got {v}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ShardingConfig(_Section):
    """How the input is cut into shards (units of work)."""

    num_shards: int | None = Field(
        None,
        ge=1,
        description=(
            "Default: one per task (static; 4 per engine with executor.engines_per_task > 1); dynamic: ~15 per "
            "engine, shrinking toward the end."
        ),
    )
    max_prompts_per_shard: int = Field(
        20_000, ge=1, description="Caps the memory of finishing one shard (its outputs are compacted in memory)."
    )
    mode: Literal["static", "dynamic"] = Field(
        "static", description="static: task i runs its own shards; dynamic: tasks claim shards until none is left."
    )
    lease_seconds: float = Field(120.0, ge=5, description="dynamic: a claim not renewed for this long is taken over.")


class CheckpointConfig(_Section):
    """How often finished results are committed to disk."""

    every_prompts: int = Field(256, ge=1, description="Commit after this many finished prompts...")
    every_seconds: float = Field(60.0, gt=0, description="...or this many seconds, whichever comes first.")
    heartbeat_seconds: float = Field(30.0, gt=0, description="How often a running task reports progress.")


class ExecutorConfig(_Section):
    """Where the array runs."""

    type: Literal["local", "slurm"] = "local"
    num_tasks: int = Field(1, ge=1, description="Array size (tasks run in parallel as far as resources allow).")
    local_parallelism: int = Field(1, ge=1, description="local executor: tasks run at once on this machine.")
    engines_per_task: int | Literal["auto"] = Field(
        1,
        description=(
            "Engine processes per task, each with its own slice of the task's GPUs (CUDA_VISIBLE_DEVICES) and "
            "share of its CPUs; they share the task's shards (static) or claim on their own (dynamic). 'auto': "
            "the task's GPUs / (engine.tensor_parallel_size x engine.pipeline_parallel_size)."
        ),
    )

    @field_validator("engines_per_task")
    @classmethod
    def _engines_per_task(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v


class SlurmConfig(_Section):
    """SLURM resources for each array task."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(240, ge=1, description="Time limit per task, minutes.")
    nodes: int = Field(1, ge=1)
    gpus_per_task: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    constraint: str | None = None
    array_parallelism: int | None = Field(None, ge=1, description="At most this many tasks run at once (%N).")
    exclusive: bool = False
    job_name: str = "hpcrollout"
    additional_parameters: dict[str, Any] = Field(default_factory=dict, description="Extra sbatch parameters.")
    setup: list[str] = Field(default_factory=list, description="Lines run before the task (module load, activate).")
    signal_delay_s: int = Field(120, ge=1, description="Seconds before the time limit at which a task checkpoints.")
    max_requeues: int = Field(3, ge=0, description="Requeues after timeout/preemption before a task is failed.")
    max_retries: int = Field(2, ge=0, description="Automatic resubmissions of a task that raised.")
    ray_timeout_s: int = Field(
        300,
        ge=1,
        description=(
            "nodes > 1: seconds for every node of the task's Ray cluster to join with its GPUs before the task "
            "fails naming the node that did not (raycluster.py)."
        ),
    )


class RunConfig(_Section):
    """A whole run."""

    run_dir: str | None = Field(None, description="Everything about the run lives here (shared filesystem).")
    demo: bool = Field(
        False,
        description=(
            "Build the tiny random-weight model at model.path and the demo prompts at data.input where they do "
            "not exist yet (configs/demo.yaml; no download, no GPU)."
        ),
    )
    backend: Literal["vllm", "transformers"] = "vllm"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.sampling.n > 1 and self.sampling.temperature == 0:
            raise ValueError(
                "sampling.n > 1 with sampling.temperature 0 gives n identical responses; raise the temperature"
            )
        self._check_engines_per_task()
        return self

    def _check_engines_per_task(self) -> None:
        """K engines x tensor x pipeline parallel GPUs must fit the task's GPUs, where the config declares them."""
        k, eng = self.executor.engines_per_task, self.engine
        if k == "auto" or k == 1:
            return
        if self.executor.type == "slurm" and self.slurm.nodes > 1:
            raise ValueError(
                f"executor.engines_per_task {k} needs slurm.nodes 1 (a multi-node task runs one engine across its "
                "nodes); set one of them"
            )
        gpus = self.slurm.gpus_per_task if self.executor.type == "slurm" else 0
        if not gpus:
            return  # not declared (local executor, CPU tasks): checked against the GPUs the task gets
        per_engine = (eng.tensor_parallel_size or 1) * eng.pipeline_parallel_size
        if k * per_engine > gpus:
            raise ValueError(
                f"executor.engines_per_task ({k}) x engine.tensor_parallel_size ({eng.tensor_parallel_size or 1}) "
                f"x engine.pipeline_parallel_size ({eng.pipeline_parallel_size}) = {k * per_engine} GPUs, more than "
                f"slurm.gpus_per_task ({gpus}); lower one of them, or set executor.engines_per_task: auto"
            )

    def uses_structured_outputs(self) -> bool:
        """Whether responses are constrained (and so checked: the schema_valid column)."""
        return self.sampling.structured_outputs is not None or self.data.structured_outputs_column is not None

    def require(self, *dotted: str) -> None:
        """Raise a clear error if any of these dotted keys is unset."""
        missing = [key for key in dotted if get_dotted(self, key) in (None, "")]
        if missing:
            raise HpcRolloutError(
                "config is missing " + ", ".join(missing) + " (set it in the YAML file or with --set KEY=VALUE)"
            )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def generation_fingerprint(self) -> dict[str, str]:
        """Hashes of what decides the samples; a resume with any of these changed is refused."""
        d = self.model_dump(mode="json")
        # Keys added after runs were started enter the hash only when set, so those runs still resume.
        sampling = {k: v for k, v in d["sampling"].items() if not (k in _LATER_SAMPLING_KEYS and not v)}
        parts = {
            "model": {k: v for k, v in d["model"].items() if not (k in _LATER_MODEL_KEYS and v is None)},
            "sampling": sampling,
            "data": {
                k: d["data"][k]
                for k in ("prompt_column", "id_column", "max_tokens_column", "max_prompt_chars", *_LATER_DATA_KEYS)
                if k not in _LATER_DATA_KEYS or d["data"][k] is not None
            },
            "backend": d["backend"],
            "engine": sample_engine_settings(d["engine"]),
        }
        return {k: _digest(v) for k, v in parts.items()}


# sampling keys newer than the fingerprint; hashed only when set (see generation_fingerprint).
_LATER_SAMPLING_KEYS = ("kwargs", "structured_outputs")
_LATER_DATA_KEYS = ("structured_outputs_column", "lora_column", "image_column", "image_dir")
_LATER_MODEL_KEYS = ("lora",)
# Engine keys that change what is sampled (numerics, weights, context): fingerprinted like sampling.*. The other
# engine keys (parallelism, memory, batch sizes, kv_budget, device, ...) are resources and may change on resume.
SAMPLE_ENGINE_KEYS = ("dtype", "quantization", "max_model_len", "kv_cache_dtype", "load_format")
# engine.kwargs that are resources too; every other engine.kwargs key (revision, hf_overrides, rope_scaling,
# tokenizer_mode, speculative_config, ...) may change the model or the samples, so it is fingerprinted.
RESOURCE_ENGINE_KWARGS = frozenset(
    {
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_chunked_prefill",
        "enable_prefix_caching",
        "enforce_eager",
        "swap_space",
        "cpu_offload_gb",
        "block_size",
        "num_gpu_blocks_override",
        "kv_cache_memory_bytes",
        "max_seq_len_to_capture",
        "compilation_config",
        "distributed_executor_backend",
        "disable_custom_all_reduce",
        "disable_log_stats",
        "max_parallel_loading_workers",
        "async_scheduling",
        "seed",
    }
)


def sample_engine_settings(engine: dict[str, Any]) -> dict[str, Any]:
    """The engine settings (of a dumped engine section) that change the samples: SAMPLE_ENGINE_KEYS and the
    engine.kwargs that are not resources."""
    out = {k: engine.get(k) for k in SAMPLE_ENGINE_KEYS}
    out.update(
        {f"kwargs.{k}": v for k, v in sorted((engine.get("kwargs") or {}).items()) if k not in RESOURCE_ENGINE_KWARGS}
    )
    return out


def exact_budgets(config: RunConfig) -> bool:
    """Whether the token budgets are what the run will generate (sampling.ignore_eos, or per-prompt max_tokens in
    data.max_tokens_column), so an ETA is tokens left / tokens per second; else prompts left / prompts per second."""
    return config.sampling.ignore_eos or config.data.max_tokens_column is not None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def add_override_arg(
    parser: Any, help: str = "set any config key, e.g. --set sampling.temperature=0.7 (repeatable)"
) -> None:
    """The one `--set KEY=VALUE` option every command that reads a config takes (values parsed as YAML)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating levels as needed."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise HpcRolloutError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``sampling.temperature=0.7`` -> ("sampling.temperature", 0.7); values are parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise HpcRolloutError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sampling.temperature=0.7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise HpcRolloutError(f"--set {key}: cannot parse {raw!r} as a value: {exc}") from None
    return key.strip(), value


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] != "missing" and err["loc"]:  # not the whole tree for a top-level check
            msg = f"{msg}, got {err['input']!r}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def build_config(tree: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise HpcRolloutError(format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HpcRolloutError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise HpcRolloutError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise HpcRolloutError(f"config file {path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """YAML file (optional), then ``base`` keys, then dotted ``--set`` overrides; validated once.

    Relative paths in the file resolve against the file's directory, so a config runs the same from any working
    directory; relative paths given on the command line (``base``, ``--set``) resolve against the working
    directory, as a shell user expects. The resolved config holds absolute paths.
    """
    tree: dict[str, Any] = read_yaml(path) if path else {}
    source = str(path) if path else "command line"
    if path:
        _resolve_paths(tree, Path(path).resolve().parent)
    given: dict[str, Any] = {}
    for key, value in (base or {}).items():
        set_dotted(tree, key, value)
        set_dotted(given, key, value)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
        set_dotted(given, key, value)
    _resolve_paths(given, Path.cwd())
    for section, key in PATH_KEYS:  # the command line's values, now resolved, over the file's
        node = given.get(section) if section else given
        if isinstance(node, dict) and key in node:
            set_dotted(tree, f"{section}.{key}" if section else key, node[key])
    return build_config(tree, source)


PATH_KEYS = (
    ("data", "input"),
    ("model", "path"),
    ("model", "tokenizer"),
    ("model", "chat_template"),
    ("model", "lora"),
    ("data", "image_dir"),
    (None, "run_dir"),
)
# A model or tokenizer given as a hub name ("Qwen/Qwen3-4B", "gpt2") rather than a directory.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_name(value: str) -> bool:
    """True for what can only be a hub repo id and is no path here: "org/name" or "name", not existing locally."""
    return bool(_HUB_NAME.fullmatch(value)) and not Path(value).exists()


def _resolve_paths(tree: dict[str, Any], here: Path) -> None:
    """$VARS and ~ expand in paths, and relative paths are taken relative to ``here``; hub names stay as they are."""
    for section, key in PATH_KEYS:
        node = tree.get(section) if section else tree
        if not isinstance(node, dict) or not isinstance(node.get(key), str) or not node[key]:
            continue
        value = os.path.expanduser(os.path.expandvars(node[key]))
        hub = section == "model" and key in ("path", "tokenizer") and _HUB_NAME.fullmatch(value)
        if hub and not (here / value).exists():
            node[key] = value
            continue
        node[key] = value if Path(value).is_absolute() else os.path.normpath(here / value)


def check_paths(config: RunConfig) -> None:
    """Fail now, naming the key, if the model, tokenizer or chat template path does not exist.

    Called before a run directory is created (submit, run, dry run) and again where the engine starts (a compute
    node may not see a path the login node sees). A hub name is left to the engine, which may download it.
    """
    mc = config.model
    for key, value in (("model.path", mc.path), ("model.tokenizer", mc.tokenizer)):
        if value and not is_hub_name(value) and not Path(value).exists():
            raise HpcRolloutError(
                f"{key}: {value} does not exist; give a model directory (or a hub name such as Qwen/Qwen3-4B)"
            )
    if mc.chat_template and not Path(mc.chat_template).is_file():
        what = "is a directory" if Path(mc.chat_template).is_dir() else "does not exist"
        raise HpcRolloutError(f"model.chat_template: {mc.chat_template} {what}; give a Jinja template file")
