"""Code tables of bitsandbytes' 4-bit (NF4, FP4) and signed dynamic 8-bit formats, and the decision
thresholds each bitsandbytes backend uses to pick a code.

Every table is a literal copied from bitsandbytes 0.50.2 and asserted equal to
`bitsandbytes.functional.get_4bit_type` / `create_dynamic_map` in parity_tests/test_quant_parity.py.
Thresholds are derived here in float32 numpy, mirroring how each backend derives them (numpy does not
flush denormals or fuse multiply-adds, so these are exact IEEE float32 results).
"""

from __future__ import annotations

import functools

import numpy as np

# bitsandbytes get_4bit_type("nf4"); QLoRA (Dettmers et al. 2023) appendix E. Index = 4-bit code.
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# bitsandbytes get_4bit_type("fp4"): sign bit 0b1000, then a 3-bit E2M1-like magnitude, divided by 12.
# Index 8 is -0.0 here, as in the kernels that dequantize (csrc/cpu_ops.cpp fp4_lut, kernels.cu sign
# multiply); get_4bit_type has +0.0 there, which only its pure-torch fallback path uses. The two compare
# equal; only the sign of a dequantized zero differs.
FP4 = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32)
    / np.float32(12)
).astype(np.float32)

# bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), as float32 bit
# patterns: the table is built with torch.linspace (which uses FMA), so regenerating it in numpy could
# differ in the last bit. Sorted ascending; index 127 = 0.0, index 255 = 1.0.
DYNAMIC8 = np.array(
    [
        0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
        0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
        0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
        0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
        0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
        0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
        0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
        0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
        0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
        0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
        0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
        0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
        0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
        0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
        0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
        0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
        0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
        0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
        0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
        0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
        0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
        0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
        0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
        0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
        0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
        0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
        0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
        0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
        0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
        0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
        0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
        0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000
    ],
    dtype=np.uint32,
).view(np.float32)  # fmt: skip


def table(quant_type: str) -> np.ndarray:
    """The dequantization table of `quant_type` ("nf4", "fp4" or "dynamic8"), indexed by code."""
    return {"nf4": NF4, "fp4": FP4, "dynamic8": DYNAMIC8}[quant_type]


@functools.cache
def byte_table(quant_type: str) -> np.ndarray:
    """(256, 2) float32: row b holds the values of packed byte b's two 4-bit codes, high nibble first
    (the packing order of bitsandbytes and `blockwise._pack`), so a dequantization gathers once per byte."""
    code, b = table(quant_type), np.arange(256)
    return np.stack([code[b >> 4], code[b & 15]], axis=1).astype(np.float32)


# ---- CPU backend, 4-bit (bitsandbytes backends/default/ops.py, which the CPU backend uses) ----------
# torch.bucketize(x, mid) over the table sorted by torch.argsort, then remapped through that order:
# code = ORDER[#{i : mid[i] < x}]; a value equal to a midpoint takes the lower bucket.
FP4_CPU_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)


@functools.cache
def cpu_4bit_thresholds(quant_type: str) -> np.ndarray:
    """Midpoints f32((c[i] + c[i+1]) / 2) of the sorted table, as bitsandbytes' default backend has them."""
    code = table(quant_type)
    srt = code[FP4_CPU_ORDER] if quant_type == "fp4" else code  # -0.0 vs +0.0 changes no midpoint
    return ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32)


# ---- CUDA backend, 4-bit (csrc/kernels.cu dQuantizeNF4 / dQuantizeFP4 decision trees) ---------------
# The trees compare `x > t` against float literals; a monotone tree is equivalent to counting the
# thresholds x exceeds. The literals are rounded to float32 as nvcc does.
NF4_CUDA_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)  # fmt: skip
# dQuantizeFP4 compares |x| (sign bit 0b1000 set when x < 0) against these, ascending.
FP4_CUDA_MAG_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
# Magnitude code for "exceeds k thresholds", read off the tree's leaves.
FP4_CUDA_MAG_CODES = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)


# ---- CPU backend, 8-bit (csrc/cpu_ops.cpp build_quantize_lut / norm_to_lut_index) -------------------
LUT_SIZE = 65536


@functools.cache
def cpu_dynamic8_lut() -> np.ndarray:
    """bitsandbytes' CPU 65,536-bin code lookup table for the dynamic map (not an exact nearest search).

    lut[j] = #{i : mid[i] < f32(-1 + f32(2j) / 65535)}, mid[i] = f32(0.5 * (c[i] + c[i+1])).
    The index of a scaled value v in [-1, 1] is trunc(f32(f32(f32(v + 1) * 0.5) * 65535) + 0.5),
    without a fused multiply-add (checked against the library in the parity tests).
    """
    c = DYNAMIC8
    mid = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    j = np.arange(LUT_SIZE, dtype=np.float32)
    val = (np.float32(-1) + (np.float32(2) * j) / np.float32(LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)
