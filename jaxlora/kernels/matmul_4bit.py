"""Fused 4-bit (NF4 and FP4) dequantize-matmul: ``x @ dequantize(qt).T`` without materializing the weight.

Each program dequantizes one ``(block_n, block_k)`` tile of the weight at a time from its packed bytes
and scales (registers / shared memory), feeds it to the tile's dot and drops it. The full weight is
never written out, so a decode step reads 0.5 B per weight element plus its scales (~0.52 B with
blocksize 64 and double quantization) instead of 2.5 B (codes + a bf16 copy of the weight).

Exactness: a dequantized tile element is ``compute_dtype(f32(table[code] * absmax))``, and a
double-quantized absmax is ``f32(f32(dynamic_map[code8] * nested_absmax) + offset)`` with two roundings,
exactly as `jaxlora.quant.dequantize` (and bitsandbytes) compute them; see
``_two_rounding_mul_add`` for how the multiply-add is kept from fusing into an FMA. Only the dot's
accumulation order differs from the jnp path (float32 accumulation in both).

Written for the Pallas Triton lowering (GPU: H100 / H200); ``interpret=True`` runs the same kernel
on CPU for tests. The default, ``interpret=None``, decides when the program is lowered
(`jax.lax.platform_dependent`): the Triton kernel for CUDA, the interpreter for any other platform. So
a function traced on a CPU-only machine and lowered with ``lowering_platforms=("cuda",)`` carries
the real kernels (tests/test_cuda_lowering.py does exactly that). All tile sizes must be powers of two (a Triton requirement) and divide the matrix.

Choosing tiles on Hopper (H100: 3.35 TB/s, H200: 4.8 TB/s HBM):

* Decode (batch × seq ≤ 16) is memory-bound: a 4096² weight is 8.4 MB of codes, ~2 µs at H200
  bandwidth, so the aim is ≥ 80 % of HBM bandwidth. ``block_m = 16`` (Triton's smallest dot; rows
  past the batch are zero padding). Enough programs must be in flight to cover 132 SMs several times
  over: ``out / block_n`` ≥ ~4 × 132, so ``block_n`` 16–32 for 4096-wide outputs; ``block_k`` 256–512
  so each program streams ≥ 2–4 KB of codes per step in 16-byte vector loads; ``num_stages`` 3–4 to
  keep loads in flight while the previous tile is dequantized; ``num_warps`` 4. If ``out`` is too small
  to fill the machine, the remedy is split-K (not implemented yet).
* The dequantization itself costs ~5 integer / float operations per element plus a 16-entry table
  lookup; at 4.8 TB/s that is ~9 G elements/ms, close to what the SM ALUs and L1 can absorb. Profile
  before tuning loads: if the kernel is ALU-bound, a 256-entry byte → (value, value) table halves the
  lookups.
* Prefill / training (batch × seq ≥ 256) is compute-bound: ``block_m`` 64–128, ``block_n`` 64–128,
  ``block_k`` 64–128, ``num_warps`` 4–8; the dequantization is then amortized over ``block_m`` rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxlora.kernels import tiling
from jaxlora.quant import codes
from jaxlora.quant.tensor import QuantizedTensor

__all__ = ["matmul_4bit", "matmul_4bit_t", "supports", "supports_t"]


def _tables(qt: QuantizedTensor) -> tuple[jax.Array, jax.Array | None]:
    """The 4-bit code table, and the dynamic 8-bit map when ``qt`` is double-quantized."""
    table = jnp.asarray(codes.table(qt.quant_type), jnp.float32)  # (16,)
    dynamic = jnp.asarray(codes.table("dynamic8"), jnp.float32) if qt.double_quant else None
    return table, dynamic


def supports(qt: QuantizedTensor, x: jax.Array, **tiles: int | None) -> bool:
    """Whether `matmul_4bit(x, qt)` (and `matmul_4bit_t` for a matching ``dy``) can run this case."""
    if x.ndim == 0:
        return False
    return tiling.why_unsupported(qt, x.shape[-1], rows=_rows(x), **tiles) is None


def supports_t(qt: QuantizedTensor, dy: jax.Array, **tiles: int | None) -> bool:
    """Whether `matmul_4bit_t(dy, qt)` can run this case (``dy`` ends in out_features)."""
    if dy.ndim == 0 or len(qt.shape) != 2 or dy.shape[-1] != qt.shape[0]:
        return False
    return tiling.why_unsupported(qt, qt.shape[1], rows=_rows(dy), **tiles) is None


def matmul_4bit(
    x: jax.Array,  # (..., in_features)
    qt: QuantizedTensor,  # (out_features, in_features), PyTorch layout
    *,
    compute_dtype: jnp.dtype = jnp.bfloat16,
    out_dtype: jnp.dtype | None = None,
    interpret: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:  # (..., out_features) in out_dtype (default: compute_dtype)
    """``x.astype(compute_dtype) @ dequantize(qt, compute_dtype).T``, fused; float32 accumulation.

    ``block_n`` tiles ``out_features`` (one program each), ``block_k`` tiles ``in_features`` (the
    loop inside a program); ``None`` picks a default (see the module docstring). ``out_dtype=float32``
    returns the accumulator unrounded (`jaxlora.qmatmul` adds the bias before rounding, as torch's
    addmm does). Raises ValueError for a case the kernel does not handle; check `supports` first to
    fall back to the jnp path.
    """
    t = tiling.choose(qt, x.shape[-1], block_m=block_m, block_n=block_n, block_k=block_k, rows=_rows(x))
    return _call(_fwd_kernel, x, qt, t, transpose=False, compute_dtype=compute_dtype,
                 out_dtype=out_dtype or compute_dtype, interpret=interpret, num_warps=num_warps,
                 num_stages=num_stages)


def matmul_4bit_t(
    dy: jax.Array,  # (..., out_features)
    qt: QuantizedTensor,  # (out_features, in_features), PyTorch layout
    *,
    compute_dtype: jnp.dtype = jnp.bfloat16,
    interpret: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:  # (..., in_features) in compute_dtype
    """``dy.astype(compute_dtype) @ dequantize(qt, compute_dtype)``: the input gradient, fused.

    Here ``block_k`` tiles ``in_features`` (one program each) and ``block_n`` tiles ``out_features``
    (the loop inside a program).
    """
    n_out, n_in = qt.shape
    if dy.ndim == 0 or dy.shape[-1] != n_out:
        raise ValueError(f"dy {dy.shape} does not end in out_features={n_out}")
    t = tiling.choose(qt, n_in, block_m=block_m, block_n=block_n, block_k=block_k, rows=_rows(dy))
    return _call(_bwd_kernel, dy, qt, t, transpose=True, compute_dtype=compute_dtype, out_dtype=compute_dtype,
                 interpret=interpret, num_warps=num_warps, num_stages=num_stages)


def _call(body, a: jax.Array, qt: QuantizedTensor, t: tiling.Tiles, *, transpose: bool, compute_dtype,
          out_dtype, interpret: bool | None, num_warps: int, num_stages: int) -> jax.Array:
    """The pallas_call shared by both kernels: grid (row tiles of `a`, output column tiles).

    Forward: `a` is ``(..., in)``, a program owns ``block_n`` output features and all their weight
    rows. Transpose: `a` is ``(..., out)``, a program owns ``block_k`` input features and all their
    weight columns. Rows are padded to ``block_m`` and the padding dropped from the result.
    """
    n_out, n_in = qt.shape
    n_cols, block_cols = (n_in, t.block_k) if transpose else (n_out, t.block_n)
    weight_map = (lambda i, j: (0, j)) if transpose else (lambda i, j: (j, 0))
    a2, m = _pad_rows(a.reshape(-1, a.shape[-1]).astype(compute_dtype), t.block_m)  # (M, in | out)
    operands = (a2, *_weight_operands(qt, *_tables(qt)))

    def run(interpret: bool, *operands):
        kernel = functools.partial(body, t=t, qt_meta=_meta(qt), double_quant=qt.double_quant, interpret=interpret)
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((a2.shape[0], n_cols), out_dtype),
            grid=(a2.shape[0] // t.block_m, n_cols // block_cols),
            in_specs=[pl.BlockSpec((t.block_m, a2.shape[1]), lambda i, j: (i, 0)),
                      *_weight_specs(qt, t, weight_map, transpose=transpose)],
            out_specs=pl.BlockSpec((t.block_m, block_cols), lambda i, j: (i, j)),
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
        )(*operands)

    if interpret is None:  # chosen per lowering platform; only the chosen branch is lowered
        y = lax.platform_dependent(*operands, cuda=functools.partial(run, False),
                                   default=functools.partial(run, True))
    else:
        y = run(interpret, *operands)
    return y[:m].reshape(*a.shape[:-1], n_cols)


# --- operands -------------------------------------------------------------------------------------


def _rows(x: jax.Array) -> int:
    return math.prod(x.shape[:-1]) if x.ndim else 0


def _meta(qt: QuantizedTensor) -> tuple[int, int, int, np.dtype]:
    _, n_in = qt.shape
    return n_in, qt.blocksize, qt.nested_blocksize, np.dtype(qt.dtype)


def _pad_rows(a: jax.Array, block_m: int) -> tuple[jax.Array, int]:
    m = a.shape[0]
    pad = -m % block_m
    return (jnp.pad(a, ((0, pad), (0, 0))) if pad else a), m


def _weight_operands(qt: QuantizedTensor, table: jax.Array, dynamic: jax.Array | None) -> list[jax.Array]:
    """Packed codes as (out, in / 2) and absmax as (out, in / blocksize): row o's bytes and blocks."""
    n_out, n_in = qt.shape
    ops = [qt.codes.reshape(n_out, n_in // 2), qt.absmax.reshape(n_out, n_in // qt.blocksize), table]
    if dynamic is not None:
        ops += [dynamic, qt.nested_absmax, jnp.reshape(qt.offset, (1,)).astype(jnp.float32)]
    return ops


def _weight_specs(qt: QuantizedTensor, t: tiling.Tiles, index_map, transpose: bool = False) -> list:
    """BlockSpecs: a program sees all of its weight rows (forward) or columns (transpose)."""
    n_out, n_in = qt.shape
    n_blocks_row = n_in // qt.blocksize
    if transpose:
        codes_spec = pl.BlockSpec((n_out, t.block_k // 2), index_map)
        absmax_spec = pl.BlockSpec((n_out, t.scales_per_tile), _scale_col_map(index_map, t, qt))
    else:
        codes_spec = pl.BlockSpec((t.block_n, n_in // 2), index_map)
        absmax_spec = pl.BlockSpec((t.block_n, n_blocks_row), index_map)
    whole = lambda *_: (0,)  # small tables, the same for every program
    specs = [codes_spec, absmax_spec, pl.BlockSpec((16,), whole)]
    if qt.double_quant:
        specs += [pl.BlockSpec((256,), whole), pl.BlockSpec(qt.nested_absmax.shape, whole),
                  pl.BlockSpec((1,), whole)]
    return specs


def _scale_col_map(index_map, t: tiling.Tiles, qt: QuantizedTensor):
    """Column block index of absmax for the transpose kernel's in_features tile ``j``."""
    if t.block_k >= qt.blocksize:
        return index_map  # one scale column block per in_features tile
    per = qt.blocksize // t.block_k  # tiles per quantization block
    return lambda i, j: (0, j // per)


# --- kernels --------------------------------------------------------------------------------------


def _fwd_kernel(x_ref, codes_ref, absmax_ref, table_ref, *rest, t, qt_meta, double_quant, interpret):
    # x_ref (bm, in); codes_ref (bn, in / 2) u8; absmax_ref (bn, in / blocksize); out (bm, bn)
    *dq_refs, o_ref = rest
    n_in, blocksize, _, _ = qt_meta
    row0 = pl.program_id(1) * t.block_n

    def step(k, acc):
        col0 = k * t.block_k
        scales_col = col0 // blocksize
        w = _dequant_tile(
            codes_ref[:, pl.ds(pl.multiple_of(col0 // 2, t.block_k // 2), t.block_k // 2)],
            absmax_ref[:, pl.ds(scales_col, t.scales_per_tile)],
            table_ref, dq_refs, row0=row0, scales_col=scales_col, qt_meta=qt_meta,
            double_quant=double_quant, interpret=interpret, dtype=x_ref.dtype, via_stored=False,
        )  # (bn, bk)
        xk = x_ref[:, pl.ds(pl.multiple_of(col0, t.block_k), t.block_k)]  # (bm, bk)
        return acc + lax.dot_general(xk, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, n_in // t.block_k, step, jnp.zeros((t.block_m, t.block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_kernel(dy_ref, codes_ref, absmax_ref, table_ref, *rest, t, qt_meta, double_quant, interpret):
    # dy_ref (bm, out); codes_ref (out, bk / 2) u8; absmax_ref (out, scales_per_tile); out (bm, bk)
    *dq_refs, o_ref = rest
    _, blocksize, _, _ = qt_meta
    n_out = dy_ref.shape[1]
    col0 = pl.program_id(1) * t.block_k
    scales_col = col0 // blocksize

    def step(n, acc):
        row0 = n * t.block_n
        rows = pl.ds(pl.multiple_of(row0, t.block_n), t.block_n)
        w = _dequant_tile(
            codes_ref[rows, :], absmax_ref[rows, :], table_ref, dq_refs, row0=row0,
            scales_col=scales_col, qt_meta=qt_meta, double_quant=double_quant,
            interpret=interpret, dtype=dy_ref.dtype, via_stored=True,
        )  # (bn, bk)
        dyn = dy_ref[:, rows]  # (bm, bn)
        return acc + lax.dot_general(dyn, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, n_out // t.block_n, step, jnp.zeros((t.block_m, t.block_k), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dequant_tile(packed, absmax, table_ref, dq_refs, *, row0, scales_col, qt_meta, double_quant,
                  interpret, dtype, via_stored):
    """One weight tile, ``dtype(f32(table[code] * absmax))``: (bn, bk / 2) bytes -> (bn, bk).

    With `via_stored`, rounded to the weight's stored dtype first, then cast (``dtype(stored(...))``):
    bitsandbytes 0.50's backward, ``dequantize_4bit(W).to(grad.dtype)``; its forward dequantizes straight
    to the compute dtype. `jaxlora.qmatmul` has the same two orders.
    """
    n_in, blocksize, nested_blocksize, stored = qt_meta
    bn, half = packed.shape
    nb = absmax.shape[1]  # scales covering this tile: bk / blocksize, or 1 when bk < blocksize
    packed = packed.astype(jnp.int32)
    # bitsandbytes packs the first element of each pair in the HIGH nibble.
    idx = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(bn, 2 * half)
    values = table_ref[idx]  # (bn, bk) float32: a 16-entry gather (L1-resident on GPU)
    if double_quant:
        dynamic_ref, nested_ref, offset_ref = dq_refs
        # Flat block index of each scale, to find its nested block (blocks of 256 span rows).
        rows = row0 + lax.broadcasted_iota(jnp.int32, (bn, nb), 0)
        block = rows * (n_in // blocksize) + scales_col + lax.broadcasted_iota(jnp.int32, (bn, nb), 1)
        absmax = _two_rounding_mul_add(
            dynamic_ref[absmax.astype(jnp.int32)], nested_ref[block // nested_blocksize],
            offset_ref[0], interpret=interpret,
        )
    scale = jnp.broadcast_to(absmax[:, :, None], (bn, nb, 2 * half // nb)).reshape(bn, 2 * half)
    w = values * scale
    return (w.astype(stored) if via_stored else w).astype(dtype)


def _two_rounding_mul_add(a: jax.Array, b: jax.Array, c: jax.Array, *, interpret: bool) -> jax.Array:
    """``f32(f32(a * b) + c)``: round the product, then the sum; never a fused multiply-add.

    bitsandbytes rounds twice; one FMA rounding differs in ~8 % of double-quantized scales. On GPU,
    PTX ``mul.rn`` (an explicit rounding mode) is never contracted into an FMA by LLVM or ptxas. The
    interpreter runs through XLA CPU, whose LLVM contracts a multiply into an add only when the
    product has no other use; selecting the product on a never-true NaN test gives it one.
    """
    if interpret:
        p = a * b
        return jnp.where(jnp.isnan(p), p, p + c)  # == p + c, NaN included
    (p,) = pltriton.elementwise_inline_asm(
        "mul.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return p + c
