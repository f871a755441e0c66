"""Blockwise 4-bit (NF4 / FP4) and 8-bit (dynamic map) quantization, byte-identical to bitsandbytes:
``quantize(w, config) -> QuantizedTensor`` and ``dequantize(qt, dtype)``.

``bnb_backend`` picks which bitsandbytes backend's bytes to reproduce where they differ:

==========================  =====================================  ===================================
                            "cpu" (verified against bnb 0.50.2)    "cuda" (read from csrc/kernels.cu)
==========================  =====================================  ===================================
4-bit scale, full blocks    x * f32(1 / max(absmax, 1e-38)), clip  x * f32(1 / absmax), no clip
4-bit tail block            x / max(absmax, 1e-38); the clamped    x * f32(1 / absmax); absmax stored
                            absmax is stored (0 -> 0x006ce3ee)     as is
all-zero block              codes of 0.0 (NF4 0x77)                NaN -> code 0 (0x00)
4-bit code choice           bucketize on table midpoints           decision tree on float literals
FP4 sign of zero            0 < x <= 0.0026 -> code 8, <= 0 -> 0   sign bit = (x < 0)
NaN code                    15 (NF4)                               0
8-bit code choice           65,536-bin lookup table                binary search + midpoint
==========================  =====================================  ===================================

CUDA is built with ``--use_fast_math``: its ``1.0f / absmax`` is an approximate reciprocal, which this
emulates with the correctly rounded one, so "cuda" bytes can differ where the product lands on a
threshold (rare; unverified without a GPU). XLA flushes subnormal float32 to zero, as does CUDA fast
math, but bitsandbytes' CPU path does not: a block whose absmax is subnormal (< 1.2e-38) quantizes
as all-zero here on both backends. Double quantization's offset is torch's single-threaded CPU mean
(`double_quant.torch_mean_f32`) for both backends; torch's CUDA mean sums in another order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant import codes as C
from jaxlora.quant import double_quant as DQ
from jaxlora.quant.config import QuantConfig
from jaxlora.quant.tensor import NESTED_BLOCKSIZE, QuantizedTensor, check_quant_storage

_F32 = jnp.float32
_TINY = np.float32(1e-38)  # bitsandbytes' absmax clamp; a subnormal float32 (bits 0x006ce3ee)
_INV_TINY = np.float32(1) / _TINY  # f32(1 / 1e-38), computed here because XLA would flush 1e-38 to 0


def _count_above(s: jax.Array, thresholds: np.ndarray, nan_high: bool) -> jax.Array:
    """#{i : s > t[i]} as uint8; with `nan_high`, NaN counts as above every threshold (torch.bucketize)."""
    q = jnp.zeros(s.shape, jnp.uint8)
    for t in thresholds:
        above = ~(s <= t) if nan_high else s > t
        q = q + above.astype(jnp.uint8)
    return q


def _codes4(s: jax.Array, quant_type: str, backend: str) -> jax.Array:
    """Scaled values -> 4-bit codes (uint8 in 0..15), the way `backend` picks them."""
    if backend == "cpu":
        q = _count_above(s, C.cpu_4bit_thresholds(quant_type), nan_high=True)
        return q if quant_type == "nf4" else jnp.asarray(C.FP4_CPU_ORDER)[q]
    if quant_type == "nf4":
        return _count_above(s, C.NF4_CUDA_THRESHOLDS, nan_high=False)
    mag = jnp.asarray(C.FP4_CUDA_MAG_CODES)[_count_above(jnp.abs(s), C.FP4_CUDA_MAG_THRESHOLDS, False)]
    return mag | jnp.where(s < 0, jnp.uint8(8), jnp.uint8(0))


