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
from jaxlora.quant.tensor import QuantizedTensor
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
                         blocksize, "dynamic8")  # fmt: skip
    qs = F.QuantState(absmax=torch.from_numpy(absmax), code=F.create_dynamic_map(), blocksize=blocksize,
                      dtype=DTYPES[dtype][1])  # fmt: skip
    ref = bnb_ref.to_numpy(F.dequantize_blockwise(torch.from_numpy(q), qs))
    ours = np.asarray(dequantize_blockwise(qt))
    assert not np.isnan(ours).any()
    _bits_equal(ours, ref, "dequantized")
