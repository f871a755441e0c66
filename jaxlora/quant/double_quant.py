"""bitsandbytes' signed dynamic 8-bit blockwise codes, and the double quantization of absmax built on it.

Pure jnp on float32 arrays; every function here is traceable (shapes and options are static).
Three float32 effects that XLA would otherwise change are handled explicitly:

* XLA flushes subnormals to zero (FTZ/DAZ), so thresholds on tiny values are expressed as comparisons
  with 0 or on integer bit patterns;
* XLA may fuse ``a * b + c`` into one FMA (one rounding, where bitsandbytes rounds twice), so each
  such product passes through `_unfused` first;
* XLA does not reassociate float additions, so `torch_mean_f32` reproduces torch's summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.quant import codes as C

_F32 = jnp.float32


def _unfused(prod: jax.Array, guard: jax.Array) -> jax.Array:
    """`prod`, rounded to float32 before any later add.

    XLA fuses ``prod + c`` into one FMA (one rounding where bitsandbytes rounds twice). It removes
    optimization barriers, and LLVM folds an add into the arms of a select, so neither stops it. An
    integer round trip does: the bits of `prod` are XORed with a mask the compiler cannot prove zero,
    ``isnan(guard)``, where `guard` is a factor of `prod`. It is 0 unless `guard` is NaN, and then `prod`
    is NaN too and stays NaN with its lowest mantissa bit flipped. (The sign of `guard` would not do: a
    scale may be negative, e.g. bitsandbytes' test_dequantize_blockwise draws absmax from a normal.)
    """
    i32 = jnp.int32
    mask = jnp.isnan(guard).astype(i32)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(prod, i32) ^ mask, _F32)


# ---- torch's float32 sum, single-threaded (ATen SumKernel.cpp cascade_sum) --------------------------


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _fold(a: jax.Array) -> jax.Array:
    """Sequential left fold ((a0 + a1) + a2) + ... along axis 0 (a0 stands for 0 + a0: exact for >= 0)."""
    acc = a[0]
    for i in range(1, a.shape[0]):
        acc = acc + a[i]
    return acc


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """ATen multi_row_sum: rows (size, *streams) -> (*streams), a 4-level cascade of chunk sums."""
    size, streams = rows.shape[0], rows.shape[1:]
    zero = jnp.zeros(streams, _F32)
    p = max(4, _ceil_log2(size) // 4)
    step = 1 << p
    nchunks = size // step
    acc = [zero, zero, zero, zero]
    if nchunks:
        s0 = _fold(jnp.moveaxis(rows[: nchunks * step].reshape(nchunks, step, *streams), 1, 0))
        n1 = nchunks // step  # complete level-1 groups (flushed into level 2)
        if n1:
            s1 = _fold(jnp.moveaxis(s0[: n1 * step].reshape(n1, step, *streams), 1, 0))
            n2 = n1 // step
            if n2:
                s2 = _fold(jnp.moveaxis(s1[: n2 * step].reshape(n2, step, *streams), 1, 0))
                acc[3] = _fold(s2)
            if n1 - n2 * step:
                acc[2] = _fold(s1[n2 * step :])
        if nchunks - n1 * step:
            acc[1] = _fold(s0[n1 * step :])
    if size - nchunks * step:
        acc[0] = _fold(rows[nchunks * step :])
    return ((acc[0] + acc[1]) + acc[2]) + acc[3]


def _row_sum(items: jax.Array) -> jax.Array:
    """ATen row_sum: four interleaved accumulators (ILP), then leftovers into the first, then combine."""
    size = items.shape[0]
    si = size // 4
    if si:
        part = _multi_row_sum(items[: si * 4].reshape(si, 4, *items.shape[1:]))
        p0, rest = part[0], [part[1], part[2], part[3]]
    else:
        p0, rest = jnp.zeros(items.shape[1:], _F32), []
    for i in range(si * 4, size):
        p0 = p0 + items[i]
    for r in rest:
        p0 = p0 + r
    return p0


_LANES = 8  # ATen's sum kernel runs its AVX2 build (Vectorized<float> of 8) even on AVX512 CPUs


def torch_sum_f32(x: jax.Array) -> jax.Array:
    """float32 sum of a 1-D array in exactly the order torch CPU uses with ``torch.set_num_threads(1)``
    (or fewer than 32,768 elements): ATen's cascade sum over 8-lane vectors, 4-way ILP, scalar tail,
    then the lanes in order. torch splits larger inputs across threads, so its result then depends on
    the thread count; this reproduces the single-thread order. Assumes no -0.0 subtleties (absmax >= 0).
    """
    n = x.shape[0]
    if n < _LANES:
        return _row_sum(x)
    v = n // _LANES
    lanes = _row_sum(x[: v * _LANES].reshape(v, _LANES))
    total = jnp.zeros((), _F32)
    for k in range(v * _LANES, n):
        total = total + x[k]
    for lane in range(_LANES):
        total = total + lanes[lane]
    return total


def torch_mean_f32(x: jax.Array) -> jax.Array:
    """``torch.mean`` of a float32 1-D array on CPU, single-threaded: `torch_sum_f32` / float32(n)."""
    # XLA rewrites division by a constant into multiplication by its reciprocal (a second rounding);
    # the barrier hides the constant so the division stays a true division.
    n = jax.lax.optimization_barrier(jnp.asarray(x.shape[0], _F32))
    return torch_sum_f32(x) / n


# ---- x * (1 / absmax) when 1 / absmax is subnormal ------------------------------------------------------

_BIG = 2.0**126  # absmax >= 2^126 (~8.5e37): 1 / absmax is a subnormal float32, which XLA flushes to 0


def _odd_times_mantissa_below(odd: jax.Array, m: jax.Array) -> jax.Array:
    """``odd * m < 2^24`` exactly, for odd ints < 2^25 and float32 m in [1, 4): the 48-bit product
    ``odd * M`` (M m's 24-bit integer mantissa) against ``2^(47 - e)``, in 12-bit limbs of int32."""
    i32 = jnp.int32
    bits = jax.lax.bitcast_convert_type(m, i32)
    e = (bits >> 23) - 127  # 0 or 1
    mant = (bits & 0x7FFFFF) | 0x800000
    ah, al, mh, ml = odd >> 12, odd & 0xFFF, mant >> 12, mant & 0xFFF
    mid = ah * ml + al * mh  # < 2^26
    lo = al * ml + ((mid & 0xFFF) << 12)  # < 2^25
    hi = ah * mh + (mid >> 12) + (lo >> 24)  # the product is hi * 2^24 + (lo & 0xFFFFFF)
    return hi < (i32(1) << (23 - e))  # equality is impossible: odd * M is never a power of two past 1


def times_reciprocal(x: jax.Array, absmax: jax.Array) -> jax.Array:
    """``f32(x * f32(1 / absmax))`` per block (x (nblocks, blocksize), absmax (nblocks,)) with IEEE
    subnormals, as bitsandbytes' CPU code computes it; XLA flushes a subnormal ``1 / absmax`` to 0.

    For absmax >= 2^126 the reciprocal is k * 2^-149 with k = round(2^149 / absmax), an integer < 2^24:
    k is found from a float32 estimate and an exact integer test of the two half-way points, and the
    product is formed as ``(x * 2^-64) * (k * 2^-85)``, two normal factors with one rounding. In those
    blocks a product that is itself subnormal comes back as ±2^-126 (see below): equal codes, not bits.
    """
    inv = (1.0 / absmax)[:, None]
    big = (absmax >= _BIG) & (absmax < jnp.inf)
    m = jnp.where(big, absmax, _BIG) * _F32(2.0**-126)  # [1, 4), exact
    c = jnp.round(_F32(2.0**23) / m)  # within 1 of round(2^23 / m): the quotient is off by <= 1/4
    ci = c.astype(jnp.int32)
    up = _odd_times_mantissa_below(2 * ci + 1, m)  # 2^23 / m > c + 1/2
    down = ~_odd_times_mantissa_below(2 * ci - 1, m)  # 2^23 / m < c - 1/2
    k = (ci + up.astype(jnp.int32) - down.astype(jnp.int32)).astype(_F32)
    # The power-of-two scalings are done on the exponent bits: XLA would fold float constants into one
    # 2^-149 factor, which flushes to 0. |x| < 2^-62 would scale to a subnormal: such x give a 0 anyway.
    x_small = jnp.where(jnp.abs(x) >= _F32(2.0**-62), _shift_exponent(x, -64), _F32(0) * x)
    emulated = x_small * _shift_exponent(k, -85)[:, None]
    # A product that IEEE keeps as a nonzero subnormal (|x| k > 1/2, in units of 2^-149) flushes to 0
    # here; ±2^-126 stands in for it: every code table compares such values only with 0 and with
    # thresholds far above 2^-126 (FP4's sign-of-zero code tells +subnormal from 0), so codes agree.
    kept = (emulated == 0) & (jnp.abs(x) * k[:, None] > 0.5)
    emulated = jnp.where(kept, jnp.where(x > 0, _F32(2.0**-126), _F32(-(2.0**-126))), emulated)
    return jnp.where(big[:, None], emulated, x * inv)


def _shift_exponent(v: jax.Array, by: int) -> jax.Array:
    """v * 2^by for normal v whose result is normal, as an integer add on the exponent field."""
    i32 = jnp.int32
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, i32) + i32(by << 23), _F32)


