"""A scan over layers that saves only layer inputs for the backward pass (gradient checkpointing): each
layer's, or every k-th one's (nested: a group's backward re-runs its layers from its first input).

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

from jaxlora.scheduling import zeros_after

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


def remat_scan(step: Callable, h: jax.Array, diff: Any, rest: Any, consts: Any, *, offload: bool = False,
               group: int = 1):
    """``scan(step)`` over the leading axis of `diff` and `rest`; returns (h_out, stacked aux).

    The backward keeps the input of every `group`-th layer (bf16: 2 bytes per activation). Each group's
    backward first re-runs its first ``group - 1`` layers from that input, keeping their inputs, then goes
    back through the group one layer at a time (`jax.vjp` of the layer). group=1 keeps every layer's input
    and re-runs nothing but the layer itself; a larger group keeps ``layers / group + group`` inputs at a
    time, at the cost of up to one more forward pass of each layer."""
    dtype, layers = h.dtype, jax.tree.leaves((diff, rest))[0].shape[0]
    full, tail = divmod(layers, group)  # `full` groups of `group` layers, then one of `tail` layers

    def layer(tree, i):  # indexed inside the loops: slicing a group out of the stack would copy its weights
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)

    def run_group(h, start, size, diff, rest, consts):
        return jax.lax.scan(lambda h, j: step(h, *layer((diff, rest), start + j), consts), h, jnp.arange(size))

    def back_group(dh, grads, words, start, size, diff, rest, consts):
        h = _load(words, dtype, offload)

        def forward(h, j):  # the inputs of the group's later layers, from the one kept (none for size 1)
            out, _ = step(h, *layer((diff, rest), start + j), consts)
            return out, to_words(out)

        _, later = jax.lax.scan(forward, h, jnp.arange(size - 1))
        inputs = jnp.concatenate([to_words(h)[None], later])

        def body(carry, x):
            (dh, grads), (words, j) = carry, x
            d_i, r_i = layer((diff, rest), start + j)
            _, vjp = jax.vjp(lambda h, d: step(h, d, r_i, consts)[0], from_words(words, dtype), d_i)
            dh, dd = vjp(dh)
            grads = jax.tree.map(lambda a, g: jax.lax.dynamic_update_index_in_dim(a, g, start + j, 0), grads, dd)
            return (dh, grads), None

        return jax.lax.scan(body, (dh, grads), (inputs, jnp.arange(size)), reverse=True)[0]

    def join(per_group, per_tail):  # (full, group, ...) and (tail, ...) stacks as one (layers, ...) stack
        flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), per_group)
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), flat, per_tail) if tail else flat

    @jax.custom_vjp
    def run(h, diff, rest, consts):
        return jax.lax.scan(lambda h, x: step(h, *x, consts), h, (diff, rest))

    def fwd(h, diff, rest, consts):
        def body(h, start):
            out, aux = run_group(h, start, group, diff, rest, consts)
            return out, (aux, _store(h, offload))

        out, (aux, saved) = jax.lax.scan(body, h, jnp.arange(full) * group)
        kept = tail_aux = None
        if tail:
            kept = _store(out, offload)
            out, tail_aux = run_group(out, full * group, tail, diff, rest, consts)
        return (out, join(aux, tail_aux)), (saved, kept, diff, rest, consts)

    def bwd(res, cotangent):
        saved, kept, diff, rest, consts = res
        g, _ = cotangent  # aux (RNG streams) has no cotangent worth the name
        # Each layer's gradient is written into one (layers, ...) stack as the backward reaches it (not
        # stacked by the scans and joined: a second copy of all adapter gradients).
        grads = zeros_after(g, diff)
        if tail:
            g, grads = back_group(g, grads, kept, full * group, tail, diff, rest, consts)

        def body(carry, x):
            words, start = x
            return back_group(*carry, words, start, group, diff, rest, consts), None

        (dh, grads), _ = jax.lax.scan(body, (g, grads), (saved, jnp.arange(full) * group), reverse=True)
        return dh, grads, _no_cotangent(rest), _no_cotangent(consts)

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
