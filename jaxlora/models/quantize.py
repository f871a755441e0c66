"""`quantize_model`: which linear layers of a model become `QuantizedLinear`, and how (a `QuantConfig`).

`QuantConfig` (jaxlora/quant/config.py) maps onto transformers' ``BitsAndBytesConfig`` (``to_hf_dict`` /
``from_hf_dict`` write and read the ``quantization_config`` of a config.json); the same settings drive
quantize-on-load in `jaxlora.models.loading.from_pretrained`. Only ``nnx.Linear`` layers are quantized:
embeddings and norms never are, and `skip_modules` keeps chosen linears dense (lm_head by default, as
transformers).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxlora.graph import replace_module
from jaxlora.models.stack import unstacked
from jaxlora.models.tied import TiedHead
from jaxlora.qlinear import QuantizedLinear
from jaxlora.quant.config import QuantConfig

__all__ = ["QuantConfig", "hf_quantization_config", "quantize_model"]


def _linears(model: nnx.Module) -> list[tuple[tuple, nnx.Linear]]:
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]


def quantize_model(model: nnx.Module, config: QuantConfig) -> nnx.Module:
    """Replaces, IN PLACE, every ``nnx.Linear`` of `model` that `config` targets by a `QuantizedLinear`
    holding its weight quantized in the kernel's dtype (transposed to bitsandbytes' (out, in) layout) and
    its bias. Returns `model` itself, for chaining. Embeddings and norms are left as they are.

    Quantize before injecting adapters: a Linear already wrapped by a LoRA layer is quantized too.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    with unstacked(model):  # per layer: double quantization's offset is per tensor, as bitsandbytes'
        for path, linear in _linears(model):
            if not config.targets(".".join(str(p) for p in path)):
                continue
            replace_module(model, path, QuantizedLinear.from_linear(linear, config))
    return model


def hf_quantization_config(model: nnx.Module) -> dict[str, Any] | None:
    """The ``quantization_config`` describing `model`'s quantized layers (None when it has none):
    quant type, double quantization and compute dtype from the layers, and every dense linear listed
    in ``llm_int8_skip_modules`` so that transformers rebuilds the same split."""
    with unstacked(model):
        return _hf_quantization_config(model)


def _hf_quantization_config(model: nnx.Module) -> dict[str, Any] | None:
    quantized = [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)]
    if not quantized:
        return None
    kinds = {(m.config.quant_type, m.config.double_quant, m.config.compute_dtype.name, m.config.quant_storage)
             for _, m in quantized}
    if len(kinds) != 1:
        raise ValueError(f"quantized layers disagree on (quant_type, double_quant, compute_dtype, quant_storage): "
                         f"{sorted(kinds)}; a transformers checkpoint has one quantization_config")
    if quantized[0][1].config.quant_type == "dynamic8":
        raise ValueError("quant_type='dynamic8' layers have no bitsandbytes checkpoint format (transformers' "
                         "8-bit is LLM.int8); save 'nf4' or 'fp4' models")
    skip = [".".join(str(p) for p in path) for path, _ in _linears(model)]
    # A tied head shares embed_tokens' matrix: it stays dense (and is not an nnx.Linear, so is never quantized).
    skip += [".".join(str(p) for p in path) for path, m in nnx.iter_graph(model) if isinstance(m, TiedHead)]
    return quantized[0][1].config.replace(skip_modules=tuple(skip)).to_hf_dict()
