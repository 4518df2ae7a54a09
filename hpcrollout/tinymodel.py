"""Build small models and tokenizers offline: for the demo, the tests and the benchmarks (no model hub here).

``build_tiny_model(dir)`` writes a random-weight Qwen3-architecture model (a few hundred KB) with a
byte-level BPE tokenizer and a ChatML chat template, loadable by transformers and vLLM alike.
``build_tiny_adapter(model_dir, dir)`` writes a random LoRA adapter for it (PEFT format; needs peft).
``build_tiny_vlm(dir)`` writes a random-weight vision-language model (LLaVA: a CLIP vision tower and a Llama
decoder) with its processor, for image prompts on both backends; ``build_tiny_qwen2_vl(dir)`` a Qwen2-VL one
(variable image sizes, M-RoPE), which vLLM loads with every transformers release it runs with (its Qwen2-VL
processor needs torchvision).
``build_model_shape(dir, "qwen3-4b")`` writes only config.json + tokenizer of a real model shape, for
vLLM's ``load_format="dummy"`` (random weights, real compute) in throughput benchmarks.

Usage: python -m hpcrollout.tinymodel DIR [--shape qwen3-4b] [--vocab-size N]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    ),
    # vLLM kernels want realistic head sizes; this is the smallest shape that runs there quickly.
    "small": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
    ),
    "qwen3-4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
    ),
}


def _byte_pair_vocab(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A consistent byte-level BPE vocabulary of ``size`` entries: the 256 byte symbols, then merges.

    Pairs of common characters (letters, space, digits) come first, so English text tokenizes sensibly;
    longer tokens are synthesised as needed to reach large vocabularies (e.g. 151,936 for Qwen3 shapes).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    common = [c for c in "Ġetaoinshrdlcumwfgypbvkjxqz" + "ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'" if c in vocab]
    rest = [c for c in alphabet if c not in common]
    level = [*common, *rest]

    def add(a: str, b: str) -> bool:
        tok = a + b
        if tok in vocab:
            return len(vocab) < size
        vocab[tok] = len(vocab)
        merges.append((a, b))
        return len(vocab) < size

    if len(vocab) >= size:
        return vocab, merges
    prev = level
    while True:
        for a, b in itertools.product(prev, level):
            if not add(a, b):
                return vocab, merges
        prev = [t for t in vocab if len(t) == len(prev[0]) + 1]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 1024, model_max_length: int = 4096):
    """A byte-level BPE tokenizer with ChatML specials and chat template, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base_size = vocab_size - len(SPECIAL_TOKENS)
    vocab, merges = _byte_pair_vocab(base_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _qwen3_config(shape: str, tokenizer, vocab_size: int | None) -> dict[str, Any]:
    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size", None) or vocab_size or len(tokenizer)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": max(vocab, len(tokenizer)),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **dims,
    }


def build_model_shape(out_dir: str | Path, shape: str = "qwen3-4b", vocab_size: int | None = None) -> Path:
    """config.json + tokenizer of a model shape, no weights: for vLLM with load_format='dummy'."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    tok_vocab = vocab_size or dims.get("vocab_size", 1024)
    tokenizer = build_tokenizer(out, vocab_size=tok_vocab, model_max_length=dims["max_position_embeddings"])
    cfg = _qwen3_config(shape, tokenizer, tok_vocab)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": cfg["eos_token_id"], "bos_token_id": cfg["bos_token_id"]}, indent=2) + "\n"
    )
    return out


def build_tiny_model(out_dir: str | Path, shape: str = "tiny", vocab_size: int = 1024, seed: int = 0) -> Path:
    """A complete random-weight model directory (weights + tokenizer), loadable by transformers and vLLM."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    out = build_model_shape(out_dir, shape, vocab_size)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    config = Qwen3Config(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out))
    return out


