"""`QuantConfig` and `quantize_model`: which linear layers of a model become `QuantizedLinear`, and how.

`QuantConfig` maps onto transformers' ``BitsAndBytesConfig`` (``to_hf_dict`` / ``from_hf_dict`` write and
read the ``quantization_config`` of a config.json); the same settings drive quantize-on-load in
`jaxlora.models.loading.from_pretrained`. Only ``nnx.Linear`` layers are quantized: embeddings and
norms never are, and `skip_modules` keeps chosen linears dense (lm_head by default, as transformers).

>>> QuantConfig(quant_type="fp4", double_quant=False).to_hf_dict()["bnb_4bit_quant_type"]
'fp4'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import platform
from jaxlora.graph import replace_module
from jaxlora.models.stack import unstacked
from jaxlora.qlinear import QuantizedLinear
from jaxlora.quant import quantize_4bit, quantize_blockwise
from jaxlora.quant.validate import BACKENDS
from jaxlora.quant.tensor import BLOCKSIZES, QUANT_STORAGES, QUANT_TYPES, QuantizedTensor

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize a model's linear layers; field by field transformers' ``BitsAndBytesConfig``."""

    # bnb_4bit_quant_type: "nf4" | "fp4"; "dynamic8" is bitsandbytes' 8-bit blockwise map (jaxlora only:
    # transformers' 8-bit is LLM.int8, another format, so a dynamic8 model has no HF checkpoint form).
    quant_type: Literal["nf4", "fp4", "dynamic8"] = "nf4"
    # bnb_4bit_use_double_quant: absmax 8-bit quantized in blocks of 256 (QLoRA's recipe; 4-bit only).
    double_quant: bool = True
    # bitsandbytes' blocksize (Linear4bit and transformers always use 64).
    blocksize: int = 64
    # bnb_4bit_compute_dtype: the dtype of the dequantized weight and the matmul.
    compute_dtype: Any = jnp.bfloat16
    # llm_int8_skip_modules: module names kept dense, matched as transformers matches them (a prefix at
    # a module boundary, a regex, or a suffix: "lm_head", "layers.0", r"layers\.\d+\.mlp", "down_proj").
    skip_modules: tuple[str, ...] = ("lm_head",)
    # Which bitsandbytes backend's bytes to reproduce where CPU and CUDA kernels differ (quantize_4bit).
    # None: the platform's (jaxlora.platform): "cuda" when the weights are quantized on a GPU, else "cpu".
    bnb_backend: Literal["cpu", "cuda"] | None = None
    # Run the quantized layers' matmuls in the fused Pallas kernels where they support the case (jaxlora
    # only; no BitsAndBytesConfig field). None: the platform's default (jaxlora.platform), on for a GPU.
    use_kernel: bool | None = None
    # bnb_4bit_quant_storage: the dtype the packed bytes are viewed as in checkpoints (FSDP-QLoRA uses the
    # model's float dtype); the bytes, and so the numbers, are the same for every choice.
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantConfig.double_quant must be a bool, got {self.double_quant!r}")
        if self.double_quant and self.quant_type == "dynamic8":
            raise ValueError("QuantConfig.double_quant=True is 4-bit only (bitsandbytes nests absmax of 4-bit "
                             "weights); pass double_quant=False with quant_type='dynamic8'")
        blocksize = self.blocksize
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantConfig.blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        try:
            cd = np.dtype(self.compute_dtype)
        except TypeError:
            cd = None
        if cd not in COMPUTE_DTYPES:
            raise ValueError(f"QuantConfig.compute_dtype must be one of {[d.name for d in COMPUTE_DTYPES]}, "
                             f"got {self.compute_dtype!r}")
        object.__setattr__(self, "compute_dtype", cd)
        skip = self.skip_modules
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"QuantConfig.skip_modules must be a sequence of module names, got {skip!r}")
        object.__setattr__(self, "skip_modules", tuple(skip))
        resolved = platform.defaults()
        if self.bnb_backend is None:
            object.__setattr__(self, "bnb_backend", resolved.bnb_backend)
        if self.use_kernel is None:
            object.__setattr__(self, "use_kernel", resolved.use_kernel)
        if not isinstance(self.use_kernel, bool):
            raise ValueError(f"QuantConfig.use_kernel must be a bool or None, got {self.use_kernel!r}")
        if self.bnb_backend not in BACKENDS:
            raise ValueError(f"QuantConfig.bnb_backend must be one of {BACKENDS}, got {self.bnb_backend!r}")
        storage = getattr(self.quant_storage, "name", self.quant_storage)  # a numpy / jnp dtype, or its name
        if storage not in QUANT_STORAGES or (storage != "uint8" and self.quant_type == "dynamic8"):
            raise ValueError(f"QuantConfig.quant_storage must be one of {QUANT_STORAGES} ('uint8' for "
                             f"quant_type='dynamic8'), got {self.quant_storage!r}")
        object.__setattr__(self, "quant_storage", storage)

    def quantize(self, w: jax.Array) -> QuantizedTensor:
        """One dense ``(out, in)`` weight, in its own dtype (which the QuantizedTensor records)."""
        if self.quant_type == "dynamic8":
            return quantize_blockwise(w, blocksize=self.blocksize, bnb_backend=self.bnb_backend)
        return quantize_4bit(w, blocksize=self.blocksize, quant_type=self.quant_type,
                             compress_statistics=self.double_quant, bnb_backend=self.bnb_backend,
                             quant_storage=self.quant_storage)

    def targets(self, name: str) -> bool:
        """Whether the linear layer at module path `name` ("model.layers.0.mlp.up_proj") is quantized.

        transformers' quantizers_utils.should_convert_module: a pattern skips `name` when it matches
        from the start up to a module boundary (also as a regex), or is a suffix of it.
        """
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in self.skip_modules)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` transformers writes for this ``BitsAndBytesConfig`` (same keys)."""
        if self.quant_type == "dynamic8":
            raise ValueError("quant_type='dynamic8' has no transformers quantization_config (its 8-bit "
                             "format is LLM.int8); only 'nf4' and 'fp4' models can be saved for transformers")
        return {
            "quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True,
            "llm_int8_threshold": 6.0, "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": self.compute_dtype.name, "bnb_4bit_quant_storage": self.quant_storage,
            "load_in_4bit": True, "load_in_8bit": False,
        }  # fmt: skip

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> QuantConfig:
        """Reads a config.json ``quantization_config``; raises ValueError naming any value jaxlora cannot
        read (another quant_method, LLM.int8, an unknown quant_storage). `overrides` replace fields
        (e.g. ``bnb_backend``)."""
        method = d.get("quant_method")
        if method != "bitsandbytes":
            raise ValueError(f"quantization_config.quant_method {method!r} is not supported; jaxlora reads "
                             "quant_method 'bitsandbytes' with load_in_4bit (nf4 / fp4)")
        if d.get("load_in_8bit") or d.get("_load_in_8bit"):
            raise ValueError("quantization_config.load_in_8bit=True (bitsandbytes LLM.int8) is not supported; "
                             "jaxlora reads bitsandbytes 4-bit checkpoints (load_in_4bit, nf4 / fp4)")
        if not (d.get("load_in_4bit") or d.get("_load_in_4bit")):
            raise ValueError("quantization_config has neither load_in_4bit nor load_in_8bit set; jaxlora reads "
                             "bitsandbytes 4-bit checkpoints (load_in_4bit=True)")
        quant_type = d.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quantization_config.bnb_4bit_quant_type {quant_type!r} is not supported; "
                             "supported: 'nf4', 'fp4'")
        storage = d.get("bnb_4bit_quant_storage") or "uint8"
        if storage not in QUANT_STORAGES:
            raise ValueError(f"quantization_config.bnb_4bit_quant_storage {storage!r} is not supported; "
                             f"supported: {', '.join(map(repr, QUANT_STORAGES))}")
        skip = d.get("llm_int8_skip_modules")
        kw = dict(
            quant_type=quant_type,
            double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=d.get("bnb_4bit_compute_dtype") or "float32",  # BitsAndBytesConfig: None -> fp32
            skip_modules=("lm_head",) if skip is None else tuple(skip),
            quant_storage=storage,
        )
        try:
            return cls(**(kw | overrides))
        except ValueError as e:
            raise ValueError(f"quantization_config: {e}") from None


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
            bias = None if linear.bias is None else linear.bias.get_value()
            qlinear = QuantizedLinear(config.quantize(jnp.asarray(linear.kernel.get_value()).T), bias,
                                      compute_dtype=config.compute_dtype, use_kernel=config.use_kernel)
            replace_module(model, path, qlinear)
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
    kinds = {(m.weight.get_value().quant_type, m.weight.get_value().double_quant, m.compute_dtype.name,
              m.weight.get_value().quant_storage) for _, m in quantized}
    if len(kinds) != 1:
        raise ValueError(f"quantized layers disagree on (quant_type, double_quant, compute_dtype, quant_storage): "
                         f"{sorted(kinds)}; a transformers checkpoint has one quantization_config")
    (quant_type, double_quant, compute_dtype, quant_storage), = kinds
    if quant_type == "dynamic8":
        raise ValueError("quant_type='dynamic8' layers have no bitsandbytes checkpoint format (transformers' "
                         "8-bit is LLM.int8); save 'nf4' or 'fp4' models")
    skip = [".".join(str(p) for p in path) for path, _ in _linears(model)]
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        skip.append("lm_head")  # transformers' lm_head shares embed_tokens' matrix: it must stay dense
    config = QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                         skip_modules=tuple(skip), quant_storage=quant_storage)
    return config.to_hf_dict()
