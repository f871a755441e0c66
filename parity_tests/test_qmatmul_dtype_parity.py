"""The quantized matmul's rounding order against the installed bitsandbytes 0.50.2 (CPU), for every pair
of weight dtype and compute dtype among float32 / float16 / bfloat16.

bitsandbytes' forward dequantizes straight to the compute dtype; its backward dequantizes to the weight's
dtype and casts. Where the two dtypes differ the orders give other values (~5e-3 relative for a bf16
weight computed in float32), so each case is checked exactly: with one-hot inputs every output element is
a single weight element times 1 (no summation order is involved), so forward and input gradient must
equal bitsandbytes' bit for bit. A random-input case checks the whole layer as well, at a tolerance well
below the difference between the two orders.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from jaxlora.qlinear import QuantizedLinear  # noqa: E402
from jaxlora.quant import QuantConfig, quantize, to_bnb_state_dict  # noqa: E402
from torch_ref import bnb_ref  # noqa: E402

DTYPES = {"float32": (jnp.float32, torch.float32), "float16": (jnp.float16, torch.float16),
          "bfloat16": (jnp.bfloat16, torch.bfloat16)}  # fmt: skip
PAIRS = list(itertools.product(DTYPES, DTYPES))
IN, OUT = 128, 64  # in a multiple of the blocksize: bnb's AVX512 dequantize is wrong otherwise


def _layers(weight_dtype, compute_dtype, seed=0):
    w = np.random.default_rng(seed).standard_normal((OUT, IN)).astype(np.float32)
    qt = quantize(jnp.asarray(w, DTYPES[weight_dtype][0]), QuantConfig(compute_dtype=DTYPES[compute_dtype][0]))
    ours = QuantizedLinear(qt)
    ref = bnb_ref.linear4bit(to_bnb_state_dict(qt), IN, OUT, compute_dtype=DTYPES[compute_dtype][1]).train()
    return ours, ref


def _ours_forward_and_dx(layer, x, g):
    import jax

    y, vjp = jax.vjp(layer, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g, y.dtype))
    return np.asarray(y.astype(jnp.float32)), np.asarray(dx.astype(jnp.float32))


def _ref_forward_and_dx(layer, x, g):
    xt = bnb_ref.to_torch(x).requires_grad_(True)
    y = layer(xt)
    y.backward(bnb_ref.to_torch(g).to(y.dtype))
    return y.detach().float().numpy(), xt.grad.float().numpy()


@pytest.mark.parametrize("weight_dtype,compute_dtype", PAIRS)
def test_one_hot_forward_and_input_grad_are_bitsandbytes_bits(weight_dtype, compute_dtype):
    ours, ref = _layers(weight_dtype, compute_dtype)
    cd = DTYPES[compute_dtype][0]
    x = np.asarray(jnp.eye(IN, dtype=cd))  # y = W.T exactly: each output is one weight element
    g = np.asarray(jnp.eye(IN, OUT, dtype=cd))  # dx = the first OUT rows of W.T.T = W exactly
    y, dx = _ours_forward_and_dx(ours, x, g)
    y_ref, dx_ref = _ref_forward_and_dx(ref, x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("weight_dtype,compute_dtype", [p for p in PAIRS if p[0] != p[1]])
def test_the_two_orders_differ_here(weight_dtype, compute_dtype):
    """The one-hot test can fail: where the dtypes differ, rounding through the weight dtype changes
    some elements, except for float32 weights (f32 -> compute dtype is one rounding either way)."""
    ours, _ = _layers(weight_dtype, compute_dtype)
    cd = DTYPES[compute_dtype][0]
    direct = np.asarray(ours.dequantize(cd).astype(jnp.float32))
    via = np.asarray(ours.dequantize().astype(cd).astype(jnp.float32))
    if weight_dtype == "float32":
        np.testing.assert_array_equal(direct, via)
    else:
        assert np.any(direct != via)


@pytest.mark.parametrize("weight_dtype,compute_dtype", PAIRS)
def test_random_input_matches_bitsandbytes(weight_dtype, compute_dtype):
    ours, ref = _layers(weight_dtype, compute_dtype, seed=1)
    cd = DTYPES[compute_dtype][0]
    rng = np.random.default_rng(2)
    x = np.asarray(jnp.asarray(rng.standard_normal((5, IN)), cd))
    g = np.asarray(jnp.asarray(rng.standard_normal((5, OUT)), cd))
    y, dx = _ours_forward_and_dx(ours, x, g)
    y_ref, dx_ref = _ref_forward_and_dx(ref, x, g)
    # float32: summation order only (~1e-7); 16-bit compute: one output ulp (2^-8 bf16, 2^-11 fp16)
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 4e-3}[compute_dtype]
    for ours_v, ref_v in ((y, y_ref), (dx, dx_ref)):
        assert np.abs(ours_v - ref_v).max() <= tol * np.abs(ref_v).max()
