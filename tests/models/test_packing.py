"""Sequence packing: a packed row computes exactly what its examples compute one by one."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests._models import FAMILY_CONFIGS, family_tokens, make_model


@pytest.mark.parametrize("name", ["llama", "mistral_window"])
def test_packed_row_equals_separate_examples(name):
    model = make_model(FAMILY_CONFIGS[name])
    a, b = family_tokens((1, 5), seed=1), family_tokens((1, 4), seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 1), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0]], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(4)) + [0]], jnp.int32)
    mask = (segments != 0).astype(jnp.int32)
    out = model(packed, mask, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(out[:, :5], model(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:9], model(b), rtol=1e-5, atol=1e-5)
    # Without segment ids the second example sees the first: the logits must differ.
    leaky = model(packed, mask, positions=positions)
    assert np.max(np.abs(leaky[:, 5:9] - model(b))) > 1e-3