def _pack(q: jax.Array) -> jax.Array:
    """(2k,) codes -> (k,) bytes, the first element in the high nibble."""
    q = q.reshape(-1, 2)
    return (q[:, 0] << 4) | q[:, 1]


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type", "compress", "backend"))
def _quantize_4bit(w, *, blocksize, quant_type, compress, backend):
    x = w.reshape(-1).astype(_F32)
    n = x.shape[0]
    nfull, rem = divmod(n, blocksize)
    packed, absmax = [], []
    if nfull:
        xf = x[: nfull * blocksize].reshape(nfull, blocksize)  # (nfull, blocksize)
        am = jnp.max(jnp.abs(xf), axis=1)
        if backend == "cpu":
            # x * f32(1 / max(am, 1e-38)), with a subnormal reciprocal (am >= 2^126) kept as bitsandbytes keeps it
            scaled = DQ.times_reciprocal(xf, am)
            s = jnp.clip(jnp.where((am == 0)[:, None], xf * _INV_TINY, scaled), -1.0, 1.0)
        else:
            s = xf * (1.0 / am)[:, None]
        packed.append(_pack(_codes4(s, quant_type, backend)))
        absmax.append(am)
    if rem:
        xt = x[nfull * blocksize :]
        xt_padded = jnp.pad(xt, (0, rem % 2))  # an odd count is padded with one 0.0 element
        am = jnp.max(jnp.abs(xt))
        if backend == "cpu":
            # max(am, 1e-38) on the bit pattern: the clamp survives XLA's denormal flushing.
            bits = jnp.maximum(jax.lax.bitcast_convert_type(am, jnp.int32), int(_TINY.view(np.int32)))
            stored = jax.lax.bitcast_convert_type(bits, _F32)
            s = jnp.where(am == 0, jnp.zeros_like(xt_padded), jnp.clip(xt_padded / am, -1.0, 1.0))
        else:
            stored = am
            s = xt_padded * (1.0 / am)
        packed.append(_pack(_codes4(s, quant_type, backend)))
        absmax.append(stored[None])
    codes = jnp.concatenate(packed) if len(packed) > 1 else packed[0]
    absmax = jnp.concatenate(absmax) if len(absmax) > 1 else absmax[0]
    if not compress:
        return codes, absmax, None, None
    q, nested, offset = DQ.quantize_absmax(absmax, NESTED_BLOCKSIZE, backend)
    return codes, q, nested, offset


