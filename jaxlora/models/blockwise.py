"""Blockwise (online-softmax) attention: FlashAttention's algorithm in plain jnp, forward and backward.

The eager path (`attention.grouped_attention`) materializes float32 scores of (batch, heads, q, kv): 512 MiB
per layer for 32 heads at 2048 tokens, and autodiff keeps them for the backward. Here queries and keys are
cut into blocks; each block of scores is formed, folded into a running max / sum / output (Milakov &
Gimelshein's online softmax) and dropped. The backward (`jax.custom_vjp`) keeps only the output and the
per-row log-sum-exp and recomputes each block of scores (FlashAttention-2, Dao 2023, algorithm 2), so no
(q, kv) array of any layer outlives its block.

The mask is built per block from the same inputs as `attention.attention_mask_matrix` (query slots, segment
ids, sliding window), so causal, padding, packed segments and Mistral's window all hold. A fully masked
query row (a pad) gets the uniform average of the values, as the eager path's finfo.min fill gives it; no
real token reads it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.scan import from_words, to_words
from jaxlora.scheduling import zeros_after

_NEG = float(jnp.finfo(jnp.float32).min)  # the eager path's fill, so masked rows agree


def _pad_to(x: jax.Array, axis: int, n: int) -> jax.Array:
    width = [(0, 0)] * x.ndim
    width[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, width)


def _block_mask(q_slots, q_seg, k_slots, k_seg, window):  # -> (batch, 1, 1, bq, bk) bool
    """q_slots (bq,), q_seg (batch, bq), k_slots (bk,), k_seg (batch, bk): `attention_mask_matrix` on a block."""
    allowed = k_slots[None, :] <= q_slots[:, None]
    if window is not None:
        allowed = allowed & (k_slots[None, :] > q_slots[:, None] - window)
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    return allowed[None, None, None] & same[:, None, None]


def _masked(s: jax.Array, mask: jax.Array) -> jax.Array:
    # The barrier ties the block's mask to its scores: XLA would otherwise hoist every block's mask out of
    # the loops and materialize all of them, broadcast over heads (128 MiB at 2048 tokens and 32 heads).
    s, mask = jax.lax.optimization_barrier((s, mask))
    return jnp.where(mask, s, _NEG)


def _layout(q, k, v, q_slots, q_segments, kv_segments, block_q, block_k):
    """Blocks first: q (nq, batch, kv_heads, groups, bq, d); k, v (nk, batch, kv_heads, bk, d); slots and
    segments per block. Padding (to whole blocks) is segment 0, so it is masked."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    qb = _q_blocks(q, kvh, block_q)
    kb = _pad_to(k, 1, nk * block_k).reshape(b, nk, block_k, kvh, d).transpose(1, 0, 3, 2, 4)
    vb = _pad_to(v, 1, nk * block_k).reshape(b, nk, block_k, kvh, d).transpose(1, 0, 3, 2, 4)
    qs = _pad_to(q_slots, 0, nq * block_q).reshape(nq, block_q)
    qseg = _pad_to(q_segments, 1, nq * block_q).reshape(b, nq, block_q).transpose(1, 0, 2)
    ks = jnp.arange(nk * block_k, dtype=jnp.int32).reshape(nk, block_k)
    kseg = _pad_to(kv_segments, 1, nk * block_k).reshape(b, nk, block_k).transpose(1, 0, 2)
    return qb, kb, vb, qs, qseg, ks, kseg


