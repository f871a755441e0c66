"""QuantConfig (jaxlora/quant/config.py) as the "how" of quantize: validated once, naming the bad value,
recorded on the tensor. Its transformers round trip and skip_modules: tests/models/test_loading.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.quant import QuantConfig, QuantizedTensor, quantize
from jaxlora.quant.bnb_functional import quantize_4bit, quantize_blockwise


@pytest.mark.parametrize("changes, message", [
    (dict(quant_storage="int4"), r"QuantConfig.quant_storage must be one of .*got 'int4'"),
    (dict(quant_type="dynamic8", double_quant=False, quant_storage="bfloat16"), r"'uint8' for .*got 'bfloat16'"),
    (dict(use_kernel="yes"), r"QuantConfig.use_kernel must be a bool or None, got 'yes'"),
    (dict(blocksize=64.0), r"QuantConfig.blocksize must be one of \(32, .*got 64.0"),
    (dict(skip_modules=("lm_head", 3)), r"QuantConfig.skip_modules must be .*\('lm_head', 3\)"),
])  # fmt: skip
def test_bad_values_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**changes)


def test_none_resolves_to_the_platform_once():
    c = QuantConfig()
    assert c.bnb_backend in ("cpu", "cuda") and isinstance(c.use_kernel, bool)
    assert c.replace(blocksize=128) == QuantConfig(blocksize=128)  # replace validates and keeps the rest
    with pytest.raises(ValueError, match="got 48"):
        c.replace(blocksize=48)


@pytest.mark.parametrize("config", [
    QuantConfig(quant_type="fp4", blocksize=128, double_quant=False, bnb_backend="cuda"),
    QuantConfig(quant_type="nf4", blocksize=32, double_quant=True, quant_storage="bfloat16", bnb_backend="cpu"),
    QuantConfig(quant_type="dynamic8", blocksize=256, double_quant=False, bnb_backend="cuda"),
])  # fmt: skip
def test_the_tensor_records_its_config(config):
    w = jax.random.normal(jax.random.key(0), (8, 256), jnp.bfloat16)
    qt = quantize(w, config)
    assert qt.config == config
    assert (qt.quant_type, qt.blocksize, qt.double_quant, qt.quant_storage) == (
        config.quant_type, config.blocksize, config.double_quant, config.quant_storage)
    assert (qt.nested_absmax is not None) == config.double_quant
    # static metadata: a jitted quantize returns the same treedef, config included
    assert jax.tree.structure(jax.jit(lambda a: quantize(a, config))(w)) == jax.tree.structure(qt)


def test_bnb_mirror_is_the_one_path():
    w = jax.random.normal(jax.random.key(1), (4, 128), jnp.float32)
    mirror = quantize_4bit(w, blocksize=128, quant_type="fp4", compress_statistics=True, bnb_backend="cuda")
    assert mirror.config == QuantConfig(quant_type="fp4", blocksize=128, double_quant=True, bnb_backend="cuda")
    for a, b in zip(jax.tree.leaves(mirror), jax.tree.leaves(quantize(w, mirror.config)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert quantize_blockwise(w, blocksize=256).config.quant_type == "dynamic8"
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'dynamic8'"):
        quantize_4bit(w, quant_type="dynamic8")


def test_validate_checks_leaves_against_the_config():
    qt = quantize(jnp.ones((4, 64)), QuantConfig(double_quant=False))
    with pytest.raises(ValueError, match=r"config.double_quant=True but nested_absmax is None"):
        QuantizedTensor(qt.codes, qt.absmax, None, None, qt.shape, qt.dtype, QuantConfig()).validate()
    with pytest.raises(TypeError, match="config must be a QuantConfig, got 'nf4'"):
        quantize(jnp.ones((4, 64)), "nf4")
