"""Blockwise quantization at the edges bitsandbytes' own tests reach: negative absmax in
dequantize_blockwise (its test_dequantize_blockwise draws absmax from a normal) and blocks whose absmax is
so large that 1 / absmax is a subnormal float32 (>= ~8.5e37), in 4-bit and 8-bit and in
quantize-on-load. Compared with the installed bitsandbytes (CPU backend) bit for bit, as
test_quant_parity.py does.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bitsandbytes.functional as F

from jaxlora.quant import dequantize_blockwise
from jaxlora.quant import QuantConfig, QuantizedTensor
from torch_ref import bnb_ref

DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (jnp.bfloat16, torch.bfloat16)}  # fmt: skip


def _bits_equal(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (what, ours.dtype, ref.dtype, ours.shape, ref.shape)
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32}[ours.dtype.itemsize]
    diff = np.flatnonzero(ours.view(view).reshape(-1) != ref.view(view).reshape(-1))
    assert diff.size == 0, f"{what}: {diff.size} of {ours.size} differ, first at {diff[:5]}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("n", [1, 1000, 12289])
def test_dequantize_blockwise_negative_absmax(n, blocksize, dtype):
    """bitsandbytes test_dequantize_blockwise: random codes, absmax ~ N(0, 1) (about half negative)."""
    rng = np.random.default_rng(n + blocksize)
    q = rng.integers(0, 256, n, dtype=np.uint8)
    absmax = rng.standard_normal(-(-n // blocksize)).astype(np.float32)
    qt = QuantizedTensor(jnp.asarray(q), jnp.asarray(absmax), None, None, (n,), np.dtype(DTYPES[dtype][0]),
                         QuantConfig(quant_type="dynamic8", double_quant=False, blocksize=blocksize))
    qs = F.QuantState(absmax=torch.from_numpy(absmax), code=F.create_dynamic_map(), blocksize=blocksize,
                      dtype=DTYPES[dtype][1])  # fmt: skip
    ref = bnb_ref.to_numpy(F.dequantize_blockwise(torch.from_numpy(q), qs))
    ours = np.asarray(dequantize_blockwise(qt))
    assert not np.isnan(ours).any()
    _bits_equal(ours, ref, "dequantized")


def _huge(seed: int, n: int, dtype) -> np.ndarray:
    """Normal values with some blocks scaled so that absmax >= 2^126 (1 / absmax is subnormal), one block
    at the float32 maximum, and ordinary blocks beside them."""
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[:64] *= np.float32(1e38)
    x[64:128] *= np.float32(3e37)
    x[128:192] *= np.float32(9e36)  # absmax just around 2^126 = 8.5e37
    x[200] = np.float32(3.3e38)
    return np.asarray(np.clip(x, -3.3e38, 3.3e38), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
def test_4bit_blocks_with_subnormal_reciprocal(quant_type, compress, dtype):
    from jaxlora.quant import dequantize_4bit, quantize_4bit

    w = _huge(1, 64 * 24 + 41, DTYPES[dtype][0])  # a tail block; odd: bnb dequantizes on its generic path
    fields, (packed, qs) = bnb_ref.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=compress)
    qt = quantize_4bit(jnp.asarray(w), quant_type=quant_type, compress_statistics=compress)
    assert np.any(fields["codes"][:32] != fields["codes"][0])  # bnb keeps the values: not one code everywhere
    for name in fields:
        _bits_equal(getattr(qt, "nested_absmax" if name == "nested_absmax" else name), fields[name], name)
    # dequantized: fp32 (the odd-sized weight takes bnb's generic path, so its values are the truth here)
    ref = bnb_ref.dequantize_4bit(packed, qs, torch.float32).reshape(-1)
    ours = np.asarray(dequantize_4bit(qt, jnp.float32))
    _bits_equal(np.where(ours == 0, np.float32(0), ours), np.where(ref == 0, np.float32(0), ref), "values")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_8bit_blocks_with_subnormal_reciprocal(blocksize, dtype):
    from jaxlora.quant import quantize_blockwise

    x = _huge(2, 3000, DTYPES[dtype][0])
    q_ref, absmax_ref, (q, qs) = bnb_ref.quantize_blockwise(x, blocksize=blocksize)
    qt = quantize_blockwise(jnp.asarray(x), blocksize=blocksize)
    _bits_equal(qt.codes, q_ref, "codes")
    _bits_equal(qt.absmax, absmax_ref, "absmax")
    qs.dtype = torch.float32
    ref = bnb_ref.to_numpy(F.dequantize_blockwise(q, qs))
    _bits_equal(np.asarray(dequantize_blockwise(qt, jnp.float32)), ref, "values")


def test_quantize_on_load_of_huge_blocks_matches_transformers(tmp_path):
    """transformers + bitsandbytes quantizing a checkpoint whose up_proj holds blocks >= 2^126, beside
    jaxlora's quantize-on-load: the layer's bnb entries must be the same bytes."""
    from safetensors.numpy import load_file, save_file

    from jaxlora.models.loading import from_pretrained, state_dict
    from jaxlora.models.quantize import QuantConfig
    from torch_ref import hf_ref

    path = hf_ref.save_tiny_model("llama", tmp_path / "dense", seed=3)
    file = path / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.0.mlp.up_proj.weight"
    w = tensors[key]
    tensors[key] = _huge(4, w.size, np.float32).reshape(w.shape)
    save_file(tensors, file, metadata={"format": "pt"})
    hf = hf_ref.load_quantized_model(path, hf_ref.bnb_4bit_config(compute_dtype=torch.float32))
    theirs = {k: bnb_ref.to_numpy(v) for k, v in hf.state_dict().items() if k.startswith(key)}
    ours = {k: v for k, v in state_dict(from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.float32)))
            if k.startswith(key)}
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes(), k
