"""LoRALinear (dense and 4-bit base) against the PyTorch references: the seed's LoRALayer, PEFT's LoRA Linear,
and PEFT's LoRA over bitsandbytes' Linear4bit. B is nonzero everywhere, and every test also checks that
the adapted output differs from the base output, so a missing adapter cannot pass.

Tolerances (relative to the largest reference magnitude):
* fp32 closed forms: 1e-6 forward / merged weight (one GEMM's summation order); 1e-5 gradients (two
  chained GEMMs and a reduction over the batch).
* bf16 compute: 4e-3 (2^-8, one bf16 ulp): torch and XLA both accumulate bf16 GEMMs in float32, add the
  bias, and round once (measured: equal to ~1e-7 here), but summation orders differ between GEMM builds,
  so an output may land one bf16 ulp apart.
* SVD-based inits (PiSSA, LoftQ, "svd" combination): 1e-5 on sign-invariant quantities (B A, the
  residual); A and B themselves up to one sign per singular pair, which LAPACK builds choose freely.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from flax import nnx  # noqa: E402

from jaxlora.layers import LoRALinear, qlora_linear  # noqa: E402
from jaxlora.qlinear import QuantizedLinear  # noqa: E402
from jaxlora.quant import QuantConfig, quantize  # noqa: E402
from jaxlora.quant.bnb_format import from_bnb_state_dict  # noqa: E402
from torch_ref import lora_ref  # noqa: E402

# in_features a multiple of the blocksize: bitsandbytes' AVX512 CPU dequantize indexes absmax per row
# when in % 64 != 0 and in % 16 == 0 (spec "Known bnb bug"), so e.g. 96 would make the reference wrong.
IN, OUT, R, ALPHA = 128, 64, 8, 16


@pytest.fixture(autouse=True)
def _one_thread():
    # torch's float32 mean of absmax (double quantization's offset) depends on the thread count.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _np(t):
    return t.detach().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)


def _rel(actual, expected):
    actual, expected = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def _rand(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(scale)


def _dense_jax(w, b):
    lin = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(w.T))
    lin.bias.set_value(jnp.asarray(b))
    return lin


def _jax_forward_and_grads(layer, x, g):
    """y, dL/dA and dL/dB in PEFT layout, and dL/dx, for L = sum(y * g)."""
    def loss(model, x):
        return jnp.sum(model(x) * g)

    grads, dx = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1))(layer, jnp.asarray(x))
    ad = grads.adapters["default"]
    out = {"lora_A.weight": ad.lora_a.get_value().T, "lora_B.weight": ad.lora_b.get_value().T, "x": dx}
    if "magnitude" in ad:
        out["lora_magnitude_vector"] = ad["magnitude"].get_value()
    return layer(jnp.asarray(x)), out


def _torch_forward_and_grads(peft_layer, x, g, adapter="default"):
    xt = torch.tensor(x, requires_grad=True)
    y = peft_layer(xt)
    (y * torch.tensor(g)).sum().backward()
    out = {"lora_A.weight": peft_layer.lora_A[adapter].weight.grad,
           "lora_B.weight": peft_layer.lora_B[adapter].weight.grad, "x": xt.grad}
    if adapter in peft_layer.lora_magnitude_vector:
        out["lora_magnitude_vector"] = peft_layer.lora_magnitude_vector[adapter].weight.grad
    return y, out


def _set_torch_adapter(peft_layer, sd, adapter="default"):
    with torch.no_grad():
        peft_layer.lora_A[adapter].weight.copy_(torch.tensor(np.asarray(sd["lora_A.weight"])))
        peft_layer.lora_B[adapter].weight.copy_(torch.tensor(np.asarray(sd["lora_B.weight"])))
        if "lora_magnitude_vector" in sd:
            magnitude = torch.tensor(np.asarray(sd["lora_magnitude_vector"]))
            peft_layer.lora_magnitude_vector[adapter].weight.copy_(magnitude)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_vs_peft_and_seed(use_rslora):
    w, b, x, g = _rand(0, OUT, IN), _rand(1, OUT), _rand(2, 5, IN), _rand(3, 5, OUT)
    layer = LoRALinear(_dense_jax(w, b), r=R, lora_alpha=ALPHA, use_rslora=use_rslora, rngs=nnx.Rngs(1))
    ad = layer.adapters["default"]
    ad.lora_b.set_value(jnp.asarray(_rand(4, R, OUT, scale=0.1)))
    _, peft_layer = lora_ref.peft_model(lora_ref.dense_linear(w, b), r=R, lora_alpha=ALPHA, use_rslora=use_rslora)
    _set_torch_adapter(peft_layer, layer.peft_state())  # JAX -> PEFT transfer

    y, grads = _jax_forward_and_grads(layer, x, g)
    y_ref, grads_ref = _torch_forward_and_grads(peft_layer, x, g)
    assert _rel(y, y_ref) < 1e-6
    assert _rel(y, layer.base(jnp.asarray(x))) > 1e-2  # the adapter contributes
    for key in grads_ref:
        assert _rel(grads[key], grads_ref[key]) < 1e-5, key

    if not use_rslora:  # the seed's LoRALayer: alpha / r, no rsLoRA
        seed = lora_ref.LoRALayer(lora_ref.dense_linear(w, b), rank=R, alpha=ALPHA)
        with torch.no_grad():
            seed.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
            seed.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        assert _rel(y, seed(torch.tensor(x))) < 1e-6

    peft_layer.merge()
    layer.merge()
    assert _rel(layer.base.kernel.get_value().T, peft_layer.base_layer.weight) < 1e-6


def test_peft_to_jax_transfer_and_shape_errors():
    w, b = _rand(0, OUT, IN), _rand(1, OUT)
    _, peft_layer = lora_ref.peft_model(lora_ref.dense_linear(w, b), r=R, lora_alpha=ALPHA)
    _set_torch_adapter(peft_layer, {"lora_A.weight": _rand(5, R, IN), "lora_B.weight": _rand(6, OUT, R)})
    sd = {k.split(".default")[0].split("proj.")[-1] + ".weight": v.detach().numpy()
          for k, v in peft_layer.state_dict().items() if "lora_" in k}
    layer = LoRALinear(_dense_jax(w, b), r=R, lora_alpha=ALPHA, rngs=nnx.Rngs(1))
    layer.load_peft_state(sd)
    x = _rand(2, 5, IN)
    assert _rel(layer(jnp.asarray(x)), peft_layer(torch.tensor(x))) < 1e-6
    with pytest.raises(ValueError, match=r"lora_B.weight has shape \(64, 4\), expected \(64, 8\)"):
        layer.load_peft_state({"lora_A.weight": sd["lora_A.weight"], "lora_B.weight": sd["lora_B.weight"][:, :4]})


def test_dora_vs_peft():
    w, b, x, g = _rand(0, OUT, IN), _rand(1, OUT), _rand(2, 5, IN), _rand(3, 5, OUT)
    _, peft_layer = lora_ref.peft_model(lora_ref.dense_linear(w, b), r=R, lora_alpha=ALPHA, use_dora=True)
    layer = LoRALinear(_dense_jax(w, b), r=R, lora_alpha=ALPHA, use_dora=True, rngs=nnx.Rngs(1))
    # magnitude init: ||W|| per output feature (B = 0), computed independently on both sides
    assert _rel(layer.adapters["default"].magnitude.get_value(), peft_layer.lora_magnitude_vector["default"].weight) < 1e-6
    sd = {"lora_A.weight": _rand(5, R, IN, scale=0.1), "lora_B.weight": _rand(6, OUT, R, scale=0.1),
          "lora_magnitude_vector": _np(peft_layer.lora_magnitude_vector["default"].weight) * 1.2}
    layer.load_peft_state(sd)
    _set_torch_adapter(peft_layer, sd)
    y, grads = _jax_forward_and_grads(layer, x, g)
    y_ref, grads_ref = _torch_forward_and_grads(peft_layer, x, g)
    assert _rel(y, y_ref) < 1e-6 and _rel(y, layer.base(jnp.asarray(x))) > 1e-2
    for key in grads_ref:
        assert _rel(grads[key], grads_ref[key]) < 1e-5, key
    peft_layer.merge()
    layer.merge()
    assert _rel(layer.base.kernel.get_value().T, peft_layer.base_layer.weight) < 1e-6


def _align_signs(a, a_ref):
    """Flip each rank-1 component of a ``(r, in)`` A to the sign of the reference's."""
    signs = np.sign(np.sum(_np(a) * _np(a_ref), axis=1, keepdims=True))
    return _np(a) * signs, signs


