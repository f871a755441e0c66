"""`QuantizedLinear`: a frozen 4-bit (or 8-bit blockwise) linear layer, bitsandbytes' Linear4bit in NNX.

Trainability is a type: the quantized weight lives in `QuantizedWeight` and the bias in `FrozenBias`,
neither an ``nnx.Param``, so no optimizer selects them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import platform
from jaxlora.qmatmul import dequantize, qmatmul
from jaxlora.quant.tensor import QuantizedTensor


class QuantizedWeight(nnx.Variable):
    """Frozen quantized storage (a `QuantizedTensor`); not an ``nnx.Param``, so no optimizer selects it."""


class FrozenBias(nnx.Variable):
    """A quantized layer's bias: frozen, as bitsandbytes' Linear4bit under QLoRA."""


def quantize_weight(w: jax.Array, *, quant_type: str, blocksize: int, double_quant: bool,
                    bnb_backend: str | None = None) -> QuantizedTensor:
    """Quantize a dense weight to 4 bits ("nf4", "fp4") or bitsandbytes' 8-bit map ("dynamic8").
    ``bnb_backend=None``: the bytes of this platform's bitsandbytes (`jaxlora.platform`)."""
    from jaxlora.quant.blockwise import quantize_4bit, quantize_blockwise

    bnb_backend = bnb_backend or platform.defaults().bnb_backend

    if quant_type == "dynamic8":
        if double_quant:  # bitsandbytes nests absmax of 4-bit weights only
            raise ValueError("double_quant=True is 4-bit only; pass double_quant=False with quant_type='dynamic8'")
        return quantize_blockwise(w, blocksize=blocksize, bnb_backend=bnb_backend)
    return quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant,
                         bnb_backend=bnb_backend)


class QuantizedLinear(nnx.Module):
    """``y = x @ dequantize(W).T + bias`` in ``compute_dtype``, cast back to x's dtype (bnb Linear4bit).

    W is a QuantizedTensor in PyTorch's ``(out, in)`` layout, byte-identical to ``bnb.nn.Linear4bit``.
    ``use_kernel`` (None: this platform's default, on for a GPU; `jaxlora.platform`) runs the matmul
    in the fused Pallas kernels where they support the case.
    """

    def __init__(self, weight: QuantizedTensor, bias: jax.Array | None = None, *, compute_dtype=jnp.bfloat16,
                 use_kernel: bool | None = None):
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D (out, in), got shape {weight.shape}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        self.weight = QuantizedWeight(weight)
        self.bias = nnx.data(None if bias is None else FrozenBias(jnp.asarray(bias)))
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.use_kernel = platform.defaults().use_kernel if use_kernel is None else bool(use_kernel)

    @classmethod
    def from_weight(cls, weight: jax.Array, bias: jax.Array | None = None, *, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True, compute_dtype=jnp.bfloat16):
        """Quantize a dense ``(out, in)`` weight (a checkpoint tensor) -- explicitly, here, once."""
        qt = quantize_weight(weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(qt, bias, compute_dtype=compute_dtype)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype=jnp.bfloat16):
        """Quantize an ``nnx.Linear``; its kernel ``(in, out)`` is transposed to ``(out, in)`` first."""
        bias = None if linear.bias is None else linear.bias.get_value()
        return cls.from_weight(linear.kernel.get_value().T, bias, quant_type=quant_type, blocksize=blocksize,
                               double_quant=double_quant, compute_dtype=compute_dtype)

    @property
    def in_features(self) -> int:
        return self.weight.get_value().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.get_value().shape[0]

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense ``(out, in)`` weight."""
        return dequantize(self.weight.get_value(), dtype)

    def requantize(self, weight: jax.Array, *, bnb_backend: str | None = None) -> None:
        """Store a new dense ``(out, in)`` weight with the stored tensor's settings: 4- or 8-bit quant
        type, blocksize, double quantization, dtype and quant_storage. A QuantizedTensor does not record
        which bitsandbytes backend's bytes it reproduces, so `bnb_backend` says (default: this platform's,
        "cuda" on a GPU and "cpu" elsewhere; `jaxlora.platform`)."""
        qt = self.weight.get_value()
        new = quantize_weight(weight.astype(qt.dtype), quant_type=qt.quant_type, blocksize=qt.blocksize,
                              double_quant=qt.double_quant, bnb_backend=bnb_backend)
        self.weight.set_value(dataclasses.replace(new, quant_storage=qt.quant_storage))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out)
        y = qmatmul(x, self.weight.get_value(), compute_dtype=self.compute_dtype, use_kernel=self.use_kernel)
        if self.bias is not None:  # bias in the compute dtype, added before the one rounding (addmm)
            y = y + jnp.broadcast_to(self.bias.get_value().astype(self.compute_dtype).astype(jnp.float32), y.shape)
        return y.astype(self.compute_dtype).astype(x.dtype)

    # --- jaxlora.base.LinearBase: what a LoRA layer reads of its base -------------------------------------

    frozen_bias = FrozenBias  # what a bias returns to when it stops training (layers.set_bias_trainable)

    @property
    def weight_dtype(self):
        return self.weight.get_value().dtype

    def dense_kernel(self, dtype) -> jax.Array:
        """``(in, out)``: dequantized in the stored dtype (one rounding, as bitsandbytes), then cast."""
        return self.dequantize(self.weight_dtype).astype(dtype).T

    def set_kernel(self, kernel: jax.Array) -> None:
        self.requantize(kernel.T)  # a merge re-quantizes with the stored settings, as PEFT's bnb merge

    def to_dense(self, kernel: jax.Array | None = None) -> nnx.Linear:
        """An ``nnx.Linear`` in the stored dtype holding `kernel` ``(in, out)`` (default: dequantize(W))."""
        dtype = self.weight_dtype
        kernel = self.dense_kernel(dtype) if kernel is None else kernel.astype(dtype)
        bias = None if self.bias is None else self.bias.get_value().astype(dtype)
        return nnx.Linear(self.in_features, self.out_features, use_bias=bias is not None, param_dtype=dtype,
                          kernel_init=lambda *_: kernel, bias_init=lambda *_: bias, rngs=nnx.Rngs(0))

    def unwrap(self) -> QuantizedLinear:
        return self

    def matmul(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out)
        """__call__ without the bias: the same product and roundings."""
        y = qmatmul(x, self.weight.get_value(), compute_dtype=self.compute_dtype, use_kernel=self.use_kernel)
        return y.astype(self.compute_dtype).astype(x.dtype)
