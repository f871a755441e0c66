"""Boundary checks for the quantization API: each bad input raises ValueError naming the bad value
and what is valid."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant.tensor import BLOCKSIZES

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16))
BACKENDS = ("cpu", "cuda")


def _is_int(v) -> bool:
    # 64.0 == 64, so `in BLOCKSIZES` alone would let a float through to fail inside jax.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_options(*, blocksize, quant_type, bnb_backend, four_bit: bool) -> None:
    if not _is_int(blocksize) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    valid_types = ("nf4", "fp4") if four_bit else ("dynamic8",)
    if quant_type not in valid_types:
        raise ValueError(f"quant_type must be one of {valid_types}, got {quant_type!r}")
    if bnb_backend not in BACKENDS:
        raise ValueError(f"bnb_backend must be one of {BACKENDS}, got {bnb_backend!r}")


def check_weight(w, what: str = "weight") -> None:
    """A float32/float16/bfloat16 array with at least one element."""
    dtype = getattr(w, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES:
        names = ", ".join(d.name for d in FLOAT_DTYPES)
        raise ValueError(f"{what} dtype must be one of {names}, got {dtype}")
    if int(np.prod(w.shape)) == 0:
        raise ValueError(f"{what} must have at least one element, got shape {tuple(w.shape)}")


def check_finite(w, what: str = "weight") -> None:
    """When `w` is concrete, raise if it holds NaN or Inf; a traced `w` cannot be checked."""
    if isinstance(w, jax.core.Tracer):
        return
    bad = ~np.isfinite(np.asarray(w, dtype=np.float32).reshape(-1))
    if bad.any():
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite values (first at flat index {int(np.argmax(bad))}); "
            "pass allow_non_finite=True to quantize them as bitsandbytes would"
        )
