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

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant.blockwise import dequantize
from jaxlora.quant.tensor import QuantizedTensor


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


# Dense elements of one dequantized row tile (8 MiB in bf16). A larger weight is dequantized and
# multiplied a tile of rows at a time inside a loop, for two reasons measured at Llama-2-7B shapes: a
# whole dense copy of every weight is never needed at once (one 11008x4096 weight is 86 MiB in bf16),
# and a loop that takes x (or dy) as its input cannot start before x exists. XLA's scheduler otherwise
# runs every dequantization of a layer first, the forward's and the backward's (14 dense weights, 0.7
# GiB, live together in each layer's backward), since they depend on the packed weights alone; an
# optimization barrier does not stop it, as XLA's CPU pipeline drops barriers before scheduling.
TILE_ELEMENTS = 1 << 22


def row_tiles(qt: QuantizedTensor) -> int:
    """How many equal row tiles `qmatmul` splits qt's (out, in) weight into: 1 (untiled) for a weight of at
    most TILE_ELEMENTS, else the fewest tiles of at most that size whose bounds fall on quantization
    blocks (and on double quantization's blocks of blocks), so each tile is a QuantizedTensor itself."""
    rows, cols = qt.shape
    if qt.numel <= TILE_ELEMENTS:
        return 1
    unit = qt.blocksize * (qt.nested_blocksize if qt.double_quant else 1)  # elements a tile must align to
    for n in range(2, rows + 1):
        if rows % n == 0 and (rows // n) * cols <= TILE_ELEMENTS and (rows // n) * cols % unit == 0:
            return n
    return 1  # no aligned split (e.g. a prime row count): dequantize whole


def _split_rows(qt: QuantizedTensor, n: int) -> QuantizedTensor:
    # qt's leaves with a leading axis of n tiles, for lax.scan, which hands each iteration one tile of
    # shape (out // n, in). Row-major blocks: tile i's codes, scales and nested scales are contiguous.
    lead = lambda a: None if a is None else a.reshape(n, -1)  # noqa: E731
    offset = None if qt.offset is None else jnp.broadcast_to(qt.offset, (n,))
    return dataclasses.replace(qt, codes=lead(qt.codes), absmax=lead(qt.absmax), nested_absmax=lead(qt.nested_absmax),
                               offset=offset, shape=(qt.shape[0] // n, qt.shape[1]))


def _forward(x: jax.Array, qt: QuantizedTensor, compute_dtype, use_kernel: bool) -> jax.Array:
    # The forward, dispatched: the fused kernel where asked for and able, else the (row-tiled) jnp path.
    fused = _fused(qt, x, use_kernel)
    if fused is not None:
        return fused.matmul_4bit(x, qt, compute_dtype=compute_dtype, out_dtype=jnp.float32)
    # float32 accumulator out, as torch's addmm: the caller adds the bias before the one rounding to cd
    n = row_tiles(qt)
    if n == 1:
        return jnp.matmul(x, _weight(qt, compute_dtype).T, preferred_element_type=jnp.float32)

    def tile(_, t):  # output columns of one row tile: the same products as untiled
        return None, jnp.matmul(x, _weight(t, compute_dtype).T, preferred_element_type=jnp.float32)

    parts = jax.lax.scan(tile, None, _split_rows(qt, n))[1]  # (n, ..., rows)
    return jnp.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], qt.shape[0])


def _input_grad(dy: jax.Array, qt: QuantizedTensor, compute_dtype) -> jax.Array:
    # dy (..., out) @ W (out, in), float32 accumulator; tiled as the forward, summing the tiles' products.
    n = row_tiles(qt)
    if n == 1:
        return jnp.matmul(dy, _weight_t(qt, compute_dtype), preferred_element_type=jnp.float32)
    rows = qt.shape[0] // n

    tiles = _split_rows(qt, n)

    def product(i):  # row tile i's share of dx (tiles indexed: a static tiles[1:] for the loop would copy codes)
        t = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tiles)
        part = jax.lax.dynamic_slice_in_dim(dy, i * rows, rows, axis=-1)
        return jnp.matmul(part, _weight_t(t, compute_dtype), preferred_element_type=jnp.float32)

    # The first tile's product starts the sum (0 + p == p exactly): a zeros accumulator depends on nothing,
    # so XLA schedules it at the top of the layer's backward and it lives across every other weight's.
    return jax.lax.fori_loop(1, n, lambda i, dx: dx + product(i), product(0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x: jax.Array, qt: QuantizedTensor, compute_dtype, use_kernel: bool) -> jax.Array:
    return _forward(x, qt, compute_dtype, use_kernel)


def _fwd(x, qt, compute_dtype, use_kernel):
    return _forward(x, qt, compute_dtype, use_kernel), qt


def _bwd(compute_dtype, use_kernel, qt, dy):
    # The barrier ties the re-dequantization to dy: without it XLA's CSE merges it with the forward's
    # dequantization and the dense weight lives across the whole step again.
    qt, dy = jax.lax.optimization_barrier((qt, dy))
    # bitsandbytes: grad_x = grad_out @ W, both in the compute dtype (dy holds compute-dtype values here)
    fused = _fused(qt, dy, use_kernel, transpose=True)
    if fused is not None:
        dx = fused.matmul_4bit_t(dy.astype(compute_dtype), qt, compute_dtype=compute_dtype)
    else:
        dx = _input_grad(dy.astype(compute_dtype), qt, compute_dtype).astype(compute_dtype)
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
    (jaxlora/kernels/matmul_4bit.py) where they support the case (4-bit, tile-divisible shapes), and the
    jnp path otherwise; the jnp path is their reference. The kernels are compiled (Triton) when the
    program is lowered for CUDA and interpreted for any other platform (see jaxlora.kernels.matmul_4bit)."""
    if len(qt.shape) != 2 or x.shape[-1] != qt.shape[1]:
        raise ValueError(f"x {x.shape} does not match a quantized weight of shape (out, in) = {qt.shape}")
    return _qmatmul(x.astype(compute_dtype), qt, jnp.dtype(compute_dtype), use_kernel)
