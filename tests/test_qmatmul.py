"""qmatmul's backward: gradients equal plain autodiff's, and the compiled step keeps no dense weights alive.

The memory figure is XLA's own (``compile().memory_analysis().temp_size_in_bytes``) for one QLoRA
gradient step through a stack of 4096x4096 NF4 + double-quantized layers, scanned as a model scans its
layers (``lax.scan`` / ``nnx.scan``): what the forward keeps for the backward is stacked per layer,
so it shows in the figure. (Unrolled layers on XLA:CPU show no difference either way: its scheduler
hoists every layer's dequantization to the start and CSE merges the backward's recomputation with the
forward's, as it undoes ``jax.checkpoint``.) Compiled from abstract shapes only: nothing is run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import lora
from jaxlora.qmatmul import qmatmul
from jaxlora.quant import QuantConfig, dequantize, quantize

D, LAYERS, TOKENS, R = 4096, 4, 16, 16


def qmatmul_autodiff(x: jax.Array, qt, *, compute_dtype=jnp.bfloat16) -> jax.Array:
    """qmatmul's forward under plain autodiff: the baseline its custom backward is measured against."""
    w = jax.lax.stop_gradient(dequantize(qt, compute_dtype))
    return jnp.matmul(x.astype(compute_dtype), w.T, preferred_element_type=jnp.float32)


def _temp_bytes(matmul) -> int:
    def loss(adapters, qts, x):  # adapters: (a (L, D, R), b (L, R, D)); x (TOKENS, D) bf16
        def layer(h, params):
            (a, b), qt = params
            y = matmul(h, qt, compute_dtype=jnp.bfloat16).astype(jnp.float32)
            return (y + lora.delta(h.astype(jnp.float32), a, b, 2.0)).astype(jnp.bfloat16), None

        h, _ = jax.lax.scan(layer, x, (adapters, qts))
        return jnp.sum(h.astype(jnp.float32) ** 2)

    def stacked(s):
        return jax.ShapeDtypeStruct((LAYERS, *s.shape), s.dtype)

    qt = jax.eval_shape(lambda w: quantize(w, QuantConfig()),
                        jax.ShapeDtypeStruct((D, D), jnp.bfloat16))
    adapters = (stacked(jax.ShapeDtypeStruct((D, R), jnp.float32)), stacked(jax.ShapeDtypeStruct((R, D), jnp.float32)))
    x = jax.ShapeDtypeStruct((TOKENS, D), jnp.bfloat16)
    compiled = jax.jit(jax.grad(loss)).lower(adapters, jax.tree.map(stacked, qt), x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_custom_backward_keeps_only_packed_codes():
    custom, plain = _temp_bytes(qmatmul), _temp_bytes(qmatmul_autodiff)
    dense_bf16 = D * D * 2
    print(f"\n{LAYERS} x ({D}x{D}) NF4+DQ, {TOKENS} tokens, grad wrt LoRA r={R}: temp bytes "
          f"custom_vjp {custom / 2**20:.1f} MiB, autodiff {plain / 2**20:.1f} MiB, ratio {plain / custom:.2f}; "
          f"one dense bf16 weight = {dense_bf16 / 2**20:.0f} MiB")
    # Autodiff saves every layer's dequantized weight for the backward (>= LAYERS dense bf16 weights);
    # the custom backward saves the packed codes and re-dequantizes one layer at a time (XLA:CPU
    # dequantizes in float32 before the bf16 cast: one f32 weight, 2 bf16 weights, is the floor).
    assert plain >= LAYERS * dense_bf16
    assert custom <= 2.5 * dense_bf16
    assert plain / custom >= 3


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_custom_backward_matches_autodiff(compute_dtype):
    w = jax.random.normal(jax.random.key(0), (48, 64), jnp.float32)
    qt = quantize(w, QuantConfig())
    x = jax.random.normal(jax.random.key(1), (5, 64), jnp.float32)
    # the cotangent a layer feeds back holds compute-dtype values (it comes through the cast to cd)
    dy = jax.random.normal(jax.random.key(2), (5, 48), jnp.float32).astype(compute_dtype).astype(jnp.float32)

    def vjp(f):
        y, pull = jax.vjp(lambda x: f(x, qt, compute_dtype=compute_dtype).astype(jnp.float32), x)
        return y, pull(dy)[0]

    (y1, dx1), (y2, dx2) = vjp(qmatmul), vjp(qmatmul_autodiff)
    np.testing.assert_array_equal(y1, y2)  # same ops in the same order: bit-identical
    np.testing.assert_array_equal(dx1, dx2)


def test_no_gradient_for_the_quantized_weight():
    w = jax.random.normal(jax.random.key(0), (48, 64), jnp.float32)
    qt = quantize(w, QuantConfig(double_quant=False))  # a float32 absmax leaf
    x = jax.random.normal(jax.random.key(1), (5, 64), jnp.float32)
    g = jax.grad(lambda qt: jnp.sum(qmatmul(x, qt, compute_dtype=jnp.float32)), allow_int=True)(qt)
    assert not np.any(np.asarray(g.absmax))


def test_shape_mismatch_is_a_value_error():
    qt = quantize(jnp.ones((48, 64), jnp.float32), QuantConfig())
    with pytest.raises(ValueError, match=r"\(5, 48\)"):
        qmatmul(jnp.ones((5, 48), jnp.float32), qt)


@pytest.mark.parametrize("shape, double_quant, tiles", [((2048, 4096), True, 2), ((4099, 1056), False, 1),
                                                        ((6144, 1024), True, 2)])
def test_row_tiles_compute_the_untiled_product(shape, double_quant, tiles):
    """Above TILE_ELEMENTS a weight is dequantized and multiplied a row tile at a time; the tile bounds fall
    on quantization blocks (and on blocks of 256 blocks when double-quantized), so the forward equals the
    whole-weight product and the input gradient equals it up to float32 summation order. A 4099x1056 weight
    (4.3M elements) has no aligned split (4099 is prime, and one row is not a whole number of blocks) and
    stays whole."""
    from jaxlora.qmatmul import TILE_ELEMENTS, row_tiles

    key = jax.random.PRNGKey(1)
    w = jax.random.normal(key, shape, jnp.float32) * 0.02
    qt = quantize(w, QuantConfig(blocksize=64, quant_type="nf4", double_quant=double_quant))
    assert row_tiles(qt) == tiles and (tiles == 1 or shape[0] * shape[1] // tiles <= TILE_ELEMENTS)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, shape[1]), jnp.float32)
    dense = dequantize(qt, jnp.float32)
    y = qmatmul(x, qt, compute_dtype=jnp.float32)
    np.testing.assert_allclose(y, jnp.matmul(x, dense.T), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.PRNGKey(3), y.shape, jnp.float32)
    dx = jax.vjp(lambda x: qmatmul(x, qt, compute_dtype=jnp.float32), x)[1](g)[0]
    np.testing.assert_allclose(dx, jnp.matmul(g, dense), rtol=1e-5, atol=1e-5)