def build_tiny_adapter(model_dir: str | Path, out_dir: str | Path, rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA adapter (PEFT format) for a model built here: attention q/v projections, nonzero B, so it
    changes what the model samples. Needs peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


# The chat template of the tiny VLM: ChatML, an image part becomes the processor's <image> placeholder.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vlm_tokenizer(out: Path, special: list[str], template: str) -> tuple[Any, int, int]:
    """The tiny tokenizer plus a VLM's special tokens and chat template, saved in ``out``; (tokenizer, pad, eos)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))
    return tokenizer, tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")


def _vlm_decoder(tokenizer: Any, pad: int, eos: int, **extra: Any) -> dict[str, Any]:
    """The decoder of the tiny VLMs: the "small" shape (head_dim 64, as vLLM's kernels want), 4096 positions."""
    return dict(
        SHAPES["small"],
        max_position_embeddings=4096,
        vocab_size=len(tokenizer),
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
        **extra,
    )


def _save_vlm(model_class: Any, config: Any, out: Path, seed: int, pad: int, eos: int) -> None:
    """Random weights from ``seed`` and the generation config, into ``out``."""
    import torch

    torch.manual_seed(seed)
    model_class(config).save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": pad}) + "\n")


def build_tiny_vlm(out_dir: str | Path, image_size: int = 56, patch_size: int = 14, seed: int = 0) -> Path:
    """A random-weight LLaVA model (CLIP vision tower, Llama decoder, head_dim 64 in both as vLLM's kernels want)
    with a LlavaProcessor (CLIP image processor, the ChatML tokenizer plus ``<image>``): each image becomes
    (image_size / patch_size)^2 = 16 prompt tokens. About 8 MB; loadable by transformers and vLLM."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir)
    tokenizer, pad, eos = _vlm_tokenizer(out, ["<image>"], VLM_CHAT_TEMPLATE)
    config = LlavaConfig(
        text_config=_vlm_decoder(tokenizer, pad, eos, model_type="llama"),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=128,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    _save_vlm(LlavaForConditionalGeneration, config, out, seed, pad, eos)
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    images.save_pretrained(str(out))  # preprocessor_config.json, which older loaders (and vLLM's) look for
    LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        chat_template=VLM_CHAT_TEMPLATE,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(str(out))
    return out


# The chat template of the tiny Qwen2-VL: ChatML, an image part becomes <|vision_start|><|image_pad|><|vision_end|>
# (the processor then repeats <|image_pad|> once per merged patch).
QWEN2_VL_CHAT_TEMPLATE = VLM_CHAT_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_tiny_qwen2_vl(out_dir: str | Path, patch_size: int = 14, seed: int = 0) -> Path:
    """A random-weight Qwen2-VL model (its own vision transformer with 2x2 patch merging, a Qwen2 decoder with
    M-RoPE, head_dim 64 in both as vLLM's kernels want) with a Qwen2VLProcessor: an image of W x H pixels becomes
    (W' / 28) x (H' / 28) prompt tokens, W' and H' its size rounded to multiples of 28 within [min_pixels,
    max_pixels] (``images.ImageTokens`` computes the same). About 8 MB; loadable by transformers and vLLM,
    the architecture vLLM loads without the Pixtral classes that newer transformers releases dropped."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    try:  # the torchvision-backed processor where torchvision is installed, the PIL one otherwise
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # transformers releases before the PIL/torchvision split
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    out = Path(out_dir)
    tokenizer, pad, eos = _vlm_tokenizer(out, QWEN2_VL_TOKENS, QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_TOKENS}
    text = _vlm_decoder(tokenizer, pad, eos, rms_norm_eps=1e-6)
    # head_dim 64 = hidden 256 / 4 heads; M-RoPE splits its 32 rotary frequencies over time, height, width
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}
    config = Qwen2VLConfig(
        text_config={**text, "rope_parameters": rope, "rope_scaling": {"type": "mrope", **rope}},
        vision_config=dict(
            depth=2,
            embed_dim=128,
            hidden_size=256,  # the merger's output: the decoder's hidden size
            mlp_ratio=2,
            num_heads=2,
            in_channels=3,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    _save_vlm(Qwen2VLForConditionalGeneration, config, out, seed, pad, eos)
    side = 2 * patch_size
    images = ImageProcessor(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, min_pixels=4 * side * side, max_pixels=64 * side * side
    )
    images.save_pretrained(str(out))  # preprocessor_config.json; the tokenizer files hold the chat template
    try:  # the processor also wants its video processor, which needs torchvision (the GPU machine has it, CI not)
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    except (AttributeError, ImportError, ValueError, TypeError):
        video = None  # without it the files above are the whole processor, found by the config's model_type
    if video is not None:
        Qwen2VLProcessor(
            image_processor=images, tokenizer=tokenizer, video_processor=video, chat_template=QWEN2_VL_CHAT_TEMPLATE
        ).save_pretrained(str(out))
    return out


def ensure_model_shape(out_dir: str | Path, shape: str = "qwen3-4b") -> Path:
    """Build a model shape (config + tokenizer, for dummy weights) once; reuse it when it is already there."""
    out = Path(out_dir)
    return out if (out / "config.json").is_file() else build_model_shape(out, shape)


def ensure_tiny_model(out_dir: str | Path, **kwargs: Any) -> Path:
    """Build the tiny model once; reuse it when it is already there."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return build_tiny_model(out, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcrollout.tinymodel", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--config-only", action="store_true", help="no weights (for vLLM load_format=dummy)")
    args = parser.parse_args(argv)
    if args.config_only:
        path = build_model_shape(args.out_dir, args.shape, args.vocab_size)
    else:
        path = build_tiny_model(args.out_dir, args.shape, args.vocab_size or 1024)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
