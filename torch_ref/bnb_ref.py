"""bitsandbytes (CPU backend) wrappers that produce reference values for the quantization parity tests.

Its values are the single-thread ones only under ``torch.set_num_threads(1)`` (parity_tests/conftest.py sets
it for the session; importing this module changes nothing): the double-quantization offset is torch's float32
mean, whose summation order (so its last bit) depends on the thread count once absmax has >= 32,768 entries.
"""

from __future__ import annotations

import numpy as np
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.cpu import ops as _cpu_ops

# csrc/cpu_ops.cpp dequantizeBlockwise4bitCpu, AVX512 path: absmax is indexed per row, which is wrong
# when rows do not align with blocks. bnb only takes that path for an even last dim and blocksize < 2048.
HAS_AVX512 = bool(_cpu_ops._has_avx512)


def avx512_dequant_is_buggy(shape: tuple[int, ...], blocksize: int) -> bool:
    """True where bnb's CPU dequantize_4bit gives wrong values here (never use those as truth)."""
    last = shape[-1]
    return HAS_AVX512 and blocksize < 2048 and last % 2 == 0 and last % blocksize != 0 and last % 16 == 0


def to_torch(a) -> torch.Tensor:
    """numpy / jax array (bfloat16 included) -> CPU torch tensor, bit for bit."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """CPU torch tensor -> numpy; bfloat16 comes back as ml_dtypes bfloat16, bit for bit."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def quantize_4bit(w, *, blocksize: int, quant_type: str, compress_statistics: bool):
    """bnb's 4-bit quantization of `w`: (fields as numpy, the bnb (packed, QuantState) pair)."""
    packed, qs = F.quantize_4bit(
        to_torch(w), blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics
    )
    fields = {"codes": packed.reshape(-1).numpy(), "absmax": qs.absmax.numpy()}
    if compress_statistics:
        fields |= {"nested_absmax": qs.state2.absmax.numpy(), "offset": np.float32(qs.offset.item())}
    return fields, (packed, qs)


def dequantize_4bit(packed, qs, dtype: torch.dtype) -> np.ndarray:
    """bnb's own dequantization (mind `avx512_dequant_is_buggy`)."""
    qs.dtype = dtype
    return to_numpy(F.dequantize_4bit(packed, qs))


def quantize_blockwise(x, *, blocksize: int):
    """bnb's 8-bit blockwise quantization with its default (signed dynamic) map: (codes, absmax)."""
    q, qs = F.quantize_blockwise(to_torch(x), blocksize=blocksize)
    return q.reshape(-1).numpy(), qs.absmax.numpy(), (q, qs)


def linear4bit(state_dict: dict, in_features: int, out_features: int, compute_dtype) -> bnb.nn.Linear4bit:
    """A CPU `bnb.nn.Linear4bit` (no bias) holding the 4-bit weight of `state_dict` (keys `weight*`).

    The AVX512-BF16 gemv path (which repacks the weight on the first eval forward) is switched off.
    """
    sd = {k: to_torch(v) for k, v in state_dict.items()}
    qt_key = next(k for k in sd if "quant_state" in k)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=compute_dtype,
        quant_type=qt_key.rsplit("__", 1)[1], device="cpu",
    )  # fmt: skip
    layer.support_avx512bf16_for_cpu = False
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    return layer
