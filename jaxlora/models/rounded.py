"""A matmul in the operands' own dtype, written so XLA's CPU backend never makes a float32 copy of them.

For bf16 operands a plain ``jnp.matmul`` is computed by XLA's CPU backend as a float32 dot: it converts
both operands to float32 first, and for the output head that copy is the whole (hidden, vocab) matrix
(500 MiB at Llama-2-7B shapes, once in every chunk of the chunked loss, forward and backward). A dot with
bf16 operands and a float32 result runs natively; rounding that result to bf16 gives the numbers of the
plain bf16 matmul (float32 accumulation, one rounding: what torch and XLA's own upcast compute). The
custom VJP keeps the backward in the same form: JAX's own transpose of a dot with a float32 result would
upcast the other operand to float32 again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]], dtype) -> jax.Array:
    out = jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)
    return out.astype(dtype)


@jax.custom_vjp
def rounded_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., in) @ w (in, out) -> (..., out) in their common dtype: float32 accumulation, one rounding."""
    return _dot(x, w, ((x.ndim - 1,), (0,)), x.dtype)


def _fwd(x, w):
    return rounded_matmul(x, w), (x, w)


def _bwd(res, g):  # g (..., out) in the output's dtype
    x, w = res
    dx = _dot(g, w, ((g.ndim - 1,), (1,)), x.dtype)
    batch = tuple(range(x.ndim - 1))  # dw sums over every leading axis of x and g
    dw = _dot(x, g, (batch, batch), w.dtype)
    return dx, dw


rounded_matmul.defvjp(_fwd, _bwd)


def rounded_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nnx.Linear`'s ``dot_general`` argument: its one contraction (last axis of lhs with the first of
    rhs) as `rounded_matmul`; anything else, or operands of different dtypes, goes to `lax.dot_general`."""
    (contract_l, contract_r), batch = dimension_numbers
    if (tuple(contract_l) == (lhs.ndim - 1,) and tuple(contract_r) == (0,) and batch == ((), ()) and rhs.ndim == 2
            and lhs.dtype == rhs.dtype and preferred_element_type in (None, lhs.dtype) and not kwargs.get("out_sharding")):
        return rounded_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