def _q_blocks(x: jax.Array, kv_heads: int, block_q: int) -> jax.Array:
    """(batch, tq, heads, d) -> (nq, batch, kv_heads, groups, bq, d), padded to whole blocks."""
    b, tq, h, d = x.shape
    nq = -(-tq // block_q)
    return _pad_to(x, 1, nq * block_q).reshape(b, nq, block_q, kv_heads, h // kv_heads, d).transpose(1, 0, 3, 4, 2, 5)


def _unlayout_q(x: jax.Array, tq: int) -> jax.Array:
    """(nq, batch, kv_heads, groups, bq, d) -> (batch, tq, heads, d)."""
    nq, b, kvh, g, bq, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, kvh * g, d)[:, :tq]


def _forward(q, k, v, q_slots, q_segments, kv_segments, window, block_q, block_k):
    b, tq, h, d = q.shape
    scale = d ** -0.5
    qb, kb, vb, qs, qseg, ks, kseg = _layout(q, k, v, q_slots, q_segments, kv_segments, block_q, block_k)

    def q_block(args):
        qi, qs_i, qseg_i = args  # (batch, kvh, g, bq, d), (bq,), (batch, bq)

        def kv_step(carry, blk):
            m, l, acc = carry
            kj, vj, ks_j, kseg_j = blk
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
            s = _masked(s, _block_mask(qs_i, qseg_i, ks_j, kseg_j, window))
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return (m_new, l, acc * corr[..., None] + pv), None

        shape = qi.shape[:-1]
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, ks, kseg))
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(q_block, (qb, qs, qseg))  # (nq, b, kvh, g, bq, d), (nq, b, kvh, g, bq)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def blockwise_attention(q, k, v, q_slots, q_segments, kv_segments, window: int | None = None,
                        block_q: int = 512, block_k: int = 512):
    """softmax(q k^T / sqrt(d)) v over blocks, grouped-query; the mask as `attention_mask_matrix`'s.

    q (batch, q, heads, d); k, v (batch, kv, kv_heads, d); q_slots (q,) int32 cache slots of the queries;
    q_segments (batch, q), kv_segments (batch, kv) int32 segment ids, 0 on padding. Returns (batch, q,
    heads, d) in q's dtype. Scores, softmax statistics and accumulators are float32.
    """
    out, _ = _forward(q, k, v, q_slots, q_segments, kv_segments, window, block_q, block_k)
    return _unlayout_q(out, q.shape[1])


def _fwd(q, k, v, q_slots, q_segments, kv_segments, window, block_q, block_k):
    out, lse = _forward(q, k, v, q_slots, q_segments, kv_segments, window, block_q, block_k)
    return _unlayout_q(out, q.shape[1]), (q, k, v, q_slots, q_segments, kv_segments, out, lse)


def _int_zero(x):
    return np.zeros(x.shape, jax.dtypes.float0)


def _bwd(window, block_q, block_k, res, g):
    q, k, v, q_slots, q_segments, kv_segments, out, lse = res
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    scale = d ** -0.5
    # q, k, v and dO cross the loops as raw words (scan.to_words): else XLA's CPU backend holds float32
    # copies of all four, in block layout, through the layer's whole backward (+64 MiB at 2048 tokens).
    qb, kb, vb, qs, qseg, ks, kseg = _layout(to_words(q), to_words(k), to_words(v), q_slots, q_segments,
                                             kv_segments, block_q, block_k)
    gb = _q_blocks(to_words(g), kvh, block_q)  # dO in q's block layout
    delta = jnp.sum(from_words(gb, g.dtype).astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def kv_block(dq, blk):
        kj, vj, ks_j, kseg_j = blk  # (b, kvh, bk, d), ..., (bk,), (b, bk)
        kj, vj = from_words(kj, k.dtype), from_words(vj, v.dtype)

        def q_step(carry, i):
            dk, dv, dq = carry
            qi, gi, lse_i, delta_i = from_words(qb[i], q.dtype), from_words(gb[i], g.dtype), lse[i], delta[i]
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
            s = _masked(s, _block_mask(qs[i], qseg[i], ks_j, kseg_j, window))
            p = jnp.exp(s - lse_i[..., None])
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(gi.dtype), gi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", gi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
            return (dk, dv, dq.at[i].add(dq_i)), None

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dk, dv, dq), _ = jax.lax.scan(q_step, (zeros, zeros, dq), jnp.arange(qb.shape[0]))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))  # complete: rounded once, stacked in k's dtype

    # dq's accumulator is made from dO (scheduling.zeros_after): zeros from nothing are allocated at the top of
    # the layer's backward, 32 MiB at 2048 tokens held through its MLP's backward too.
    dq0 = zeros_after(g, jax.ShapeDtypeStruct(qb.shape, jnp.float32))
    dq, (dk, dv) = jax.lax.scan(kv_block, dq0, (kb, vb, ks, kseg))
    dq = _unlayout_q(dq, tq).astype(q.dtype)

    def kv_back(x):  # (nk, b, kvh, bk, d) -> (b, tk, kvh, d)
        nk, _, _, bk, _ = x.shape
        return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kvh, d)[:, :tk]

    return (dq, kv_back(dk), kv_back(dv),
            _int_zero(q_slots), _int_zero(q_segments), _int_zero(kv_segments))


blockwise_attention.defvjp(_fwd, _bwd)