def test_pissa_vs_peft():
    w, b = _rand(0, OUT, IN), _rand(1, OUT)
    _, peft_layer = lora_ref.peft_model(lora_ref.dense_linear(w, b), r=R, lora_alpha=ALPHA, init_lora_weights="pissa")
    layer = LoRALinear(_dense_jax(w, b), r=R, lora_alpha=ALPHA, init_lora_weights="pissa", rngs=nnx.Rngs(1))
    sd = layer.peft_state()
    a_ref, b_ref = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    assert _rel(layer.base.kernel.get_value().T, peft_layer.base_layer.weight) < 1e-5  # the residual
    assert _rel(sd["lora_B.weight"] @ sd["lora_A.weight"], b_ref @ a_ref) < 1e-5
    a_aligned, signs = _align_signs(sd["lora_A.weight"], a_ref)
    assert _rel(a_aligned, a_ref) < 1e-4 and _rel(_np(sd["lora_B.weight"]) * signs.T, b_ref) < 1e-4
    x = _rand(2, 5, IN)
    assert _rel(layer(jnp.asarray(x)), peft_layer(torch.tensor(x))) < 1e-5
    assert _rel(layer(jnp.asarray(x)), layer.base(jnp.asarray(x))) > 1e-2


@pytest.mark.parametrize("num_iter", [1, 2])
def test_loftq_vs_peft_algorithm(num_iter):
    # PEFT's loftq_init hard-codes a CUDA/XPU device; torch_ref.loftq_cpu runs its loop on CPU with the
    # same calls. Iteration 1 quantizes W itself: identical bytes, so Q must match exactly. Later
    # iterations quantize W - B A, where B A carries SVD rounding (~1e-7): a value within that of an NF4
    # threshold may take the neighbouring code, and a block's absmax may move by an ulp (moving the whole
    # block by ~1e-7): Q is compared by the share of elements off by more than that.
    w = _rand(0, OUT, IN)
    deq_ref, a_ref, b_ref = lora_ref.loftq_cpu(w, r=R, num_iter=num_iter)
    layer = LoRALinear(_dense_jax(w, _rand(1, OUT)), r=R, lora_alpha=R, init_lora_weights="loftq",
                       loftq_iter=num_iter, rngs=nnx.Rngs(1))
    q = np.asarray(layer.base.kernel.get_value().T)
    if num_iter == 1:
        np.testing.assert_array_equal(q, _np(deq_ref))
    else:
        flipped = np.abs(q - _np(deq_ref)) > 1e-5 * np.abs(_np(deq_ref)).max()
        assert np.mean(flipped) < 1e-3
    sd = layer.peft_state()
    assert _rel(sd["lora_B.weight"] @ sd["lora_A.weight"], b_ref @ a_ref) < 1e-4
    a_aligned, _ = _align_signs(sd["lora_A.weight"], a_ref)
    assert _rel(a_aligned, a_ref) < 1e-3
    # LoftQ's purpose: Q + B A is closer to W than Q alone
    assert np.abs(q + _np(b_ref @ a_ref) - w).mean() < np.abs(q - w).mean()


