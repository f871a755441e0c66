"""bitsandbytes' functional API, for code ported from ``bitsandbytes.functional`` and for its ported tests.

These keep bitsandbytes' parameter names (``compress_statistics``, ``quant_type``, ``blocksize``) and
defaults, and do nothing but build a `QuantConfig` and call the one entry point,
`jaxlora.quant.quantize` (or `jaxlora.quant.dequantize`); jaxlora itself never calls them. The results
are QuantizedTensors, not bitsandbytes' ``(packed, QuantState)`` pairs.

>>> qt = quantize_4bit(jnp.ones((4, 32), jnp.bfloat16), compress_statistics=True)
>>> qt.config.double_quant, qt.config.bnb_backend
(True, 'cpu')
"""

from __future__ import annotations

from typing import Literal

import jax

from jaxlora.quant.blockwise import dequantize, quantize
from jaxlora.quant.config import QuantConfig
from jaxlora.quant.tensor import QuantizedTensor

Backend = Literal["cpu", "cuda"]


def quantize_4bit(
    w: jax.Array,
    *,
    blocksize: int = 64,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    compress_statistics: bool = False,
    bnb_backend: Backend = "cpu",
    allow_non_finite: bool = False,
    quant_storage: str = "uint8",
) -> QuantizedTensor:
    """``bitsandbytes.functional.quantize_4bit`` on `bnb_backend`: ``quantize(w, QuantConfig(quant_type=
    quant_type, blocksize=blocksize, double_quant=compress_statistics, quant_storage=quant_storage,
    bnb_backend=bnb_backend))``. Its config's compute_dtype / use_kernel are QuantConfig's defaults."""
    if quant_type not in ("nf4", "fp4"):  # "dynamic8" is quantize_blockwise's, as in bitsandbytes
        raise ValueError(f"quant_type must be one of ('nf4', 'fp4'), got {quant_type!r}")
    config = QuantConfig(quant_type=quant_type, blocksize=blocksize, double_quant=compress_statistics,
                         quant_storage=quant_storage, bnb_backend=bnb_backend)
    return quantize(w, config, allow_non_finite=allow_non_finite)


def quantize_blockwise(
    x: jax.Array, *, blocksize: int = 4096, bnb_backend: Backend = "cpu", allow_non_finite: bool = False
) -> QuantizedTensor:
    """``bitsandbytes.functional.quantize_blockwise`` with its default (signed dynamic) code and no nesting:
    ``quantize(x, QuantConfig(quant_type="dynamic8", double_quant=False, blocksize=blocksize,
    bnb_backend=bnb_backend))``, one code byte per element, float32 absmax per block."""
    config = QuantConfig(quant_type="dynamic8", double_quant=False, blocksize=blocksize, bnb_backend=bnb_backend)
    return quantize(x, config, allow_non_finite=allow_non_finite)


def dequantize_4bit(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """``bitsandbytes.functional.dequantize_4bit`` of a 4-bit tensor: `jaxlora.quant.dequantize`."""
    if qt.bits != 4:
        raise ValueError(f"dequantize_4bit needs a 4-bit QuantizedTensor, got quant_type={qt.quant_type!r}")
    return dequantize(qt, dtype)


def dequantize_blockwise(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """``bitsandbytes.functional.dequantize_blockwise`` of a ``quant_type="dynamic8"`` tensor:
    `jaxlora.quant.dequantize`."""
    if qt.quant_type != "dynamic8":
        raise ValueError(f"dequantize_blockwise needs quant_type='dynamic8', got {qt.quant_type!r}")
    return dequantize(qt, dtype)


__all__ = ["dequantize_4bit", "dequantize_blockwise", "quantize_4bit", "quantize_blockwise"]
