"""Pure LoRA math (jaxlora/lora.py): closed forms, init statistics, DoRA, PiSSA, combinations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import lora


def _rand(key, shape, scale=1.0):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32) * jnp.float32(scale)


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def test_scaling_plain_and_rslora():
    assert lora.scaling(8, 16) == 2.0
    assert lora.scaling(16, 16, use_rslora=True) == 4.0  # alpha / sqrt(r)
    with pytest.raises(ValueError, match="lora_alpha=0"):
        lora.scaling(8, 0)


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_check_rank_rejects(r):
    with pytest.raises(ValueError, match=f"r={r!r}"):
        lora.check_rank(r, 8, 12)


def test_check_rank_accepts_r_above_the_smaller_dimension():
    lora.check_rank(9, 8, 12)  # PEFT accepts it: A B then has rank <= 8, but trains and merges the same way


def test_pissa_niter_is_a_low_rank_svd_that_keeps_the_output():
    """PEFT's test_lora_pissa_linear_init_default, both variants: base + adapter equals the base within 1e-6."""
    key_w, key_x, key_s = jax.random.split(jax.random.key(0), 3)
    kernel = jax.random.uniform(key_w, (1000, 1000), jnp.float32, -1 / 1000**0.5, 1 / 1000**0.5)  # nn.Linear init
    x = jax.random.uniform(key_x, (10, 1000), jnp.float32)  # torch.rand(10, 1000)
    base = x @ kernel
    exact, fast = lora.pissa(kernel, 8, 1.0), lora.pissa(kernel, 8, 1.0, niter=16, key=key_s)
    for a, b, residual in (exact, fast):
        # torch.allclose(atol=1e-6) as upstream asserts it (its rtol=1e-5 included): fp32 rounding of
        # x @ (W - BA) + (x A) B against x @ W is ~1e-6 absolute on outputs of ~0.3
        np.testing.assert_allclose(np.asarray(x @ residual + lora.delta(x, a, b, 1.0)), np.asarray(base),
                                   rtol=1e-5, atol=1e-6)
    # Where the top r singular values stand apart (rank 8 plus small noise), the sketch finds the exact
    # SVD's subspace: A B agrees (it is sign-invariant) to the noise level.
    k1, k2, k3 = jax.random.split(key_w, 3)
    gapped = (jax.random.normal(k1, (300, 8)) @ jax.random.normal(k2, (8, 200))
              + 1e-4 * jax.random.normal(k3, (300, 200)))
    exact, fast = lora.pissa(gapped, 8, 2.0), lora.pissa(gapped, 8, 2.0, niter=4, key=key_s)
    _close(fast[0] @ fast[1], exact[0] @ exact[1], 1e-4)
    assert lora.pissa_niter("pissa_niter_16") == 16 and lora.pissa_niter("pissa") is None
    with pytest.raises(ValueError, match="r <= min"):
        lora.pissa(kernel[:, :4], 8, 1.0)


def test_init_statistics_match_peft():
    # kaiming_uniform(a=sqrt 5) on (r, in) is U(+-1/sqrt(in)): std bound/sqrt(3). gaussian: std 1/r.
    # Bounds are statistical: the sample std of n draws has relative sd ~ 1/sqrt(2n); allow 6 of them.
    in_f, r = 1024, 16
    n = in_f * r
    tol = 6 / math.sqrt(2 * n)
    a = np.asarray(lora.init_a(jax.random.key(0), in_f, r, True))
    bound = 1 / math.sqrt(in_f)
    assert a.shape == (in_f, r) and np.abs(a).max() <= bound
    assert abs(a.std() / (bound / math.sqrt(3)) - 1) < tol
    g = np.asarray(lora.init_a(jax.random.key(1), in_f, r, "gaussian"))
    assert abs(g.std() * r - 1) < tol
    assert not np.any(np.asarray(lora.init_b(jax.random.key(2), r, 64, True)))
    assert np.any(np.asarray(lora.init_b(jax.random.key(2), r, 64, False)))  # PEFT's False keeps nn.Linear init


