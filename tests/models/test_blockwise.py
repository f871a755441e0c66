"""Blockwise attention (jaxlora/models/blockwise.py) against the eager reference, forward and backward, and
the model's attention choice."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models import attention as attn
from jaxlora.models.blockwise import blockwise_attention
from jaxlora.models.llama import LlamaForCausalLM
from tests._models import tiny_llama_config

B, T, H, KVH, D = 2, 37, 4, 2, 8  # T not a multiple of the blocks: the padded tail must stay masked


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, KVH, D))
    v = jax.random.normal(ks[2], (B, T, KVH, D))
    return q, k, v, ks[3]


SEGMENTS = {
    "causal": np.ones((B, T), np.int32),
    "right_padding": np.ones((B, T), np.int32) * (np.arange(T) < 30).astype(np.int32),
    "left_padding": np.ones((B, T), np.int32) * (np.arange(T) >= 5).astype(np.int32),
    "packed": np.stack([np.repeat([1, 2, 3, 0], [10, 15, 9, 3]), np.repeat([1, 2], [20, 17])]).astype(np.int32),
}


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("name", SEGMENTS)
def test_blockwise_equals_eager_forward_and_backward(name, window):
    """fp32 closed form, different summation order: 1e-5 of the largest value."""
    q, k, v, key = _inputs()
    seg = jnp.asarray(SEGMENTS[name])
    slots = jnp.arange(T, dtype=jnp.int32)

    def eager(q, k, v):
        return attn.grouped_attention(q, k, v, attn.attention_mask_matrix(slots, seg, seg, window))

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, slots, seg, seg, window, 8, 16)

    real = np.asarray(seg != 0)  # a pad query's output is never read
    e, b = eager(q, k, v), blockwise(q, k, v)
    assert np.abs(np.asarray(e - b))[real].max() < 1e-5 * np.abs(np.asarray(e)).max()
    w = jax.random.normal(key, e.shape) * jnp.asarray(real, jnp.float32)[:, :, None, None]
    ge = jax.grad(lambda *a: jnp.sum(eager(*a) * w), argnums=(0, 1, 2))(q, k, v)
    gb = jax.grad(lambda *a: jnp.sum(blockwise(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(ge, gb):
        assert np.abs(np.asarray(x - y)).max() < 1e-5 * np.abs(np.asarray(x)).max()
        assert np.abs(np.asarray(x)).max() > 0


def test_blockwise_bf16_close_to_eager():
    """bf16 inputs: both paths round probabilities to bf16 before the value product; a few bf16 ulps."""
    q, k, v, _ = _inputs(1)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    seg = jnp.asarray(SEGMENTS["packed"])
    slots = jnp.arange(T, dtype=jnp.int32)
    e = attn.grouped_attention(q, k, v, attn.attention_mask_matrix(slots, seg, seg, None)).astype(jnp.float32)
    b = blockwise_attention(q, k, v, slots, seg, seg, None, 8, 16).astype(jnp.float32)
    real = np.asarray(seg != 0)
    assert np.abs(np.asarray(e - b))[real].max() < 3e-2 * np.abs(np.asarray(e)).max()


def test_auto_picks_blockwise_only_past_one_block(monkeypatch):
    q, k, v, _ = _inputs()
    seg = jnp.ones((B, T), jnp.int32)
    slots = jnp.arange(T, dtype=jnp.int32)
    def jaxpr():
        return str(jax.make_jaxpr(lambda q, k, v: attn.attention(q, k, v, slots, seg, seg, window=None))(q, k, v))

    assert "custom_vjp" not in jaxpr()  # 37 keys: one block, the eager path
    monkeypatch.setattr(attn, "BLOCK", 16)
    assert "custom_vjp" in jaxpr()


def test_model_blockwise_equals_eager():
    """The whole model with each attention path: the same logits and adapter-free gradients."""
    config = tiny_llama_config(initializer_range=0.3, model_type="mistral", sliding_window=7)
    eager = LlamaForCausalLM(config, attention="eager", rngs=nnx.Rngs(0))
    block = LlamaForCausalLM(config, attention="blockwise", rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(3), (2, 40), 0, 64, dtype=jnp.int32)
    mask = jnp.ones((2, 40), jnp.int32).at[1, :6].set(0)
    real = np.asarray(mask, bool)
    le, lb = eager(ids, mask), block(ids, mask)
    assert np.abs(np.asarray(le - lb))[real].max() < 1e-5 * np.abs(np.asarray(le)).max()


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention='flash'.*expected one of"):
        LlamaForCausalLM(tiny_llama_config(), attention="flash", rngs=nnx.Rngs(0))
