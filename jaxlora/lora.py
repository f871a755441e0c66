"""LoRA arithmetic as plain jnp functions: init, scaling, delta, merge, DoRA, PiSSA, LoftQ, combinations.

Layout: JAX's. A linear layer computes ``y = x @ kernel``, kernel ``(in, out)``; an adapter is
``a (in, r)`` and ``b (r, out)``, so its delta is ``scale * (x @ a) @ b`` and its weight ``scale * a @ b``.
PEFT stores the transposes, ``lora_A.weight (r, in)`` and ``lora_B.weight (out, r)``, and the base
weight ``(out, in)``; the layers convert at the boundary (`LoRAAdapter.load_peft` / `to_peft`).
Every formula here follows peft 0.21 (``tuners/lora/layer.py``, ``dora.py``, ``model.py``,
``utils/loftq_utils.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

InitLoraWeights = bool | str  # True, False, "gaussian", "pissa", "pissa_niter_<n>", "loftq" (layers: or a jaxlora.inits.BaseInit)
CombinationType = Literal["linear", "svd", "cat"]


def pissa_niter(init: bool | str) -> int | None:
    """The power iterations of PEFT's fast-SVD PiSSA, ``init_lora_weights="pissa_niter_<n>"``; None otherwise."""
    if isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit():
        return int(init[len("pissa_niter_"):])
    return None


def check_rank(r: int, in_features: int, out_features: int) -> None:
    """r is a positive int. It may exceed min(in, out), as PEFT allows: the product A B then has rank at
    most min(in, out) but trains and merges the same way (PiSSA and LoftQ, which take r singular
    vectors, check their own bound)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r} must be a positive int (layer of {in_features} -> {out_features})")


def scaling(r: int, lora_alpha: float, *, use_rslora: bool = False) -> float:
    """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    if lora_alpha <= 0:
        raise ValueError(f"lora_alpha={lora_alpha!r} must be > 0")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def init_a(key: jax.Array, in_features: int, r: int, init: InitLoraWeights, dtype=jnp.float32) -> jax.Array:
    """A ``(in, r)`` as PEFT draws ``lora_A.weight``: kaiming_uniform(a=sqrt 5) on an (r, in) weight is
    U(-1/sqrt(in), 1/sqrt(in)); "gaussian" is N(0, (1/r)^2) (PEFT's std=1/r); False gives zeros... of B
    only, A keeps the kaiming draw, as in PEFT where False skips the reset of nn.Linear's own init."""
    if init is True or init is False:
        bound = 1.0 / math.sqrt(in_features)
        return jax.random.uniform(key, (in_features, r), dtype, -bound, bound)
    if init == "gaussian":
        return jax.random.normal(key, (in_features, r), dtype) * jnp.asarray(1.0 / r, dtype)
    raise ValueError(f"init_lora_weights={init!r} has no random A; expected True, False or 'gaussian'")


def init_b(key: jax.Array, r: int, out_features: int, init: InitLoraWeights, dtype=jnp.float32) -> jax.Array:
    """B ``(r, out)``: zeros (the adapter starts as the identity), except init_lora_weights=False where
    PEFT leaves nn.Linear's default init (the same kaiming-uniform bound over fan-in r)."""
    if init is False:
        bound = 1.0 / math.sqrt(r)
        return jax.random.uniform(key, (r, out_features), dtype, -bound, bound)
    return jnp.zeros((r, out_features), dtype)


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * (x @ a) @ b``; x ``(..., in)``, a ``(in, r)``, b ``(r, out)`` -> ``(..., out)``.
    The scale multiplies last, as PEFT's ``lora_B(lora_A(x)) * scaling``."""
    return ((x @ a) @ b) * jnp.asarray(scale, b.dtype)