@pytest.mark.parametrize("combination_type", ["linear", "svd", "cat"])
def test_weighted_adapter_vs_peft(combination_type):
    w, b = _rand(0, OUT, IN), _rand(1, OUT)
    model, peft_layer = lora_ref.peft_model(lora_ref.dense_linear(w, b), r=R, lora_alpha=ALPHA)
    from peft import LoraConfig

    model.add_adapter("two", LoraConfig(target_modules=["proj"], r=R, lora_alpha=R))
    layer = LoRALinear(_dense_jax(w, b), r=R, lora_alpha=ALPHA, rngs=nnx.Rngs(1))
    layer.add_adapter("two", r=R, lora_alpha=R, rngs=nnx.Rngs(2))
    for i, name in enumerate(["default", "two"]):
        sd = {"lora_A.weight": _rand(10 + i, R, IN), "lora_B.weight": _rand(20 + i, OUT, R, scale=0.1)}
        layer.load_peft_state(sd, name)
        _set_torch_adapter(peft_layer, sd, name)
    kw = dict(combination_type=combination_type) | ({"svd_rank": R} if combination_type == "svd" else {})
    model.add_weighted_adapter(["default", "two"], [0.7, -0.4], "mix", **kw)
    layer.add_weighted_adapter(["default", "two"], [0.7, -0.4], "mix", **kw)
    delta_ref = peft_layer.get_delta_weight("mix")  # (out, in)
    assert _rel(layer.adapters["mix"].delta_weight().T, delta_ref) < 1e-5
    assert layer.adapters["mix"].scaling == peft_layer.scaling["mix"] == 1.0


