"""Generation (jaxlora/generate.py): greedy equals the argmax loop, EOS and padding, sampling, and a
jitted model with adapters."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.generate import generate
from jaxlora.lora_config import LoraConfig
from jaxlora.peft_model import get_peft_model
from tests._models import FAMILY_CONFIGS, RANDOM, family_tokens, make_model, tiny, tokens


def test_generate_greedy_matches_argmax_loop():
    model = make_model(FAMILY_CONFIGS["mistral_window"])
    ids = family_tokens((2, 4))
    mask = jnp.ones((2, 4), jnp.int32).at[1, 0].set(0)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=5)
    seq, m = ids, mask
    for _ in range(5):  # no cache: the full forward on the growing sequence
        nxt = jnp.argmax(model(seq, m)[:, -1], axis=-1).astype(jnp.int32)
        seq, m = jnp.concatenate([seq, nxt[:, None]], 1), jnp.concatenate([m, jnp.ones((2, 1), jnp.int32)], 1)
    assert np.array_equal(out, seq)



def test_generate_eos_and_sampling():
    model = make_model(FAMILY_CONFIGS["llama"])
    ids = family_tokens((2, 4))
    greedy = generate(model, ids, max_new_tokens=6)
    eos = int(greedy[0, 5])  # row 0's second new token
    assert eos != int(greedy[0, 4])
    out = generate(model, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert np.array_equal(out[0, :6], greedy[0, :6]) and np.all(out[0, 6:] == 0)
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    nucleus = generate(model, ids, max_new_tokens=6, temperature=1.0, top_p=1e-6, rng=jax.random.key(0))
    assert np.array_equal(nucleus, greedy)
    a = generate(model, ids, max_new_tokens=6, temperature=1.0, rng=jax.random.key(1))
    assert np.array_equal(a, generate(model, ids, max_new_tokens=6, temperature=1.0, rng=jax.random.key(1)))
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, max_new_tokens=2, temperature=1.0)


def test_generate_jits_a_model_with_adapters():
    model = get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    out = generate(model, tokens()[:, :4], max_new_tokens=3)
    assert out.shape == (2, 7)

