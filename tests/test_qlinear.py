"""QuantizedLinear (jaxlora/qlinear.py): one construction path, settings owned by its weight's QuantConfig,
re-quantization that reproduces exactly what was asked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.layers import qlora_linear
from jaxlora.qlinear import QuantizedLinear
from jaxlora.quant import QuantConfig, quantize

OUT, IN = 48, 128
# Not the defaults in any setting: fp4, blocksize 128, no double quantization, CUDA's bytes.
ASKED = QuantConfig(quant_type="fp4", blocksize=128, double_quant=False, bnb_backend="cuda",
                    compute_dtype=jnp.float32, use_kernel=False)


def _weight(key=0) -> jax.Array:  # (out, in); its first block all zero: CPU and CUDA bytes differ there
    w = jax.random.normal(jax.random.key(key), (OUT, IN), jnp.float32)
    return w.at[0].set(0.0).at[1, :4].set(jnp.array([1.0, 0.001, -0.001, 0.0]))


def _same_bytes(a, b) -> None:  # exact: codes and scales are bitsandbytes' bytes
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_requantize_reproduces_the_asked_settings_and_backend():
    w, w2 = _weight(0), _weight(1)
    layer = QuantizedLinear(quantize(w, ASKED))
    layer.requantize(w2)
    qt = layer.weight.get_value()
    assert qt.config == ASKED and (qt.quant_type, qt.blocksize, qt.double_quant) == ("fp4", 128, False)
    _same_bytes(qt, quantize(w2, ASKED))
    # The backend matters for these bytes: a fall-back to "cpu" would be caught above.
    cpu = quantize(w2, ASKED.replace(bnb_backend="cpu"))
    assert not np.array_equal(np.asarray(cpu.codes), np.asarray(qt.codes))


def test_qlora_merge_requantizes_as_asked():
    # merge() goes through requantize: the merged base keeps fp4/128/no-DQ and CUDA's bytes.
    layer = qlora_linear(QuantizedLinear(quantize(_weight(), ASKED)), r=4, lora_alpha=8, rngs=nnx.Rngs(1))
    ad = layer.adapters["default"]
    ad.lora_b.set_value(jax.random.normal(jax.random.key(7), ad.lora_b.get_value().shape) * 0.1)
    merged = (layer.base.dequantize(jnp.float32).T + ad.delta_weight()).T  # (out, in), float32
    layer.merge()
    assert layer.base.config == ASKED
    _same_bytes(layer.base.weight.get_value(), quantize(merged, ASKED))


def test_from_linear_is_quantize_of_the_transposed_kernel():
    dense = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    dense.bias.set_value(jax.random.normal(jax.random.key(2), (OUT,)))
    layer = QuantizedLinear.from_linear(dense, ASKED)
    _same_bytes(layer.weight.get_value(), quantize(dense.kernel.get_value().T, ASKED))
    np.testing.assert_array_equal(layer.bias.get_value(), dense.bias.get_value())
    x = jax.random.normal(jax.random.key(3), (2, IN))
    expected = x @ layer.dequantize(jnp.float32).T + dense.bias.get_value()[None, :]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)  # fp32: summation order only
    assert not np.allclose(layer(x), dense(x), atol=1e-3)  # and it is the quantized weight that ran


def test_settings_have_one_owner_the_weights_config():
    layer = QuantizedLinear(quantize(_weight(), ASKED))
    assert (layer.compute_dtype, layer.use_kernel, layer.config) == (np.dtype(np.float32), False, ASKED)
    x = jax.random.normal(jax.random.key(3), (2, IN))
    y32 = layer(x)
    layer.weight.set_value(layer.weight.get_value().with_config(compute_dtype=jnp.bfloat16))
    assert layer.compute_dtype == jnp.bfloat16
    y16 = layer(x)  # the bf16 products: rounded differently
    assert y16.dtype == x.dtype and not np.array_equal(np.asarray(y16), np.asarray(y32))
    with pytest.raises(AttributeError):
        layer.compute_dtype = jnp.float16  # derived, not a second copy to drift


def test_with_config_refuses_to_relabel_the_format():
    qt = quantize(_weight(), ASKED)
    with pytest.raises(ValueError, match=r"cannot change \['blocksize', 'quant_type'\].*fp4/128"):
        qt.with_config(quant_type="nf4", blocksize=64)
    with pytest.raises(ValueError, match="QuantConfig.compute_dtype .*int8"):
        qt.with_config(compute_dtype=jnp.int8)
    assert qt.with_config(bnb_backend="cpu").config.bnb_backend == "cpu"


def test_constructor_takes_a_quantized_tensor_only():
    with pytest.raises(TypeError, match=r"QuantizedTensor \(jaxlora.quant.quantize\(w, config\)\), got ArrayImpl"):
        QuantizedLinear(_weight())
    with pytest.raises(ValueError, match=r"2-D \(out, in\), got shape \(48, 2, 64\)"):
        QuantizedLinear(quantize(_weight().reshape(OUT, 2, 64), ASKED))