def delta_weight(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * a @ b`` -> ``(in, out)``: PEFT's ``get_delta_weight`` transposed."""
    return (a @ b) * jnp.asarray(scale, b.dtype)


def merge(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """kernel ``(in, out)`` + the delta weight, computed in the adapter dtype, cast back to the kernel's."""
    return (kernel.astype(a.dtype) + delta_weight(a, b, scale)).astype(kernel.dtype)


def unmerge(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return (kernel.astype(a.dtype) - delta_weight(a, b, scale)).astype(kernel.dtype)


# DoRA (Liu et al. 2024): W' = m * (W + dW) / ||W + dW||, the norm taken per output feature -- over the
# input axis. PEFT writes it ``torch.linalg.norm(W_(out,in) + s*B@A, dim=1)``; in (in, out) layout that
# is axis 0. The norm is detached (DoRA section 4.3), so gradients reach m, A and B but not through it.


def dora_weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``||kernel + scale * a @ b||`` over the input axis -> ``(out,)``, no gradient."""
    w = kernel.astype(a.dtype) + delta_weight(a, b, scale)
    return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))


def dora_delta(
    x: jax.Array,  # (..., in), already dropped-out when dropout is active
    base_out: jax.Array,  # (..., out) the base layer's output on x WITHOUT bias
    kernel: jax.Array,  # (in, out)
    a: jax.Array,
    b: jax.Array,
    magnitude: jax.Array,  # (out,)
    scale: float,
) -> jax.Array:
    """What DoRA adds to the base output: ``(m/n - 1) * base_out + (m/n) * scale * (x @ a) @ b``."""
    mag_norm = magnitude / dora_weight_norm(kernel, a, b, scale)
    mag_norm = mag_norm.reshape((1,) * (base_out.ndim - 1) + mag_norm.shape)  # explicit: rank promotion is off
    return (mag_norm - 1) * base_out.astype(a.dtype) + mag_norm * delta(x, a, b, scale)


def dora_merge(kernel: jax.Array, a: jax.Array, b: jax.Array, magnitude: jax.Array, scale: float):
    """Merged DoRA kernel ``(in, out)`` and the norm it used (keep it: unmerging needs the same norm)."""
    norm = dora_weight_norm(kernel, a, b, scale)
    merged = (magnitude / norm)[None, :] * (kernel.astype(a.dtype) + delta_weight(a, b, scale))
    return merged.astype(kernel.dtype), norm


def dora_unmerge(kernel: jax.Array, a, b, magnitude: jax.Array, norm: jax.Array, scale: float) -> jax.Array:
    return (kernel.astype(a.dtype) / (magnitude / norm)[None, :] - delta_weight(a, b, scale)).astype(kernel.dtype)


def svd_lowrank(w: jax.Array, q: int, niter: int, key: jax.Array):
    """torch.svd_lowrank(w, q, niter) (Halko et al. 2011, algorithm 4.4): a Gaussian sketch of the range,
    `niter` QR-stabilised power iterations, then the exact SVD of the small projection. Returns u (m, q),
    s (q,), vh (q, n). The sketch is random (a jax key here, torch's generator there), so only the
    decomposition's quality, not its bits, is comparable with torch."""
    m, n = w.shape
    if m < n:  # torch works on the tall orientation
        u, s, vh = svd_lowrank(w.T, q, niter, key)
        return vh.T, s, u.T
    qb = jnp.linalg.qr(w @ jax.random.normal(key, (n, q), w.dtype))[0]
    for _ in range(niter):
        qb = jnp.linalg.qr(w.T @ qb)[0]
        qb = jnp.linalg.qr(w @ qb)[0]
    u, s, vh = jnp.linalg.svd(qb.T @ w, full_matrices=False)
    return qb @ u, s, vh


def pissa(kernel: jax.Array, r: int, scale: float, *, niter: int | None = None, key: jax.Array | None = None):
    """PiSSA (Meng et al. 2024), PEFT's ``pissa_init``: W = U S Vh in (out, in) layout, exactly
    (``init_lora_weights="pissa"``) or by `svd_lowrank` with `niter` power iterations and `key`
    (``"pissa_niter_<niter>"``); B = U_r sqrt(S_r/scale), A = sqrt(S_r/scale) Vh_r, residual
    W - scale * B A, in float32. Returns ``a (in, r)``, ``b (r, out)``, residual kernel ``(in, out)`` in
    the kernel's dtype. Singular vectors are unique only up to a sign per pair, which flips a row of A
    and the matching column of B."""
    w = kernel.astype(jnp.float32).T  # (out, in), as PEFT decomposes it
    if r > min(w.shape):
        raise ValueError(f"PiSSA takes r <= min(in, out) = {min(w.shape)} singular vectors, got r={r}")
    if niter is None:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vh = svd_lowrank(w, r, niter, key)
    sr = jnp.sqrt(s[:r] / jnp.float32(scale))
    b_peft = u[:, :r] * sr[None, :]  # (out, r)
    a_peft = sr[:, None] * vh[:r]  # (r, in)
    residual = w - jnp.float32(scale) * (b_peft @ a_peft)
    return a_peft.T, b_peft.T, residual.T.astype(kernel.dtype)


def loftq(
    weight: jax.Array,  # (out, in): LoftQ quantizes the PyTorch layout so codes match bitsandbytes
    r: int,
    quantize: Callable,  # (out, in) float32 -> QuantizedTensor
    dequantize: Callable,  # QuantizedTensor -> (out, in) float32
    *,
    num_iter: int = 1,
):
    """LoftQ (Li et al. 2023) as PEFT's ``loftq_init``: alternate Q = quant(W - B A) and the rank-r SVD of
    W - deq(Q). Returns the last QuantizedTensor, ``a (in, r)`` and ``b (r, out)``. Like PEFT it ignores
    ``scaling``: W ~= deq(Q) + B A holds for the adapter's output only when lora_alpha == r."""
    if num_iter <= 0:
        raise ValueError(f"num_iter={num_iter!r} must be > 0")
    w = weight.astype(jnp.float32)
    res = w
    for i in range(num_iter):
        qt = quantize(res)
        u, s, vh = jnp.linalg.svd(w - dequantize(qt), full_matrices=False)
        sr = jnp.sqrt(s[:r])
        b_peft, a_peft = u[:, :r] * sr[None, :], sr[:, None] * vh[:r]
        if i + 1 < num_iter:
            res = w - b_peft @ a_peft
    return qt, a_peft.T, b_peft.T


def combine_linear(adapters: Sequence[tuple[jax.Array, jax.Array, float]], weights: Sequence[float]):
    """PEFT ``add_weighted_adapter(combination_type="linear")``: A = sum sign_i sqrt|w_i s_i| A_i and
    B = sum sqrt|w_i s_i| B_i over ``(a, b, scale)`` triples of equal rank; the result has scale 1.
    Not the weighted sum of deltas (cross terms A_i B_j appear) -- PEFT calls it a rough approximation."""
    ranks = {a.shape[1] for a, _, _ in adapters}
    if len(ranks) != 1:
        raise ValueError(f"combination_type='linear' needs equal ranks, got {sorted(ranks)}")
    a_sum = b_sum = None
    for (a, b, scale), w in zip(adapters, weights, strict=True):
        ws = w * scale
        wa, wb = math.copysign(math.sqrt(abs(ws)), ws), math.sqrt(abs(ws))
        a_sum = a * jnp.asarray(wa, a.dtype) if a_sum is None else a_sum + a * jnp.asarray(wa, a.dtype)
        b_sum = b * jnp.asarray(wb, b.dtype) if b_sum is None else b_sum + b * jnp.asarray(wb, b.dtype)
    return a_sum, b_sum


def combine_cat(adapters: Sequence[tuple[jax.Array, jax.Array, float]], weights: Sequence[float]):
    """PEFT ``add_weighted_adapter(combination_type="cat")``: A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...] and
    B = [B_1; B_2; ...] (ranks add up), so A B = sum_i w_i s_i A_i B_i exactly; the result has scale 1."""
    a = jnp.concatenate([a * jnp.asarray(w * s, a.dtype) for (a, _, s), w in zip(adapters, weights, strict=True)],
                        axis=1)  # (in, sum r)
    b = jnp.concatenate([b for _, b, _ in adapters], axis=0)  # (sum r, out)
    return a, b


def combine_svd(
    adapters: Sequence[tuple[jax.Array, jax.Array, float]], weights: Sequence[float], rank: int | None = None
):
    """PEFT ``add_weighted_adapter(combination_type="svd")``: the rank-``rank`` truncated SVD of
    sum_i w_i * delta_weight_i (default rank: the largest input rank); B = U S, A = Vh; scale 1."""
    rank = rank or max(a.shape[1] for a, _, _ in adapters)
    pairs = zip(adapters, weights, strict=True)
    total = sum(delta_weight(a, b, s) * jnp.asarray(w, a.dtype) for (a, b, s), w in pairs)
    u, s, vh = jnp.linalg.svd(total.T, full_matrices=False)  # (out, in), as PEFT decomposes it
    b_peft, a_peft = u[:, :rank] * s[None, :rank], vh[:rank]
    return a_peft.T, b_peft.T
