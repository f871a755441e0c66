"""`QuantizedLinear`: a frozen 4-bit (or 8-bit blockwise) linear layer, bitsandbytes' Linear4bit in NNX.

Trainability is a type: the quantized weight lives in `QuantizedWeight` and the bias in `FrozenBias`,
neither an ``nnx.Param``, so no optimizer selects them. The layer keeps no settings of its own: quant
type, blocksize, compute dtype, kernel choice and bitsandbytes backend are its weight's `QuantConfig`
(``weight.config``), the one owner of each.

>>> from jaxlora.quant import QuantConfig, quantize
>>> config = QuantConfig(quant_type="fp4", blocksize=128, double_quant=False, compute_dtype=jnp.float32)
>>> layer = QuantizedLinear(quantize(jnp.ones((8, 128)), config))           # (out, in) = (8, 128)
>>> layer(jnp.ones((2, 128))).shape, layer.compute_dtype, layer.config.quant_type
((2, 8), dtype('float32'), 'fp4')
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.qmatmul import qmatmul
from jaxlora.quant.blockwise import dequantize, quantize
from jaxlora.quant.config import QuantConfig
from jaxlora.quant.tensor import QuantizedTensor


class QuantizedWeight(nnx.Variable):
    """Frozen quantized storage (a `QuantizedTensor`); not an ``nnx.Param``, so no optimizer selects it."""


class FrozenBias(nnx.Variable):
    """A quantized layer's bias: frozen, as bitsandbytes' Linear4bit under QLoRA."""


class QuantizedLinear(nnx.Module):
    """``y = x @ dequantize(W).T + bias`` in ``compute_dtype``, cast back to x's dtype (bnb Linear4bit).

    W is a QuantizedTensor in PyTorch's ``(out, in)`` layout, byte-identical to ``bnb.nn.Linear4bit``;
    build it with ``jaxlora.quant.quantize(w, config)``, or quantize an ``nnx.Linear`` with
    `from_linear`. ``config.use_kernel`` runs the matmul in the fused Pallas kernels where they support
    the case.
    """

    shared_weight = False  # jaxlora.base.KernelBase: the packed weight is this layer's own

    def __init__(self, weight: QuantizedTensor, bias: jax.Array | None = None):
        if not isinstance(weight, QuantizedTensor):
            raise TypeError(f"weight must be a QuantizedTensor (jaxlora.quant.quantize(w, config)), got "
                            f"{type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D (out, in), got shape {weight.shape}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        self.weight = QuantizedWeight(weight)
        self.bias = nnx.data(None if bias is None else FrozenBias(jnp.asarray(bias)))

    @classmethod
    def from_linear(cls, linear: nnx.Linear, config: QuantConfig) -> QuantizedLinear:
        """Quantize an ``nnx.Linear`` as `config` says -- explicitly, here, once. Its kernel ``(in, out)``
        is transposed to bitsandbytes' ``(out, in)`` and quantized in its own dtype; the bias is kept."""
        bias = None if linear.bias is None else linear.bias.get_value()
        return cls(quantize(jnp.asarray(linear.kernel.get_value()).T, config), bias)

    @property
    def config(self) -> QuantConfig:
        """How the weight is quantized and run (its QuantizedTensor's config)."""
        return self.weight.get_value().config

    @property
    def compute_dtype(self) -> np.dtype:
        return self.config.compute_dtype

    @property
    def use_kernel(self) -> bool:
        return self.config.use_kernel

    @property
    def in_features(self) -> int:
        return self.weight.get_value().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.get_value().shape[0]

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense ``(out, in)`` weight."""
        return dequantize(self.weight.get_value(), dtype)

    def requantize(self, weight: jax.Array) -> None:
        """Store a new dense ``(out, in)`` weight, quantized in the stored tensor's dtype with its config:
        quant type, blocksize, double quantization, quant_storage and bitsandbytes backend, as first asked."""
        qt = self.weight.get_value()
        self.weight.set_value(quantize(weight.astype(qt.dtype), qt.config))

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out)
        cd = self.compute_dtype
        y = qmatmul(x, self.weight.get_value(), compute_dtype=cd, use_kernel=self.use_kernel)
        if self.bias is not None:  # bias in the compute dtype, added before the one rounding (addmm)
            y = y + jnp.broadcast_to(self.bias.get_value().astype(cd).astype(jnp.float32), y.shape)
        return y.astype(cd).astype(x.dtype)

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
