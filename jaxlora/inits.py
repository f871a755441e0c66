"""Adapter inits that rewrite the base weight -- PEFT's PiSSA and LoftQ -- as functions of the base.

Each is a `BaseInit`: ``(base, r, scale, rngs) -> (a (in, r), b (r, out), new_base)``; the layer
(`jaxlora.layers.LoRALinear.add_adapter`) calls it once, sets A and B, and keeps the new base. The caller's
base is never edited. The maths is `jaxlora.lora.pissa` / `lora.loftq`; this module only picks the base's
dense weight and builds the new base. `resolve` turns PEFT's ``init_lora_weights`` strings into them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import lora
from jaxlora.base import DenseBase, LinearBase
from jaxlora.qlinear import QuantizedLinear, quantize_weight
from jaxlora.qmatmul import dequantize
from jaxlora.quant.tensor import QuantizedTensor

BaseInit = Callable[[DenseBase, int, float, nnx.Rngs], tuple[jax.Array, jax.Array, LinearBase]]
Quantize = Callable[[jax.Array], QuantizedTensor]  # a dense (out, in) weight -> its quantized tensor

# PEFT's LoftQ on a dense layer (utils/loftq_utils.py): NF4, blocksize 64, no double quantization.
PEFT_LOFTQ = {"quant_type": "nf4", "blocksize": 64, "double_quant": False}


def quantizer(*, quant_type: str, blocksize: int, double_quant: bool) -> Quantize:
    """The one place adapter code quantizes (a QLoRA base, LoftQ's steps); each weight in its own dtype."""
    return lambda w: quantize_weight(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


def quantized(base: DenseBase, quantize: Quantize, compute_dtype) -> QuantizedLinear:
    """`base` quantized (its kernel transposed to bitsandbytes' (out, in)), its bias kept."""
    bias = None if base.bias is None else base.bias.get_value()
    return QuantizedLinear(quantize(base.kernel.get_value().T), bias, compute_dtype=compute_dtype)


def pissa(base: DenseBase, r: int, scale: float, rngs: nnx.Rngs, *, niter: int | None = None):
    """PiSSA: A, B from the top-r singular triplets, the new base holds the residual (same dtype). The fast
    SVD (``niter``) draws its sketch from `rngs`."""
    key = None if niter is None else rngs.params()
    a, b, residual = lora.pissa(base.dense_kernel(base.weight_dtype), r, scale, niter=niter, key=key)
    return a, b, base.with_kernel(residual)


def loftq(base: DenseBase, r: int, scale: float, rngs: nnx.Rngs, *, quantize: Quantize, num_iter: int,
          compute_dtype) -> tuple[jax.Array, jax.Array, QuantizedLinear]:
    """LoftQ: B A fitted to the quantization error; the new base is LoftQ's own last quantization (no second
    rounding), with `base`'s bias. LoftQ ignores `scale`, as PEFT's (exact only when lora_alpha == r)."""
    del scale, rngs
    kernel = base.dense_kernel(base.weight_dtype)
    qt, a, b = lora.loftq(kernel.T, r, lambda w: quantize(w.astype(kernel.dtype)), dequantize, num_iter=num_iter)
    bias = None if base.bias is None else base.bias.get_value()
    return a, b, QuantizedLinear(qt, bias, compute_dtype=compute_dtype)


def resolve(init_lora_weights, *, loftq_iter: int = 1, quantize: Quantize | None = None,
            compute_dtype=jnp.bfloat16) -> BaseInit | None:
    """The `BaseInit` that PEFT's ``init_lora_weights`` names ("pissa", "pissa_niter_<n>", "loftq"); None for
    True / False / "gaussian" (A and B drawn, the base kept); a `BaseInit` passes through. Given `quantize`
    (QLoRA), the new base is a `QuantizedLinear` in `compute_dtype`: PiSSA's residual quantized by it, LoftQ's
    own last quantization with it. Without, it stays dense: LoftQ quantizes as PEFT's (`PEFT_LOFTQ`) and
    stores deq(Q) back in the weight's dtype, as PEFT does."""
    if callable(init_lora_weights):
        return init_lora_weights
    niter = lora.pissa_niter(init_lora_weights)
    if init_lora_weights == "pissa" or niter is not None:
        def run(base, r, scale, rngs):
            a, b, residual = pissa(base, r, scale, rngs, niter=niter)
            return a, b, residual if quantize is None else quantized(residual, quantize, compute_dtype)

        return run
    if init_lora_weights == "loftq":
        def run(base, r, scale, rngs):
            a, b, q = loftq(base, r, scale, rngs, quantize=quantize or quantizer(**PEFT_LOFTQ), num_iter=loftq_iter,
                            compute_dtype=compute_dtype)
            return a, b, q if quantize is not None else base.with_kernel(q.dense_kernel(base.weight_dtype))

        return run
    return None