# ---- signed dynamic 8-bit blockwise codes -------------------------------------------------------------


def _blocks(x: jax.Array, blocksize: int) -> jax.Array:
    """(n,) -> (nblocks, blocksize), the last block padded with zeros (which never raise a max)."""
    n = x.shape[0]
    nb = -(-n // blocksize)
    return jnp.pad(x, (0, nb * blocksize - n)).reshape(nb, blocksize)


def _codes8_cpu(v: jax.Array) -> jax.Array:
    """csrc/cpu_ops.cpp: clamp to [-1, 1], then the 65,536-bin lookup table (not exact nearest)."""
    v = jnp.clip(v, -1.0, 1.0)
    t = (v + 1.0) * 0.5
    j = (_unfused(t * _F32(C.LUT_SIZE - 1), t) + 0.5).astype(jnp.int32)  # trunc, as static_cast
    return jnp.asarray(C.cpu_dynamic8_lut())[j]


def _codes8_cuda(x: jax.Array) -> jax.Array:
    """csrc/kernels.cu dQuantize<0>: a 7-step binary search over the sorted map, then a midpoint test.
    Emulated step for step (including its tie rules) rather than as a nearest-value search."""
    code = jnp.asarray(C.DYNAMIC8)
    pivot = jnp.full(x.shape, 127, jnp.int32)
    lower_p, upper_p = jnp.zeros_like(pivot), jnp.full_like(pivot, 255)
    lower, upper = jnp.full_like(x, -1.0), jnp.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lower_p, lower = jnp.where(gt, pivot, lower_p), jnp.where(gt, val, lower)
        upper_p, upper = jnp.where(gt, upper_p, pivot), jnp.where(gt, upper, val)
        pivot = jnp.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = jnp.where(upper_p == 255, code[255], upper)
    lower = jnp.where(lower_p == 0, code[0], lower)
    up = jnp.where(x > (upper + val) * 0.5, upper_p, pivot)
    down = jnp.where(x < (lower + val) * 0.5, lower_p, pivot)
    return jnp.where(x > val, up, down).astype(jnp.uint8)


def quantize_dynamic8(x: jax.Array, blocksize: int, backend: str) -> tuple[jax.Array, jax.Array]:
    """(n,) float32 -> (codes uint8 (n,), absmax float32 (nblocks,)), bitsandbytes' quantize_blockwise.

    absmax = max|x| per block over the valid items, stored unclamped. An all-zero block gets codes 0 on
    both backends (CPU tests for it; CUDA computes 0 * (1/0) = NaN, which its search sends to 0).
    """
    n = x.shape[0]
    xb = _blocks(x, blocksize)
    absmax = jnp.max(jnp.abs(xb), axis=1)
    if backend == "cpu":
        q = jnp.where((absmax == 0)[:, None], jnp.uint8(0), _codes8_cpu(times_reciprocal(xb, absmax)))
    else:  # CUDA's fast-math reciprocal flushes a subnormal 1 / absmax to 0, as XLA does
        q = _codes8_cuda(xb * (1.0 / absmax)[:, None])
    return q.reshape(-1)[:n], absmax


def dequantize_dynamic8(q: jax.Array, absmax: jax.Array, blocksize: int) -> jax.Array:
    """(n,) uint8 codes -> (n,) float32 = f32(map[q] * absmax[i // blocksize]), unfused."""
    n = q.shape[0]
    vals = _blocks(jnp.asarray(C.DYNAMIC8)[q], blocksize)
    out = _unfused(vals * absmax[:, None], absmax[:, None])
    return out.reshape(-1)[:n]


# ---- double quantization of absmax (bitsandbytes functional.quantize_4bit, compress_statistics) -------


def quantize_absmax(absmax: jax.Array, nested_blocksize: int, backend: str):
    """absmax (nblocks,) f32 -> (qabsmax uint8, nested_absmax f32, offset f32 scalar).

    offset = torch.mean(absmax) (single-threaded CPU order, see `torch_mean_f32`); the codes are the
    dynamic 8-bit quantization of f32(absmax - offset) in blocks of `nested_blocksize`.
    """
    offset = torch_mean_f32(absmax)
    q, nested = quantize_dynamic8(absmax - offset, nested_blocksize, backend)
    return q, nested, offset


def dequantize_absmax(q: jax.Array, nested_absmax: jax.Array, offset: jax.Array, nested_blocksize: int):
    """f32(f32(map[q] * nested_absmax[i // 256]) + offset): two roundings, as bitsandbytes does."""
    return dequantize_dynamic8(q, nested_absmax, nested_blocksize) + offset


__all__ = [
    "times_reciprocal",
    "torch_sum_f32",
    "torch_mean_f32",
    "quantize_dynamic8",
    "dequantize_dynamic8",
    "quantize_absmax",
    "dequantize_absmax",
]
