"""`QuantConfig`: how a tensor, and a model's linear layers, are quantized -- one frozen object, validated once.

It is the "how" of `jaxlora.quant.quantize(w, config)` (qwix's ``HowToQuantize``) and travels with the
result as the static ``config`` of a `QuantizedTensor`, so re-quantizing a tensor (a merge, LoftQ,
`QuantizedLinear.requantize`) reproduces exactly what was asked, bitsandbytes backend included. The
same object is the model-level setting (transformers' ``BitsAndBytesConfig`` is one object too):
`quantize_model` and `from_pretrained` read `skip_modules`; a `QuantizedLinear` reads `compute_dtype`
and `use_kernel` from its tensor's config and keeps no copy.

One name per setting. Inside jaxlora only the field names below are used; transformers' names appear
only in `to_hf_dict` / `from_hf_dict`, bitsandbytes' only in the `jaxlora.quant.bnb_functional` mirror:

=================  ===============================  ===============================================
QuantConfig        transformers BitsAndBytesConfig  bitsandbytes (Linear4bit / functional)
=================  ===============================  ===============================================
``quant_type``     ``bnb_4bit_quant_type``          ``quant_type``
``double_quant``   ``bnb_4bit_use_double_quant``    ``compress_statistics``
``blocksize``      (none: always 64)                ``blocksize``
``quant_storage``  ``bnb_4bit_quant_storage``       ``quant_storage``
``compute_dtype``  ``bnb_4bit_compute_dtype``       ``compute_dtype``
``skip_modules``   ``llm_int8_skip_modules``        (none)
``bnb_backend``    (none)                           the device the tensor is on
``use_kernel``     (none)                           (none)
=================  ===============================  ===============================================

Short names rather than transformers': its ``bnb_4bit_`` / ``llm_int8_`` prefixes tell apart the two
modes of one object (4-bit and LLM.int8), which jaxlora does not have, and would be wrong for
``quant_type="dynamic8"``; the short names are bitsandbytes' own except ``double_quant``, QLoRA's term.

>>> QuantConfig(quant_type="fp4", double_quant=False, bnb_backend="cpu").to_hf_dict()["bnb_4bit_quant_type"]
'fp4'
>>> QuantConfig(blocksize=48)
Traceback (most recent call last):
...
ValueError: QuantConfig.blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096), got 48
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from jaxlora import platform

QuantType = Literal["nf4", "fp4", "dynamic8"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "dynamic8")
# bitsandbytes' blocksize set for 4-bit and 8-bit blockwise quantization (functional.py asserts it).
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes' quant_storage: the dtype its packed 4-bit bytes are *viewed* as (``packed.view(dtype)``;
# FSDP-QLoRA stores them as the model's float dtype so that they shard like the other parameters).
QUANT_STORAGES: tuple[str, ...] = ("uint8", "float16", "bfloat16", "float32")
BNB_BACKENDS: tuple[str, ...] = ("cpu", "cuda")
COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
# The settings that decide the stored bytes; the others say how the tensor is used (or re-quantized).
FORMAT_FIELDS: tuple[str, ...] = ("quant_type", "blocksize", "double_quant", "quant_storage")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize a tensor, and a model's linear layers (the mapping to transformers' and
    bitsandbytes' names is in the module docstring). Validated once, here; None fields resolve to this
    platform's defaults (`jaxlora.platform`) at construction, so a config always says what it does."""

    # "nf4" | "fp4" (4-bit), or "dynamic8": bitsandbytes' 8-bit blockwise map (jaxlora only: transformers'
    # 8-bit is LLM.int8, another format, so a dynamic8 model has no HF checkpoint form).
    quant_type: QuantType = "nf4"
    # absmax 8-bit quantized in blocks of 256 (QLoRA's recipe; 4-bit only).
    double_quant: bool = True
    # Elements per absmax block (Linear4bit and transformers always use 64).
    blocksize: int = 64
    # The dtype packed 4-bit bytes are viewed as in checkpoints (FSDP-QLoRA uses the model's float
    # dtype); the bytes, and so the numbers, are the same for every choice. "uint8" for dynamic8.
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"
    # Which bitsandbytes backend's bytes to reproduce where its CPU and CUDA kernels differ
    # (jaxlora/quant/blockwise.py). None: the platform's, "cuda" when quantizing on a GPU, else "cpu".
    bnb_backend: Literal["cpu", "cuda"] | None = None
    # The dtype of the dequantized weight and of the matmul.
    compute_dtype: Any = jnp.bfloat16
    # Run the matmuls in the fused Pallas kernels where they support the case (jaxlora only).
    # None: the platform's default, on for a GPU.
    use_kernel: bool | None = None
    # Module names `quantize_model` keeps dense, matched as transformers matches them (a prefix at a
    # module boundary, a regex, or a suffix: "lm_head", "layers.0", r"layers\.\d+\.mlp", "down_proj").
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if not isinstance(self.double_quant, (bool, np.bool_)):
            raise ValueError(f"QuantConfig.double_quant must be a bool, got {self.double_quant!r}")
        set_("double_quant", bool(self.double_quant))
        if self.double_quant and self.quant_type == "dynamic8":
            raise ValueError("QuantConfig.double_quant=True is 4-bit only (bitsandbytes nests absmax of 4-bit "
                             "weights); pass double_quant=False with quant_type='dynamic8'")
        # 64.0 == 64, so `in BLOCKSIZES` alone would let a float through to fail inside jax.
        blocksize = self.blocksize
        if not isinstance(blocksize, numbers.Integral) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantConfig.blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        set_("blocksize", int(blocksize))
        storage = getattr(self.quant_storage, "name", self.quant_storage)  # a numpy / jnp dtype, or its name
        if storage not in QUANT_STORAGES or (storage != "uint8" and self.quant_type == "dynamic8"):
            raise ValueError(f"QuantConfig.quant_storage must be one of {QUANT_STORAGES} ('uint8' for "
                             f"quant_type='dynamic8'), got {self.quant_storage!r}")
        set_("quant_storage", storage)
        try:
            cd = np.dtype(self.compute_dtype)
        except TypeError:
            cd = None
        if cd not in COMPUTE_DTYPES:
            raise ValueError(f"QuantConfig.compute_dtype must be one of {[d.name for d in COMPUTE_DTYPES]}, "
                             f"got {self.compute_dtype!r}")
        set_("compute_dtype", cd)
        skip = self.skip_modules
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"QuantConfig.skip_modules must be a sequence of module names, got {skip!r}")
        set_("skip_modules", tuple(skip))
        if self.bnb_backend is None or self.use_kernel is None:
            resolved = platform.defaults()
            if self.bnb_backend is None:
                set_("bnb_backend", resolved.bnb_backend)
            if self.use_kernel is None:
                set_("use_kernel", resolved.use_kernel)
        if self.bnb_backend not in BNB_BACKENDS:
            raise ValueError(f"QuantConfig.bnb_backend must be one of {BNB_BACKENDS}, got {self.bnb_backend!r}")
        if not isinstance(self.use_kernel, (bool, np.bool_)):
            raise ValueError(f"QuantConfig.use_kernel must be a bool or None, got {self.use_kernel!r}")
        set_("use_kernel", bool(self.use_kernel))

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "dynamic8" else 4

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with `changes` applied, validated again (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

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
