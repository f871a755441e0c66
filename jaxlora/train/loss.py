"""The causal-LM loss, whole or chunk by chunk over the sequence.

`chunked_causal_lm_loss` applies the output head to a chunk of positions at a time inside a scan whose body
is rematerialized, so the (batch, seq, vocab) float32 logits never exist, forward or backward: at most one
chunk's logits and their gradient do (Llama 3's 128k vocabulary at 8k tokens would be 4 GiB per row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Elements of one chunk's float32 logits (64 MiB): a 32k vocabulary takes 512 positions a chunk.
CHUNK_ELEMENTS = 1 << 24


def causal_lm_loss(
    logits: jax.Array,  # (batch, seq, vocab)
    input_ids: jax.Array,  # (batch, seq)
    loss_mask: jax.Array,  # (batch, seq) bool, aligned to targets
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the masked targets, and the number of those targets.

    Position t predicts token t+1, so the last logit and the first mask entry drop out (transformers'
    `ForCausalLMLoss` shifts the same way). Computed in float32 whatever the logits' dtype.
    """
    total, n = _summed(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])
    # max(n, 1): a batch with no target gives loss 0 rather than NaN.
    return total / jnp.maximum(n, 1.0), n


def _summed(logits, targets, mask) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def chunked_causal_lm_loss(
    head: Callable[[Any, jax.Array], jax.Array],  # (params, (batch, c, hidden)) -> (batch, c, vocab) logits
    params: Any,  # the head's parameters (a pytree)
    hidden: jax.Array,  # (batch, seq, hidden) final hidden states
    input_ids: jax.Array,  # (batch, seq)
    loss_mask: jax.Array,  # (batch, seq) bool, aligned to targets
    *,
    chunk: int | None = None,  # positions per chunk; default: CHUNK_ELEMENTS logits per chunk
) -> tuple[jax.Array, jax.Array]:
    """`causal_lm_loss(head(params, hidden), ...)` without forming all logits; equal to it up to float32
    summation order. The backward recomputes each chunk's logits from its hidden states (jax.checkpoint)."""
    b, t, _ = hidden.shape
    positions = t - 1
    probe = jax.ShapeDtypeStruct((b, 1, hidden.shape[-1]), hidden.dtype)
    params = _stop_unread(head, params, probe)
    if chunk is None:
        vocab = jax.eval_shape(head, params, probe).shape[-1]
        chunk = max(16, CHUNK_ELEMENTS // (b * vocab))
    chunk = min(chunk, positions)
    n_chunks = -(-positions // chunk)
    pad = n_chunks * chunk - positions

    def blocks(x):  # (batch, positions, ...) -> (n_chunks, batch, chunk, ...), padding masked out
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    xs = (blocks(hidden[:, :-1]), blocks(input_ids[:, 1:]), blocks(loss_mask[:, 1:]))

    @jax.checkpoint
    def body(carry, x):
        # The barrier makes the head's weights a per-chunk value: XLA would otherwise hoist their
        # conversion out of the loop (a float32 copy of the whole head on the CPU, forward and backward).
        (h, targets, mask), p = jax.lax.optimization_barrier((x, params))
        total, n = _summed(head(p, h), targets, mask)
        return (carry[0] + total, carry[1] + n), None

    zero = jnp.zeros((), jnp.float32)
    (total, n), _ = jax.lax.scan(body, (zero, zero), xs)
    return total / jnp.maximum(n, 1.0), n


def _stop_unread(head: Callable, params: Any, probe: jax.ShapeDtypeStruct) -> Any:
    """`params` with `stop_gradient` on every leaf `head` does not read (their gradient through it is zero).
    The loop's backward carries a cotangent accumulator for each differentiated input; handed a whole model
    (the head is one of its modules), it would carry zeros shaped like every adapter of every layer, which
    XLA allocates at the top of the step (measured: 160 MiB at Llama-2-7B, live through the forward)."""
    leaves, treedef = jax.tree.flatten(params)
    jaxpr = jax.make_jaxpr(lambda leaves, h: head(jax.tree.unflatten(treedef, leaves), h))(leaves, probe).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    kept = [x if id(v) in read else jax.lax.stop_gradient(x) for x, v in zip(leaves, jaxpr.invars[:len(leaves)])]
    return jax.tree.unflatten(treedef, kept)