@pytest.mark.parametrize(("compute_dtype", "tol"), [
    (torch.float32, 1e-5),  # same dequantized weight, fp32 GEMMs in different summation orders
    (torch.bfloat16, 4e-3),  # one bf16 ulp (2^-8): equal rounding seen (~1e-7), but GEMM order may differ by CPU
])
def test_qlora_vs_peft_bnb_linear4bit(compute_dtype, tol):
    w, b, x, g = _rand(0, OUT, IN), _rand(1, OUT), _rand(2, 5, IN), _rand(3, 5, OUT)
    bnb_layer = lora_ref.linear4bit(w, b, compute_dtype=compute_dtype)
    state = {k: v for k, v in bnb_layer.state_dict().items()}
    qt = from_bnb_state_dict(state)
    # jaxlora's own quantizer gives the same bytes from the same weight
    mine = quantize(jnp.asarray(w), QuantConfig(bnb_backend="cpu"))  # NF4 + double quant, Linear4bit's
    np.testing.assert_array_equal(mine.codes, qt.codes)
    np.testing.assert_array_equal(mine.absmax, qt.absmax)
    jdtype = jnp.float32 if compute_dtype == torch.float32 else jnp.bfloat16
    layer = qlora_linear(QuantizedLinear(qt.with_config(compute_dtype=jdtype), jnp.asarray(b)), r=R,
                         lora_alpha=ALPHA, rngs=nnx.Rngs(1))
    _, peft_layer = lora_ref.peft_model(bnb_layer, loaded_in_4bit=True, r=R, lora_alpha=ALPHA)
    assert type(peft_layer).__module__.endswith("lora.bnb")
    sd = {"lora_A.weight": _rand(5, R, IN), "lora_B.weight": _rand(6, OUT, R, scale=0.1)}
    _set_torch_adapter(peft_layer, sd)  # PEFT <- and -> JAX in the same layout
    layer.load_peft_state(sd)

    y, grads = _jax_forward_and_grads(layer, x, g)
    y_ref, grads_ref = _torch_forward_and_grads(peft_layer, x, g)
    assert _rel(y, y_ref) < tol
    assert _rel(y, layer.base(jnp.asarray(x))) > 1e-2
    for key in ("lora_A.weight", "lora_B.weight"):  # the adapter path is float32 either way
        assert _rel(grads[key], grads_ref[key]) < 1e-5, key
    assert _rel(grads["x"], grads_ref["x"]) < tol  # through the base's custom backward


def test_qlora_from_linear_matches_bnb_bytes():
    w, b = _rand(0, OUT, IN), _rand(1, OUT)
    state = lora_ref.linear4bit(w, b).state_dict()
    layer = qlora_linear(_dense_jax(w, b), r=R, lora_alpha=ALPHA, rngs=nnx.Rngs(1))
    ref = from_bnb_state_dict(state)
    np.testing.assert_array_equal(layer.base.weight.get_value().codes, ref.codes)
    np.testing.assert_array_equal(layer.base.weight.get_value().absmax, ref.absmax)
    np.testing.assert_array_equal(layer.base.weight.get_value().nested_absmax, ref.nested_absmax)
