"""A scan over layers that saves only each layer's input for the backward pass (gradient checkpointing).

``jax.checkpoint`` around a scanned body keeps the same boundaries, but as the scan's own residuals: XLA
then owns their dtype and place, and on the CPU it keeps a float32 copy of the whole bf16 stack (measured:
+1 GiB at Llama-2-7B, seq 2048) and cannot move it to host memory. `remat_scan` is the same algorithm with
the boundaries in our hands (`jax.custom_vjp`): stored as raw 16-bit words, or in pinned host memory, and
each layer recomputed with `jax.vjp` in a reverse scan.

Pure JAX: a layer is ``step(h, diff_i, rest_i, consts) -> (h, aux_i)``; gradients flow to `h` and `diff`
(the trainable leaves), `rest` (frozen weights, RNG streams) and `consts` (rotary tables, masks) get none.
`aux` is a non-differentiable output per layer (the advanced RNG streams).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_WORDS = {2: jnp.uint16, 4: jnp.uint32}


def to_words(x: jax.Array) -> jax.Array:
    """x's bits as unsigned integers of its width. An array kept across a loop as raw words stays in its
    dtype: XLA's CPU backend computes bf16 in float32 and otherwise converts (and holds) whole saved arrays
    as float32, a conversion it cannot move through a bitcast."""
    return jax.lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize])


def from_words(words: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(words, dtype)


def _store(h: jax.Array, offload: bool) -> jax.Array:
    words = to_words(h)
    return jax.device_put(words, jax.memory.Space.Host) if offload else words


def _load(words: jax.Array, dtype, offload: bool) -> jax.Array:
    if offload:
        words = jax.device_put(words, jax.memory.Space.Device)
    return from_words(words, dtype)


def _no_cotangent(tree):
    def zero(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def remat_scan(step: Callable, h: jax.Array, diff: Any, rest: Any, consts: Any, *, offload: bool = False):
    """``scan(step)`` over the leading axis of `diff` and `rest`; returns (h_out, stacked aux).

    The backward keeps one layer input per layer (bf16: 2 bytes per activation) and recomputes the layer."""
    dtype = h.dtype

    @jax.custom_vjp
    def run(h, diff, rest, consts):
        return jax.lax.scan(lambda h, x: step(h, *x, consts), h, (diff, rest))

    def fwd(h, diff, rest, consts):
        def body(h, x):
            out, aux = step(h, *x, consts)
            return out, (aux, _store(h, offload))

        out, (aux, saved) = jax.lax.scan(body, h, (diff, rest))
        return (out, aux), (saved, diff, rest, consts)

    def bwd(res, cotangent):
        saved, diff, rest, consts = res
        g, _ = cotangent  # aux (RNG streams) has no cotangent worth the name

        def body(dh, x):
            words, d_i, r_i = x
            h_in = _load(words, dtype, offload)
            _, vjp = jax.vjp(lambda h, d: step(h, d, r_i, consts)[0], h_in, d_i)
            dh_in, dd = vjp(dh)
            return dh_in, dd

        dh, ddiff = jax.lax.scan(body, g, (saved, diff, rest), reverse=True)
        return dh, ddiff, _no_cotangent(rest), _no_cotangent(consts)

    run.defvjp(fwd, bwd)
    return run(h, diff, rest, consts)


def checkpoint_scan(step: Callable, h: jax.Array, diff: Any, rest: Any, consts: Any, *, policy=None):
    """``scan(step)`` with autodiff's own residuals; `policy` (a jax.checkpoint policy) rematerializes."""
    fn = functools.partial(_apply, step, consts)
    if policy is not None:
        fn = jax.checkpoint(fn, policy=policy, prevent_cse=False)
    return jax.lax.scan(fn, h, (diff, rest))


def _apply(step, consts, h, x):
    return step(h, *x, consts)
