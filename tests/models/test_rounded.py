"""jaxlora.models.rounded: the output head's matmul has a plain bf16 matmul's numbers, forward and backward,
and its compiled form holds no float32 copy of the head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models.rounded import rounded_dot_general, rounded_matmul


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_rounded_matmul_equals_the_plain_matmul_and_its_gradients(dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 64), jnp.float32).astype(dtype)
    w = (jax.random.normal(jax.random.PRNGKey(1), (64, 96), jnp.float32) * 0.1).astype(dtype)
    g = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 96), jnp.float32).astype(dtype)
    # the plain matmul's numbers: float32 accumulation, one rounding (what XLA computes for a bf16 dot)
    plain = lambda x, w: jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32)).astype(dtype)  # noqa: E731
    y, vjp = jax.vjp(rounded_matmul, x, w)
    y_ref, vjp_ref = jax.vjp(plain, x, w)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2 if dtype != jnp.float32 else 1e-6, atol=1e-6)


def test_linear_with_rounded_dot_general_is_a_linear():
    rngs = nnx.Rngs(0)
    plain = nnx.Linear(32, 48, use_bias=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
    rounded = nnx.Linear(32, 48, use_bias=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                         dot_general=rounded_dot_general, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(rounded(x), np.float32), np.asarray(plain(x), np.float32))


def test_the_compiled_head_has_no_float32_copy():
    """A (4096, 32000) bf16 head: the gradient of a loss through it needs no 500 MiB float32 copy of it."""
    w = jax.ShapeDtypeStruct((4096, 32000), jnp.bfloat16)
    h = jax.ShapeDtypeStruct((256, 4096), jnp.bfloat16)

    def loss(h, w):
        return jax.nn.logsumexp(rounded_matmul(h, w).astype(jnp.float32), axis=-1).sum()

    temp = jax.jit(jax.grad(loss)).lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < 4096 * 32000 * 2, temp / 2**20  # below even one bf16 copy
