"""The chunked causal-LM loss (jaxlora/train/loss.py) equals the whole-logits one, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.train.loss import causal_lm_loss, chunked_causal_lm_loss

B, T, HIDDEN, VOCAB = 2, 23, 16, 50


def _head(w, h):
    return jnp.einsum("btd,dv->btv", h, w)


@pytest.mark.parametrize("chunk", [None, 1, 5, 7, 22])  # 22 = every position in one chunk
def test_chunked_equals_whole(chunk):
    ks = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(ks[0], (HIDDEN, VOCAB))
    h = jax.random.normal(ks[1], (B, T, HIDDEN))
    ids = jax.random.randint(ks[2], (B, T), 0, VOCAB, dtype=jnp.int32)
    mask = jax.random.bernoulli(ks[3], 0.7, (B, T))

    def whole(w, h):
        return causal_lm_loss(_head(w, h), ids, mask)[0]

    def chunked(w, h):
        return chunked_causal_lm_loss(_head, w, h, ids, mask, chunk=chunk)[0]

    # fp32, the same terms summed in another order: 1e-6 relative.
    np.testing.assert_allclose(chunked(w, h), whole(w, h), rtol=1e-6)
    assert chunked_causal_lm_loss(_head, w, h, ids, mask, chunk=chunk)[1] == jnp.sum(mask[:, 1:].astype(jnp.float32))
    for a, b in zip(jax.grad(chunked, argnums=(0, 1))(w, h), jax.grad(whole, argnums=(0, 1))(w, h)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(a)).max() > 0


def test_chunked_never_forms_all_logits():
    """The compiled loss and gradient hold one chunk of logits at a time: its temp stays far below the
    (batch, seq, vocab) float32 array that the whole-logits loss materializes."""
    b, t, d, v = 1, 1024, 64, 8192
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    ids = jnp.zeros((b, t), jnp.int32)
    mask = jnp.ones((b, t), bool)

    def temp(loss):
        grad = jax.grad(lambda w, h: loss(w, h)[0], argnums=(0, 1))
        return jax.jit(grad).lower(w, h).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4  # 32 MiB
    whole = temp(lambda w, h: causal_lm_loss(_head(w, h), ids, mask))
    chunked = temp(lambda w, h: chunked_causal_lm_loss(_head, w, h, ids, mask, chunk=64))
    assert whole >= logits_bytes
    assert chunked < logits_bytes / 4


def test_params_the_head_does_not_read_carry_no_gradient_through_the_loop():
    """Handed a whole model, the loop's backward would carry a cotangent accumulator for every leaf (which
    XLA's CPU backend allocated at the top of the train step: 160 MiB of adapter-shaped zeros at Llama-2-7B);
    a leaf the head does not read gets none, as its gradient through the head is zero, and the gradient of
    the leaf it reads is unchanged."""
    ks = jax.random.split(jax.random.key(1), 3)
    params = {"w": jax.random.normal(ks[0], (HIDDEN, VOCAB)), "other": jnp.ones((3, 7))}
    h = jax.random.normal(ks[1], (1, 64, HIDDEN))
    ids = jax.random.randint(ks[2], (1, 64), 0, VOCAB, dtype=jnp.int32)
    mask = jnp.ones((1, 64), bool)

    def loss(params, h):
        return chunked_causal_lm_loss(lambda p, h: _head(p["w"], h), params, h, ids, mask, chunk=8)[0]

    def carried(jaxpr):  # shapes carried by the scans of the gradient's top level (the loop and its transpose)
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                n = eqn.params["num_consts"]
                yield from (v.aval.shape for v in eqn.invars[n:n + eqn.params["num_carry"]])

    shapes = list(carried(jax.make_jaxpr(jax.grad(loss))(params, h).jaxpr))
    assert (HIDDEN, VOCAB) in shapes and (3, 7) not in shapes, shapes
    g = jax.grad(loss)(params, h)
    assert not np.asarray(g["other"]).any()
    np.testing.assert_allclose(g["w"], jax.grad(loss)({"w": params["w"]}, h)["w"], rtol=1e-6)