def quantize(w: jax.Array, config: QuantConfig, *, allow_non_finite: bool = False) -> QuantizedTensor:
    """Quantize `w` (any shape, float32/float16/bfloat16) as `config` says: to 4 bits ("nf4", "fp4") or
    bitsandbytes' 8-bit map ("dynamic8") in blocks, with the bytes of bitsandbytes' ``quantize_4bit`` /
    ``quantize_blockwise`` on ``config.bnb_backend`` (see the module docstring). The one way jaxlora
    quantizes; the result records `config`, so ``quantize(w2, qt.config)`` re-quantizes alike.

    With ``config.double_quant``, absmax is double-quantized: its offset is torch's float32 mean,
    reproduced in torch's single-threaded CPU summation order (``torch.set_num_threads(1)``; with more
    threads torch splits inputs of >= 32,768 blocks and its offset can differ by an ulp).

    Non-finite weights: when `w` is concrete, NaN/Inf raise ValueError (count and first flat index)
    unless `allow_non_finite`; under tracing nothing is checked and the backend's arithmetic decides
    (CPU: a NaN block codes as 15 (NF4), an Inf absmax scales finite values to 0).

    >>> qt = quantize(jnp.ones((4, 32), jnp.bfloat16), QuantConfig(double_quant=False))
    >>> qt.codes.shape, qt.absmax.shape, qt.dtype
    ((64,), (2,), dtype(bfloat16))
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {config!r}")
    _check_weight(w)
    if config.bits == 4:
        check_quant_storage(config.quant_storage, (math.prod(w.shape) + 1) // 2)
    if not allow_non_finite:
        _check_finite(w)
    if config.bits == 8:
        codes, absmax = _quantize_blockwise(w, blocksize=config.blocksize, backend=config.bnb_backend)
        nested = offset = None
    else:
        codes, absmax, nested, offset = _quantize_4bit(w, blocksize=config.blocksize, quant_type=config.quant_type,
                                                       compress=config.double_quant, backend=config.bnb_backend)
    return QuantizedTensor(codes, absmax, nested, offset, tuple(w.shape), np.dtype(w.dtype), config)


@functools.partial(jax.jit, static_argnames=("numel", "blocksize", "quant_type", "dtype"))
def _dequantize_4bit(codes, absmax, nested, offset, *, numel, blocksize, quant_type, dtype):
    if nested is not None:
        absmax = DQ.dequantize_absmax(absmax, nested, offset, NESTED_BLOCKSIZE)
    # One gather per byte from a (256, 2) table of both nibbles' values: on XLA:CPU 1.3x faster than
    # unpacking two codes and gathering each (benchmarks/results/2026-12-02_profile.md). Any byte is a
    # valid row, so the gather needs no bounds clamping (measurably faster).
    vals = jnp.asarray(C.byte_table(quant_type)).at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")
    vals = vals.reshape(-1)
    nb = absmax.shape[0]
    if vals.shape[0] != nb * blocksize:
        vals = jnp.pad(vals[:numel], (0, nb * blocksize - numel))
    vals = vals.reshape(nb, blocksize)
    return (vals * absmax[:, None]).reshape(-1)[:numel].astype(dtype)


@functools.partial(jax.jit, static_argnames=("blocksize", "backend"))
def _quantize_blockwise(x, *, blocksize, backend):
    return DQ.quantize_dynamic8(x.reshape(-1).astype(_F32), blocksize, backend)


@functools.partial(jax.jit, static_argnames=("blocksize", "dtype"))
def _dequantize_blockwise(q, absmax, *, blocksize, dtype):
    return DQ.dequantize_dynamic8(q, absmax, blocksize).astype(dtype)


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """`qt` back to an array of ``qt.shape``: cast(dtype, f32(code_value * absmax)), one rounding (with
    double quantization, absmax is first rebuilt as bitsandbytes does). `dtype` defaults to the dtype
    `qt` was quantized from.

    The result equals bitsandbytes' dequantize_4bit / dequantize_blockwise of the same bytes (its AVX512
    4-bit kernel, which indexes absmax per row for some shapes, excepted: this uses the flat block
    index, which is what the format means)."""
    qt.validate()
    dtype = np.dtype(qt.dtype if dtype is None else dtype)
    _check_weight(jax.ShapeDtypeStruct((1,), dtype), what="dtype")
    if qt.bits == 8:
        out = _dequantize_blockwise(qt.codes, qt.absmax, blocksize=qt.blocksize, dtype=dtype)
    else:
        out = _dequantize_4bit(
            qt.codes, qt.absmax, qt.nested_absmax, qt.offset,
            numel=qt.numel, blocksize=qt.blocksize, quant_type=qt.quant_type, dtype=dtype,
        )  # fmt: skip
    return out.reshape(qt.shape)


FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16))


def _check_weight(w, what: str = "weight") -> None:
    """A float32/float16/bfloat16 array with at least one element."""
    dtype = getattr(w, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES:
        names = ", ".join(d.name for d in FLOAT_DTYPES)
        raise ValueError(f"{what} dtype must be one of {names}, got {dtype}")
    if int(np.prod(w.shape)) == 0:
        raise ValueError(f"{what} must have at least one element, got shape {tuple(w.shape)}")


def _check_finite(w, what: str = "weight") -> None:
    """When `w` is concrete, raise if it holds NaN or Inf; a traced `w` cannot be checked."""
    if isinstance(w, jax.core.Tracer):
        return
    bad = ~np.isfinite(np.asarray(w, dtype=np.float32).reshape(-1))
    if bad.any():
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite values (first at flat index {int(np.argmax(bad))}); "
            "pass allow_non_finite=True to quantize them as bitsandbytes would"
        )
