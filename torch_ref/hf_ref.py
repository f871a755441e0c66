"""Tiny transformers models of the llama family, for parity tests. Never touches the network.

    model = make_tiny_model("qwen2", seed=0)            # a torch PreTrainedModel in eval mode
    path = save_tiny_model("llama", tmp_path / "m")      # config.json + model.safetensors

Weights are redrawn at O(1) scale (transformers' own init, std 0.02, gives near-uniform logits that
would let a wrong model pass): linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights
~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2")
_CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config}
_MODELS = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}
# hidden 64, 4 query heads sharing 2 key/value heads (GQA), 2 layers, vocab 256.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
# Llama 3.1's scaling, with a short original context so that all three frequency bands occur at head_dim 16.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)


def tiny_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny config of `family` ("llama", "mistral", "qwen2"); overrides are config fields."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    kw = dict(TINY)
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    if "rope_scaling" in kw:  # transformers 5 takes rope_parameters; accept the familiar name too
        rope = dict(kw.pop("rope_scaling") or {}) | {"rope_theta": kw.pop("rope_theta", 10000.0)}
        kw["rope_parameters"] = rope
    return _CONFIGS[family](**kw)


@torch.no_grad()
def make_tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> transformers.PreTrainedModel:
    """A randomly initialised tiny model (seeded, deterministic), in eval mode."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = _MODELS[family](config).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied lm_head is the embedding: visited once
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / p.shape[1] ** 0.5)
    return model.to(dtype)


def save_tiny_model(family: str, directory: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> Path:
    """Builds `make_tiny_model(...)` and saves it as a Hugging Face checkpoint directory."""
    model = make_tiny_model(family, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(directory)
    return Path(directory)


def load_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """transformers' AutoModelForCausalLM from a local directory, eval mode, eager attention."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", local_files_only=True
    ).eval()


def disable_avx512_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Switch off bitsandbytes' AVX512-BF16 CPU path on every Linear4bit (spec bnb-4bit.md, "TRAP"):
    on such CPUs an eval forward would repack the weight to bf16 absmax for good and change outputs."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_4bit_config(*, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> transformers.BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig for 4-bit loading (QLoRA's NF4 + double quantization by default)."""
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=compute_dtype)


def load_quantized_model(directory: str | os.PathLike, quantization_config=None,
                         dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """transformers' AutoModelForCausalLM with bitsandbytes 4-bit layers on CPU: a dense checkpoint
    quantized on load (pass `quantization_config`) or a saved bnb checkpoint (None: its config.json's).
    Eval mode, eager attention, AVX512-BF16 path off."""
    kw = {} if quantization_config is None else dict(quantization_config=quantization_config)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", local_files_only=True, device_map="cpu", **kw
    ).eval()
    return disable_avx512_bf16(model)
