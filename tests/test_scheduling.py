"""`zeros_after`: zeros XLA cannot allocate before the value they are made from exists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.scheduling import zeros_after


@pytest.mark.parametrize("first", [1.5, -2.0, np.nan, np.inf, -np.inf])
def test_zeros_after_is_zero_whatever_the_value_and_depends_on_it(first):
    x = jnp.array([first, 3.0], jnp.bfloat16)
    like = {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jnp.ones((4,), jnp.bfloat16)}
    out = zeros_after(x, like)
    assert out["a"].shape == (2, 3) and out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.bfloat16
    assert all(np.array_equal(np.asarray(v, np.float32), np.zeros(v.shape)) for v in out.values())
    # Built from x, not a constant: the traced program reads x.
    jaxpr = jax.make_jaxpr(lambda x: zeros_after(x, like))(x).jaxpr
    assert any(v in eqn.invars for eqn in jaxpr.eqns for v in jaxpr.invars)
