"""The llama family's numerics as plain functions: RMSNorm, RoPE, masked grouped-query attention.

Each follows transformers' ``modeling_llama.py`` operation by operation (where it upcasts, where it
casts back), so that fp32 logits agree to rounding and bf16 logits to bf16 rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.config import LlamaConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * x / rms(x)``, the mean square in float32 (transformers' LlamaRMSNorm).  x: (..., d)."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)  # explicit: rank promotion is an error
    return weight.astype(x.dtype) * h.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The (head_dim // 2,) float32 rotary frequencies, transformers' ``ROPE_INIT_FUNCTIONS`` in float32."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / np.float32(scaling.factor)
    # "llama3" (Llama 3.1): keep high frequencies, divide low ones by `factor`, interpolate between.
    old_len = np.float32(scaling.original_max_position_embeddings)
    low_wavelen = old_len / np.float32(scaling.low_freq_factor)
    high_wavelen = old_len / np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = (old_len / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of (batch, seq, head_dim), computed in float32 and cast to `dtype` as transformers does."""
    freqs = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x (batch, seq, heads, head_dim) by HF's rotate_half convention (halves, not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids (batch, seq) counting only real tokens, so a left-padded row starts at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_matrix(
    q_slots: jax.Array, q_segments: jax.Array, kv_segments: jax.Array, window: int | None
) -> jax.Array:  # (batch, 1, 1, q, kv) bool
    """Which key slots each query slot may see: same segment, not in the future, inside the window.

    q_slots: (q,) int32 cache slots of the queries; q_segments: (batch, q) and kv_segments: (batch, kv)
    int32 segment ids, 0 on padding. An unpacked row is the single segment 1 (its attention mask); a
    packed row numbers its examples 1, 2, ..., so no example sees another. Slots count padding, as
    transformers' sliding_window_overlay counts cache indices, so a window covers the same keys.
    """
    kv_slots = jnp.arange(kv_segments.shape[-1], dtype=jnp.int32)
    allowed = kv_slots[None, :] <= q_slots[:, None]  # (q, kv)
    if window is not None:
        allowed = allowed & (kv_slots[None, :] > q_slots[:, None] - window)
    same = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)  # (batch, q, kv)
    return allowed[None, None, None, :, :] & same[:, None, None, :, :]


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with key/value heads shared by groups of query heads.

    q: (batch, q, heads, d); k, v: (batch, kv, kv_heads, d); mask: (batch, 1, 1, q, kv) bool.
    Returns (batch, q, heads, d). Scores and softmax in float32, as transformers' eager attention.
    """
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, tq, kvh, h // kvh, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    # A fully masked row (a pad query) gets a uniform softmax instead of NaN; its output is never used.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, h, d)


# Attention implementations: "eager" forms the whole (q, kv) score matrix (transformers' eager path, the
# reference); "blockwise" never does (jaxlora.models.blockwise); "cudnn" is jax.nn.dot_product_attention's
# fused GPU kernel; "auto" is blockwise when the keys span more than one block and there is more than one
# query (training, long prefill), eager otherwise (decoding, short sequences: one block is the same sum).
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "eager", "blockwise", "cudnn")
BLOCK = 512  # query and key block of the blockwise path: (heads, 512, 512) float32 scores per block


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r}; expected one of {ATTENTION_IMPLS}")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, q_segments: jax.Array,
              kv_segments: jax.Array, *, window: int | None, impl: str = "auto") -> jax.Array:
    """Masked grouped-query attention by `impl`; arguments as `attention_mask_matrix` and `grouped_attention`.
    q (batch, q, heads, d); k, v (batch, kv, kv_heads, d). Returns (batch, q, heads, d)."""
    from jaxlora.models.blockwise import blockwise_attention

    if impl == "auto":
        impl = "blockwise" if q.shape[1] > 1 and k.shape[1] > BLOCK else "eager"
    if impl == "blockwise":
        block_q, block_k = min(BLOCK, q.shape[1]), min(BLOCK, k.shape[1])
        return blockwise_attention(q, k, v, q_slots, q_segments, kv_segments, window, block_q, block_k)
    mask = attention_mask_matrix(q_slots, q_segments, kv_segments, window)
    if impl == "cudnn":  # (batch, 1, q, kv): one mask for every head
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, :, 0], implementation="cudnn")
    return grouped_attention(q, k, v, mask)
