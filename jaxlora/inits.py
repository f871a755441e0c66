"""Adapter inits that rewrite the base weight -- PEFT's PiSSA and LoftQ -- as functions of the base.

Each is a `BaseInit`: ``(base, r, scale, rngs) -> (a (in, r), b (r, out), new_base)``; the layer
(`jaxlora.layers.LoRALinear.add_adapter`) calls it once, sets A and B, and keeps the new base. The caller's
base is never edited. The maths is `jaxlora.lora.pissa` / `lora.loftq`; this module only picks the base's
dense weight and builds the new base. `resolve` turns PEFT's ``init_lora_weights`` strings into them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from jaxlora import lora
from jaxlora.base import DenseBase, LinearBase
from jaxlora.qlinear import QuantizedLinear
from jaxlora.quant.blockwise import dequantize, quantize
from jaxlora.quant.config import QuantConfig

BaseInit = Callable[[DenseBase, int, float, nnx.Rngs], tuple[jax.Array, jax.Array, LinearBase]]

# PEFT's LoftQ on a dense layer (utils/loftq_utils.py): NF4, blocksize 64, no double quantization.
# A function, not a constant: a QuantConfig resolves the platform's defaults when built, and importing jaxlora
# must not touch a JAX backend (jax.distributed.initialize has to come first in a multi-process run).
def peft_loftq() -> QuantConfig:
    return QuantConfig(quant_type="nf4", blocksize=64, double_quant=False)


def pissa(base: DenseBase, r: int, scale: float, rngs: nnx.Rngs, *, niter: int | None = None):
    """PiSSA: A, B from the top-r singular triplets, the new base holds the residual (same dtype). The fast
    SVD (``niter``) draws its sketch from `rngs`."""
    key = None if niter is None else rngs.params()
    a, b, residual = lora.pissa(base.dense_kernel(base.weight_dtype), r, scale, niter=niter, key=key)
    return a, b, base.with_kernel(residual)


def loftq(base: DenseBase, r: int, scale: float, rngs: nnx.Rngs, *, quantization: QuantConfig,
          num_iter: int) -> tuple[jax.Array, jax.Array, QuantizedLinear]:
    """LoftQ: B A fitted to the quantization error; the new base is LoftQ's own last quantization (no second
    rounding), with `base`'s bias. LoftQ ignores `scale`, as PEFT's (exact only when lora_alpha == r)."""
    del scale, rngs
    kernel = base.dense_kernel(base.weight_dtype)
    qt, a, b = lora.loftq(kernel.T, r, lambda w: quantize(w.astype(kernel.dtype), quantization), dequantize,
                          num_iter=num_iter)
    bias = None if base.bias is None else base.bias.get_value()
    return a, b, QuantizedLinear(qt, bias)


def resolve(init_lora_weights, *, loftq_iter: int = 1, quantization: QuantConfig | None = None
            ) -> BaseInit | None:
    """The `BaseInit` that PEFT's ``init_lora_weights`` names ("pissa", "pissa_niter_<n>", "loftq"); None for
    True / False / "gaussian" (A and B drawn, the base kept); a `BaseInit` passes through. Given `quantization`
    (QLoRA), the new base is a `QuantizedLinear` of that config: PiSSA's residual quantized with it, LoftQ's
    own last quantization with it. Without, it stays dense: LoftQ quantizes as PEFT's (`peft_loftq`) and
    stores deq(Q) back in the weight's dtype, as PEFT does."""
    if callable(init_lora_weights):
        return init_lora_weights
    niter = lora.pissa_niter(init_lora_weights)
    if init_lora_weights == "pissa" or niter is not None:
        def run(base, r, scale, rngs):
            a, b, residual = pissa(base, r, scale, rngs, niter=niter)
            return a, b, residual if quantization is None else QuantizedLinear.from_linear(residual, quantization)

        return run
    if init_lora_weights == "loftq":
        def run(base, r, scale, rngs):
            a, b, q = loftq(base, r, scale, rngs, quantization=quantization or peft_loftq(), num_iter=loftq_iter)
            return a, b, q if quantization is not None else base.with_kernel(q.dense_kernel(base.weight_dtype))

        return run
    return None
