"""``x @ dequantize(W).T`` for a frozen quantized weight, with a backward that keeps only the packed codes.

bitsandbytes' ``MatMul4Bit`` saves the packed weight for backward and dequantizes it again there; plain
autodiff of ``x @ dequantize(qt).T`` would instead keep every layer's dequantized weight alive from the
forward pass to the backward pass. ``jax.custom_vjp`` reproduces bitsandbytes: the residual is the
QuantizedTensor itself, the backward re-dequantizes, and no gradient is formed for the weight.

dtype order, as the installed bitsandbytes 0.50.2 runs Linear4bit on CPU (measured on identical bytes,
parity_tests/test_qmatmul_dtype_parity.py): its forward (``gemm_4bit``) dequantizes straight to the
compute dtype, ``y = x.astype(cd) @ dequantize(W, cd).T`` (one rounding of each weight element),
accumulated in float32 and returned unrounded, so the caller adds the bias before the single rounding
to ``cd`` (torch's addmm); its backward (``MatMul4Bit.backward``) dequantizes to the weight's own dtype
and then casts, ``dx = (dy.astype(cd) @ dequantize(W, W.dtype).astype(cd)).astype(cd)`` (two roundings
when the dtypes differ).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant.tensor import QuantizedTensor


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """Dequantize a 4-bit or 8-bit QuantizedTensor (default dtype: the original tensor's)."""
    from jaxlora.quant import blockwise  # the quantization core; imported late so lora math loads without it

    if qt.bits == 8:
        return blockwise.dequantize_blockwise(qt, dtype=dtype)
    return blockwise.dequantize_4bit(qt, dtype=dtype)


def _weight(qt: QuantizedTensor, dtype) -> jax.Array:
    # The forward's weight: dequantized straight to the compute dtype (bitsandbytes' gemm_4bit passes
    # A.dtype to dequantize_4bit), one rounding.
    return dequantize(qt, dtype)


def _weight_t(qt: QuantizedTensor, dtype) -> jax.Array:
    # The backward's weight: bitsandbytes' ``dequantize_4bit(W).to(grad.dtype)``, rounded to the stored
    # dtype first; a bf16 weight dequantized straight to float32 would skip that rounding and differ.
    return dequantize(qt, qt.dtype).astype(dtype)


def _fused(qt: QuantizedTensor, operand: jax.Array, use_kernel: bool, *, transpose: bool = False):
    """The Pallas kernels module when asked for and able to run this case, else None (the jnp path).
    operand: x (..., in) for the forward, dy (..., out) for the input gradient (transpose=True)."""
    if not use_kernel or qt.bits != 4:
        return None
    from jaxlora import kernels

    able = kernels.supports_t(qt, operand) if transpose else kernels.supports(qt, operand)
    return kernels if able else None


def _reference(x: jax.Array, qt: QuantizedTensor, compute_dtype, use_kernel: bool) -> jax.Array:
    fused = _fused(qt, x, use_kernel)
    if fused is not None:
        return fused.nf4_matmul(x, qt, compute_dtype=compute_dtype, out_dtype=jnp.float32)
    # float32 accumulator out, as torch's addmm: the caller adds the bias before the one rounding to cd
    return jnp.matmul(x, _weight(qt, compute_dtype).T, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x: jax.Array, qt: QuantizedTensor, compute_dtype, use_kernel: bool) -> jax.Array:
    return _reference(x, qt, compute_dtype, use_kernel)


def _fwd(x, qt, compute_dtype, use_kernel):
    return _reference(x, qt, compute_dtype, use_kernel), qt


def _bwd(compute_dtype, use_kernel, qt, dy):
    # The barrier ties the re-dequantization to dy: without it XLA's CSE merges it with the forward's
    # dequantization and the dense weight lives across the whole step again.
    qt, dy = jax.lax.optimization_barrier((qt, dy))
    # bitsandbytes: grad_x = grad_out @ W, both in the compute dtype (dy holds compute-dtype values here)
    fused = _fused(qt, dy, use_kernel, transpose=True)
    if fused is not None:
        dx = fused.nf4_matmul_t(dy.astype(compute_dtype), qt, compute_dtype=compute_dtype)
    else:
        dx = jnp.matmul(dy.astype(compute_dtype), _weight_t(qt, compute_dtype), preferred_element_type=jnp.float32)
        dx = dx.astype(compute_dtype)
    # The base is frozen: integer leaves get float0 cotangents, float leaves (scales) zeros.
    dqt = jax.tree.map(
        lambda leaf: (
            np.zeros(leaf.shape, jax.dtypes.float0)
            if not jnp.issubdtype(leaf.dtype, jnp.floating)
            else jnp.zeros_like(leaf)
        ),
        qt,
    )
    return dx, dqt


_qmatmul.defvjp(_fwd, _bwd)


def qmatmul(x: jax.Array, qt: QuantizedTensor, *, compute_dtype=jnp.bfloat16, use_kernel: bool = False) -> jax.Array:
    """``x.astype(cd) @ dequantize(qt).astype(cd).T`` -> ``(..., out)`` float32 accumulator (round it to
    ``cd`` after adding any bias, as torch's addmm does); x ``(..., in)``, qt ``(out, in)``. Gradient
    flows to x only. ``use_kernel`` runs the forward and the input gradient in the fused Pallas kernels
    (jaxlora/kernels/nf4_matmul.py) where they support the case (4-bit, tile-divisible shapes), and the
    jnp path otherwise; the jnp path is their reference. The kernels are compiled (Triton) when the
    program is lowered for CUDA and interpreted for any other platform (see jaxlora.kernels.nf4_matmul)."""
    if len(qt.shape) != 2 or x.shape[-1] != qt.shape[1]:
        raise ValueError(f"x {x.shape} does not match a quantized weight of shape (out, in) = {qt.shape}")
    return _qmatmul(x.astype(compute_dtype), qt, jnp.dtype(compute_dtype), use_kernel)


def qmatmul_autodiff(x: jax.Array, qt: QuantizedTensor, *, compute_dtype=jnp.bfloat16) -> jax.Array:
    """The same product under plain autodiff: the baseline the memory test compares against."""
    w = jax.lax.stop_gradient(_weight(qt, compute_dtype))
    return jnp.matmul(x.astype(compute_dtype), w.T, preferred_element_type=jnp.float32)
