"""NNX layers (jaxlora/layers.py, adapter.py, base.py, inits.py): forward, trainability, modes, adapters,
merging, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlora import lora
from jaxlora.base import DenseBase
from jaxlora.layers import LoRALinear, qlora_linear
from jaxlora.mixed import Active
from jaxlora.qlinear import FrozenBias, QuantizedLinear, QuantizedWeight
from jaxlora.quant import QuantConfig, quantize

F32 = QuantConfig(compute_dtype=jnp.float32)  # NF4 + double quantization, float32 compute

IN, OUT, R = 64, 48, 4


def _x(key=0, shape=(3, IN)):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _nonzero_b(layer, name=None, key=7):
    ad = layer.adapters[name or next(iter(layer.adapters))]
    ad.lora_b.set_value(jax.random.normal(jax.random.key(key), ad.lora_b.get_value().shape, jnp.float32) * 0.1)
    return ad


def _layer(**kw):
    layer = LoRALinear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), r=R, lora_alpha=8, rngs=nnx.Rngs(1), **kw)
    _nonzero_b(layer)
    return layer


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_forward_is_base_plus_delta_and_differs_from_base():
    layer, x = _layer(), _x()
    ad = layer.adapters["default"]
    expected = layer.base(x) + lora.delta(x, ad.lora_a.get_value(), ad.lora_b.get_value(), 2.0)
    assert _rel(layer(x), expected) < 1e-6
    assert _rel(layer(x), layer.base(x)) > 1e-2  # the adapter is really there


def test_fresh_adapter_is_identity():
    layer = LoRALinear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), r=R, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(layer(_x()), layer.base(_x()))


def test_only_adapters_train():
    layer, x = _layer(use_dora=True), _x()
    base_before = layer.base.kernel.get_value()
    ad_before = jax.tree.map(jnp.copy, nnx.state(layer, nnx.LoRAParam))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(grads))}
    assert paths == {("adapters", "default", n) for n in ("lora_a", "lora_b", "magnitude")}
    # sgd: optax.adam trips the strict dtype-promotion mode (its bias correction mixes int32 and float)
    opt = nnx.Optimizer(layer, optax.sgd(1e-1), wrt=nnx.LoRAParam)
    opt.update(layer, grads)
    np.testing.assert_array_equal(layer.base.kernel.get_value(), base_before)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), nnx.state(layer, nnx.LoRAParam), ad_before)
    assert all(jax.tree.leaves(moved))


def test_dropout_on_adapter_input_only_and_off_in_eval():
    layer, x = _layer(lora_dropout=0.5), _x()
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert _rel(y1, y2) > 1e-3  # fresh masks
    np.testing.assert_array_equal(layer(x, Active(None)), layer.base(x))  # the base never sees dropout
    layer.eval()
    ad = layer.adapters["default"]
    expected = layer.base(x) + lora.delta(x, ad.lora_a.get_value(), ad.lora_b.get_value(), 2.0)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_dense(use_dora):
    layer, x = _layer(use_dora=use_dora), _x()
    if use_dora:
        layer.adapters["default"].magnitude.set_value(layer.adapters["default"].magnitude.get_value() * 1.1)
    y, k = layer(x), layer.base.kernel.get_value()
    layer.merge()
    assert _rel(layer(x), y) < 1e-6  # fp32 merge: one rounding per weight element
    with pytest.raises(ValueError, match="'default' is already merged"):
        layer.merge()
    layer.unmerge()
    assert _rel(layer.base.kernel.get_value(), k) < 1e-6
    dense = layer.merge_and_unload()
    assert isinstance(dense, nnx.Linear) and _rel(dense(x), y) < 1e-6


def test_dora_starts_at_base():
    layer = LoRALinear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), r=R, use_dora=True, rngs=nnx.Rngs(1))
    assert _rel(layer(_x()), layer.base(_x())) < 1e-6


def test_named_adapters():
    layer, x = _layer(), _x()
    y_default = layer(x)
    layer.add_adapter("other", r=2, lora_alpha=4, rngs=nnx.Rngs(2))
    _nonzero_b(layer, "other", key=9)
    np.testing.assert_array_equal(layer(x, Active("default")), y_default)
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'other'\]; name the one"):
        layer(x)  # two adapters: the caller says which runs (a PeftModel does)
    assert _rel(layer(x, Active("other")), y_default) > 1e-2
    np.testing.assert_array_equal(layer(x, Active(None)), layer.base(x))  # disabled
    np.testing.assert_array_equal(layer(x, Active("nope")), layer.base(x))  # an adapter this layer lacks
    layer.merge("other")
    with pytest.raises(ValueError, match="'other' is merged into the base, but 'default' was asked"):
        layer(x, Active("default"))
    layer.unmerge()
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        layer.delete_adapter("nope")
    layer.delete_adapter("other")
    assert list(layer.adapters) == ["default"]
    assert _rel(layer(x), y_default) < 1e-6  # the merge / unmerge round trip rounded the kernel once each way


def test_weighted_adapters():
    layer, x = _layer(), _x()
    layer.add_adapter("b", r=R, lora_alpha=4, rngs=nnx.Rngs(2))
    _nonzero_b(layer, "b", key=9)
    deltas = [layer.adapters[n].delta_weight() for n in ("default", "b")]
    layer.add_weighted_adapter(["default", "b"], [0.6, 0.4], "mix", combination_type="svd", svd_rank=2 * R)
    assert _rel(layer(x, Active("mix")), layer.base(x) + x @ (0.6 * deltas[0] + 0.4 * deltas[1])) < 1e-5
    layer.add_weighted_adapter(["b"], [0.5], "half", combination_type="linear")
    assert _rel(layer(x, Active("half")), layer.base(x) + x @ (0.5 * deltas[1])) < 1e-6


def test_peft_layout_roundtrip_and_errors():
    layer = _layer()
    sd = layer.peft_state()
    assert sd["lora_A.weight"].shape == (R, IN) and sd["lora_B.weight"].shape == (OUT, R)
    other = LoRALinear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), r=R, lora_alpha=8, rngs=nnx.Rngs(5))
    other.load_peft_state(sd)
    np.testing.assert_array_equal(other(_x()), layer(_x()))
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(48, 64\), expected \(4, 64\)"):
        other.load_peft_state({"lora_A.weight": jnp.zeros((OUT, IN)), "lora_B.weight": sd["lora_B.weight"]})


@pytest.mark.parametrize(("kw", "match"), [
    (dict(r=0), "r=0"), (dict(r=4.0), "r=4.0"), (dict(r=4, lora_alpha=-1.0), "lora_alpha=-1.0"),
    (dict(r=4, init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(r=IN, init_lora_weights="pissa"), "PiSSA takes r <= min"),
])
def test_bad_knobs(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), **kw)


def test_rank_above_the_smaller_dimension_trains_and_merges():
    layer = LoRALinear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), r=IN, init_lora_weights=False, rngs=nnx.Rngs(1))
    assert IN > min(IN, OUT) and layer.adapters["default"].lora_a.get_value().shape == (IN, IN)
    y = layer(_x())
    merged = layer.merge_and_unload()
    np.testing.assert_allclose(np.asarray(merged(_x())), np.asarray(y), rtol=1e-5, atol=1e-5)


# --- quantized base -----------------------------------------------------------------------------------


def test_quantized_linear_is_frozen_storage():
    q = QuantizedLinear.from_linear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), QuantConfig(compute_dtype=jnp.float32))
    assert isinstance(q.weight, QuantizedWeight) and isinstance(q.bias, FrozenBias)
    assert not jax.tree.leaves(nnx.state(q, nnx.Param))
    assert q.weight.get_value().shape == (OUT, IN) and q.weight.get_value().double_quant


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_qlora_forward_and_grads(compute_dtype):
    dense = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    layer = qlora_linear(dense, r=R, lora_alpha=8, quantization=QuantConfig(compute_dtype=compute_dtype),
                                    rngs=nnx.Rngs(1))
    ad = _nonzero_b(layer)
    x = _x()
    w = layer.base.dequantize(jnp.float32)  # (out, in)
    bias = layer.base.bias.get_value().astype(compute_dtype)[None, :]
    expected = x.astype(compute_dtype) @ w.astype(compute_dtype).T + bias
    expected = expected.astype(jnp.float32) + lora.delta(x, ad.lora_a.get_value(), ad.lora_b.get_value(), 2.0)
    assert _rel(layer(x), expected) < 1e-6
    assert _rel(layer(x), layer.base(x)) > 1e-2
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)))(layer)
    assert {p[-1] for p, _ in nnx.to_flat_state(nnx.state(grads))} == {"lora_a", "lora_b"}


def test_qlora_merge_error_is_a_requantization():
    # Merging into a 4-bit base re-quantizes W + dW (as PEFT). The added error is of the order of
    # quantizing W itself; measured, not zero. The dense merge_and_unload adds no quantization.
    dense = nnx.Linear(256, 256, rngs=nnx.Rngs(0))
    layer = qlora_linear(dense, F32, r=8, lora_alpha=16, rngs=nnx.Rngs(1))
    ad = _nonzero_b(layer)
    ad.lora_b.set_value(ad.lora_b.get_value() * 0.1)
    x = _x(shape=(16, 256))
    y = layer(x)
    exact = layer.base.dequantize(jnp.float32).T + ad.delta_weight()
    unloaded = layer.merge_and_unload(requantize=False)
    assert _rel(unloaded.kernel.get_value(), exact) < 1e-6 and _rel(unloaded(x), y) < 1e-5
    layer.merge()
    merged_err = _rel(layer.base.dequantize(jnp.float32).T, exact)
    quant_err = _rel(layer.base.dequantize(jnp.float32).T, dense.kernel.get_value())  # vs the original W
    print(f"requantized merge: weight rel err {merged_err:.4f}, output rel err {_rel(layer(x), y):.4f}")
    assert 0 < merged_err < 0.15  # NF4: |error| <= half a code gap (~0.08 of absmax) per element
    assert quant_err > 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_merge_and_unload_is_the_same_after_merge(use_dora):
    # After merge() the quantized base already holds W + delta: merge_and_unload must not add it again.
    layer = qlora_linear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), F32, r=R, lora_alpha=8, use_dora=use_dora,
                         rngs=nnx.Rngs(1))
    _nonzero_b(layer)
    x = _x()
    y = layer(x)
    fresh = layer.merge_and_unload()  # the default: dense dequantize(W) + delta, no new quantization
    assert isinstance(fresh, nnx.Linear) and _rel(fresh(x), y) < 1e-5  # fp32 merge, one rounding each
    layer.merge()
    merged = layer.base.dequantize(jnp.float32).T
    again = layer.merge_and_unload()
    assert isinstance(again, nnx.Linear)
    np.testing.assert_array_equal(again.kernel.get_value(), merged)  # W as merged, the delta not added twice
    assert _rel(again.kernel.get_value(), fresh.kernel.get_value()) < 0.15  # only merge()'s NF4 re-quantization
    codes = layer.base.weight.get_value().codes
    assert layer.merge_and_unload(requantize=True) is layer.base  # PEFT's way: the re-quantized base
    np.testing.assert_array_equal(layer.base.weight.get_value().codes, codes)  # ... merged once


@pytest.mark.parametrize(("quant_type", "blocksize"), [("dynamic8", 256), ("fp4", 128)])
def test_qlora_merge_requantizes_with_the_stored_settings(quant_type, blocksize):
    config = QuantConfig(quant_type=quant_type, blocksize=blocksize, double_quant=False, compute_dtype=jnp.float32)
    w = jax.random.normal(jax.random.key(3), (OUT, IN), jnp.bfloat16)
    layer = qlora_linear(QuantizedLinear(quantize(w, config)), r=R, lora_alpha=8, rngs=nnx.Rngs(1))
    ad = _nonzero_b(layer)
    x = _x()
    y = layer(x)
    # merge's arithmetic: W dequantized to its stored dtype, + delta in float32, rounded back (out, in)
    exact = (layer.base.dequantize().astype(jnp.float32).T + ad.delta_weight()).T.astype(jnp.bfloat16)
    layer.merge()
    qt, expected = layer.base.weight.get_value(), quantize(exact, config)
    assert (qt.quant_type, qt.blocksize, qt.dtype, qt.double_quant) == (quant_type, blocksize, jnp.bfloat16, False)
    np.testing.assert_array_equal(qt.codes, expected.codes)  # the same quantizer, byte for byte
    np.testing.assert_array_equal(qt.absmax, expected.absmax)
    # 8-bit's error is far below 4-bit's; both are re-quantizations of W + delta, not zero.
    assert 0 < _rel(layer(x), y) < (0.02 if quant_type == "dynamic8" else 0.15)


def test_qlora_over_a_quantized_base_takes_it_as_it_is():
    # Unset settings keep the base's; agreeing ones are accepted; a disagreeing one is refused, naming both
    # (the base is never re-quantized nor edited: asked fp4/128/no-DQ of an nf4/64/DQ base, it used to be ignored).
    def qbase():
        return QuantizedLinear.from_linear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)),
                                           QuantConfig(compute_dtype=jnp.float32))

    assert qlora_linear(qbase(), r=R, rngs=nnx.Rngs(1)).base.compute_dtype == jnp.float32
    same = QuantConfig(quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=jnp.float32)
    layer = qlora_linear(qbase(), same, r=R, rngs=nnx.Rngs(1))
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantizedLinear)
    base = qbase()
    for kw, match in [(dict(quant_type="fp4"), "quant_type='nf4' \\(asked 'fp4'\\)"),
                      (dict(blocksize=128), "blocksize=64 \\(asked 128\\)"),
                      (dict(double_quant=False), "double_quant=True \\(asked False\\)"),
                      (dict(compute_dtype=jnp.bfloat16), "compute_dtype='float32' \\(asked 'bfloat16'\\)")]:
        with pytest.raises(ValueError, match="already quantized with " + match):
            qlora_linear(base, dataclasses.replace(same, **kw), r=R, rngs=nnx.Rngs(1))
    assert base.compute_dtype == jnp.float32  # the caller's layer untouched
    with pytest.raises(ValueError, match="init_lora_weights='pissa' needs the dense weight"):
        qlora_linear(qbase(), r=R, init_lora_weights="pissa", rngs=nnx.Rngs(1))


@pytest.mark.parametrize("init", [True, "pissa", "loftq"])
def test_the_callers_layer_is_not_edited(init):
    # LoRALinear holds copies of an nnx.Linear's variables: PiSSA's residual, LoftQ's dequantized weight and
    # merges stay in the layer; quantizing (qlora_linear) leaves the dense layer as it was.
    dense = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    kernel = dense.kernel.get_value()
    for build in (LoRALinear, qlora_linear):
        layer = build(dense, r=R, lora_alpha=R, init_lora_weights=init, rngs=nnx.Rngs(1))
        _nonzero_b(layer)
        layer.merge()
        assert type(dense) is nnx.Linear and dense.kernel.get_value() is kernel
    assert isinstance(LoRALinear(dense, r=R, rngs=nnx.Rngs(1)).base, DenseBase)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_merging_keeps_the_graph(use_dora, quantized):
    # DoRA's magnitude and merge norm exist from construction: merging changes only values (and the static
    # record of what is merged), so a split state stays valid and unmerging gives back the same graphdef.
    build = qlora_linear if quantized else LoRALinear
    layer = build(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), r=R, use_dora=use_dora, rngs=nnx.Rngs(1))
    _nonzero_b(layer)
    graph, state = nnx.split(layer)
    paths = {p: type(v) for p, v in nnx.to_flat_state(state)}
    assert (("adapters", "default", "dora_norm") in paths) == use_dora
    layer.merge()
    merged = {p: type(v) for p, v in nnx.to_flat_state(nnx.state(layer))}
    assert merged == paths
    layer.unmerge()
    assert nnx.graphdef(layer) == graph
    assert {p: type(v) for p, v in nnx.to_flat_state(nnx.state(layer))} == paths


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_qlora_inits_from_the_dense_weight(init):
    # PiSSA quantizes the residual, LoftQ fits B A to the quantization error: either way the adapted
    # layer is closer to the dense one than quantizing W and adding a zero adapter.
    def dense():
        return nnx.Linear(128, 64, rngs=nnx.Rngs(0))

    w = dense().kernel.get_value()
    plain = qlora_linear(dense(), F32, r=8, lora_alpha=8, rngs=nnx.Rngs(1))
    layer = qlora_linear(dense(), F32, r=8, lora_alpha=8, init_lora_weights=init, use_dora=True, rngs=nnx.Rngs(1))
    ad = layer.adapters["default"]
    effective = layer.base.dequantize(jnp.float32).T + ad.delta_weight()
    def frob(a):
        return float(jnp.linalg.norm(a - w))

    assert frob(effective) < frob(plain.base.dequantize(jnp.float32).T)
    x = _x(shape=(4, 128))
    assert _rel(layer(x), x @ effective + layer.base.bias.get_value()[None, :]) < 1e-5  # DoRA at init: m = ||W'||


def test_bases_implement_the_protocol():
    # What LoRALinear reads of a base (jaxlora/base.py), for each kind: the unbiased product plus the bias
    # is the base's output, the dense kernel round-trips through set_kernel, to_dense computes the same.
    from jaxlora.base import EmbedBase, KernelBase, LinearBase, as_base

    x = _x()
    dense = as_base(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)))
    quant = QuantizedLinear.from_linear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)), F32)
    for base in (dense, quant):
        assert isinstance(base, LinearBase)
        bias = base.bias.get_value()[None, :]
        np.testing.assert_allclose(base.matmul(x) + bias, base(x), rtol=1e-6, atol=1e-6)
        assert type(base.to_dense()) is nnx.Linear and _rel(base.to_dense()(x), base(x)) < 1e-6
        kernel = base.dense_kernel(jnp.float32)
        assert kernel.shape == (IN, OUT)
        base.set_kernel(kernel * 2)
        assert _rel(base.dense_kernel(jnp.float32), 2 * kernel) < (1e-6 if base is dense else 0.15)
    np.testing.assert_array_equal(dense.matmul(x) + dense.bias.get_value()[None, :], dense(x))  # flax's own sum
    assert quant.unwrap() is quant and type(dense.unwrap()) is nnx.Linear
    embed = as_base(nnx.Embed(10, 6, rngs=nnx.Rngs(0)))
    assert isinstance(embed, EmbedBase) and isinstance(embed, KernelBase) and not isinstance(embed, LinearBase)
    np.testing.assert_array_equal(embed.dense_kernel(jnp.float32), embed.embedding.get_value())
    with pytest.raises(TypeError, match="cannot adapt a LayerNorm"):
        as_base(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