def test_delta_and_merge_closed_form():
    x, a, b, k = _rand(0, (5, 32)), _rand(1, (32, 4)), _rand(2, (4, 24)), _rand(3, (32, 24))
    s = 2.5
    _close(lora.delta(x, a, b, s), x @ (s * (a @ b)), 1e-6)
    merged = lora.merge(k, a, b, s)
    _close(x @ merged, x @ k + lora.delta(x, a, b, s), 1e-6)
    _close(lora.unmerge(merged, a, b, s), k, 1e-6)


def test_dora_merge_has_magnitude_as_column_norms_and_matches_forward():
    x, a, b, k = _rand(0, (5, 32)), _rand(1, (32, 4)), _rand(2, (4, 24), 0.1), _rand(3, (32, 24))
    s = 2.0
    m = lora.dora_weight_norm(k, a, b, s) * jnp.float32(1.3)  # a magnitude that moved away from its init
    merged, norm = lora.dora_merge(k, a, b, m, s)
    _close(jnp.linalg.norm(merged, axis=0), m, 1e-6)  # DoRA: each output feature's weight has norm m
    base_out = x @ k
    _close(x @ merged, base_out + lora.dora_delta(x, base_out, k, a, b, m, s), 1e-6)
    _close(lora.dora_unmerge(merged, a, b, m, norm, s), k, 1e-5)


def test_dora_norm_has_no_gradient():
    k, a, b = _rand(3, (32, 24)), _rand(1, (32, 4)), _rand(2, (4, 24))
    g = jax.grad(lambda k: lora.dora_weight_norm(k, a, b, 1.0).sum())(k)
    assert not np.any(np.asarray(g))


def test_pissa_reconstructs_and_takes_top_singular_values():
    k = _rand(0, (48, 32))
    r, s = 4, 2.0
    a, b, res = lora.pissa(k, r, s)
    _close(res + s * (a @ b), k, 1e-5)
    top = np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)[:r]
    _close(np.linalg.svd(np.asarray(s * (a @ b), np.float64), compute_uv=False)[:r], top, 1e-5)


def test_combinations():
    a1, b1, a2, b2 = _rand(1, (32, 4)), _rand(2, (4, 24)), _rand(3, (32, 4)), _rand(4, (4, 24))
    triples = [(a1, b1, 2.0), (a2, b2, 0.5)]
    # svd at rank >= rank of the sum (8) is exact: the weighted sum of the deltas
    a, b = lora.combine_svd(triples, [0.7, -1.2], rank=8)
    _close(a @ b, 0.7 * lora.delta_weight(a1, b1, 2.0) - 1.2 * lora.delta_weight(a2, b2, 0.5), 1e-5)
    # linear with one adapter is exact: sqrt|w s| on both sides, sign on A
    a, b = lora.combine_linear(triples[:1], [-0.3])
    _close(a @ b, -0.3 * lora.delta_weight(a1, b1, 2.0), 1e-6)
    with pytest.raises(ValueError, match=r"equal ranks, got \[2, 4\]"):
        lora.combine_linear([(a1, b1, 1.0), (a1[:, :2], b1[:2], 1.0)], [1, 1])


def test_cat_combination_is_exact_and_adds_ranks():
    a1, b1, a2, b2 = _rand(5, (32, 4)), _rand(6, (4, 24)), _rand(7, (32, 2)), _rand(8, (2, 24))
    a, b = lora.combine_cat([(a1, b1, 2.0), (a2, b2, 0.5)], [0.7, -1.2])
    assert a.shape == (32, 6) and b.shape == (6, 24)  # ranks 4 + 2, unequal ranks allowed
    _close(a @ b, 0.7 * lora.delta_weight(a1, b1, 2.0) - 1.2 * lora.delta_weight(a2, b2, 0.5), 1e-6)
