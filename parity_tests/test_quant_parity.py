"""jaxlora.quant vs the installed bitsandbytes (CPU backend), byte for byte.

Everything here checks ``bnb_backend="cpu"``. The ``"cuda"`` choices were implemented from a reading of
csrc/kernels.cu (kQuantizeBlockwise, dQuantizeNF4/FP4, dQuantize<0>) with no GPU to run them; they are
covered by tests/quant/test_blockwise.py against that reading, not against bitsandbytes.

Tolerances: none. Codes, absmax, nested state and offset are compared as bit patterns; dequantized
values too (only the sign of zero is allowed to differ, where bnb's pure-torch fallback uses +0.0).
"""

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

from jaxlora.quant import codes as C
from jaxlora.quant import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from jaxlora.quant import from_bnb_state_dict, to_bnb_state_dict
from jaxlora.quant.double_quant import dequantize_absmax, torch_mean_f32
from torch_ref import bnb_ref

DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (jnp.bfloat16, torch.bfloat16)}  # fmt: skip


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bits_equal(ours, ref, what):
    """Bitwise equality; any NaN equals any NaN (a payload is not part of the format)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.dtype.kind == "f" and ref.dtype == ours.dtype:
        nan = np.asarray(np.nan, ours.dtype)
        ours, ref = np.where(np.isnan(ours), nan, ours), np.where(np.isnan(ref), nan, ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape, ours.dtype, ref.dtype)
    diff = np.flatnonzero(bits(ours).reshape(-1) != bits(ref).reshape(-1))
    assert diff.size == 0, f"{what}: {diff.size} of {ours.size} differ, first at {diff[:5]}"


def assert_values_equal(ours, ref, what):
    """Bitwise, except +0.0 == -0.0."""
    o, r = np.asarray(ours).astype(np.float32), np.asarray(ref).astype(np.float32)
    o, r = np.where(o == 0, np.float32(0), o), np.where(r == 0, np.float32(0), r)
    assert_bits_equal(o, r, what)


def assert_same_quant(qt, ref):
    assert_bits_equal(qt.codes, ref["codes"], "codes")
    assert_bits_equal(qt.absmax, ref["absmax"], "absmax")
    if "offset" in ref:
        assert_bits_equal(qt.nested_absmax, ref["nested_absmax"], "nested_absmax")
        assert_bits_equal(qt.offset, ref["offset"], "offset")


def reference_dequant(ref, shape, quant_type, blocksize, np_dtype):
    """Dequantize bnb's bytes in numpy, independently of bnb's kernels (for the AVX512-buggy shapes)."""
    absmax = ref["absmax"]
    if "offset" in ref:  # two float32 roundings, as bnb: dequantize_blockwise, then + offset
        code8 = C.DYNAMIC8[absmax]
        nested = np.repeat(ref["nested_absmax"], 256)[: absmax.size]
        absmax = (code8 * nested).astype(np.float32) + ref["offset"]
    table = F.get_4bit_type(quant_type, device="cpu").numpy()
    q = np.stack([ref["codes"] >> 4, ref["codes"] & 15], axis=1).reshape(-1)[: int(np.prod(shape))]
    out = (table[q] * np.repeat(absmax, blocksize)[: q.size]).astype(np.float32)
    return bnb_ref.to_numpy(torch.from_numpy(out).to(DTYPES[np.dtype(np_dtype).name][1])).reshape(shape)


def check_4bit(w, blocksize, quant_type, compress, dequant=True):
    ref, (packed, qs) = bnb_ref.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=compress)  # fmt: skip
    qt = quantize_4bit(jnp.asarray(w), blocksize=blocksize, quant_type=quant_type, compress_statistics=compress,
                       allow_non_finite=True)  # fmt: skip
    assert_same_quant(qt, ref)
    if not dequant:
        return
    for name, (np_dtype, torch_dtype) in DTYPES.items():
        ours = np.asarray(dequantize_4bit(qt, np_dtype))
        assert_values_equal(ours, reference_dequant(ref, w.shape, quant_type, blocksize, np_dtype), f"dq {name}")
        # bnb's own dequant: not on its AVX512-buggy shapes, and it crashes on some 3-D ones (t() on 3-D)
        if not bnb_ref.avx512_dequant_is_buggy(w.shape, blocksize) and w.ndim <= 2:
            bnb_out = bnb_ref.dequantize_4bit(packed, qs, torch_dtype)
            assert bnb_out.size == ours.size
            # bnb returns some 1-D shapes as (n, 1); the values are what is compared
            assert_values_equal(ours, bnb_out.reshape(ours.shape), f"bnb dq {name}")


def awkward(rng, shape, dtype, kind):
    n = int(np.prod(shape))
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "heavy":  # Cauchy tails: a few huge values dominate their blocks
        x = np.clip(rng.standard_cauchy(n), -6e4, 6e4)  # finite in float16 too
    elif kind == "zeros":  # whole zero blocks, a zero tail and signed zeros among data
        x = rng.standard_normal(n) * (rng.random(n) < 0.5)
        x[: min(n // 2, 128)] = 0.0
        x[-min(n // 4, n % 64 or 64) :] = -0.0  # (not all: an all-zero tensor has subnormal nested state)
    elif kind == "thresholds":  # values exactly on the CPU midpoints of a block whose absmax is 1
        t = np.concatenate([C.cpu_4bit_thresholds("nf4"), C.cpu_4bit_thresholds("fp4"), [1.0, -1.0]])
        x = rng.choice(t, n)
        x[::32] = 1.0
    elif kind == "tiny":  # FP4's sign-of-zero band and the (0.583333, 0.58333337] band
        x = rng.choice([0.001, -0.001, 0.0, -0.0, 0.5833331, 0.58333336, 0.58333337, 1.0], n)
    return np.asarray(x.astype(np.float32).reshape(shape), dtype=dtype)


def test_tables_equal_bitsandbytes():
    np.testing.assert_array_equal(C.NF4, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(C.FP4, F.get_4bit_type("fp4", device="cpu").numpy())  # -0.0 == +0.0
    assert_bits_equal(C.DYNAMIC8, F.create_dynamic_map(signed=True).numpy(), "dynamic map")
    for qtype in ("nf4", "fp4"):
        bounds, order = _get_4bit_quantize_bounds(qtype, torch.device("cpu"))
        assert_bits_equal(C.cpu_4bit_thresholds(qtype), bounds.numpy(), f"{qtype} midpoints")
        if qtype == "fp4":
            np.testing.assert_array_equal(C.FP4_CPU_ORDER, order.numpy())


@pytest.mark.parametrize("n", [*range(1, 40), 63, 64, 65, 255, 256, 257, 4095, 4097, 40_000, 262_144])
def test_offset_is_torch_single_thread_mean(n):
    x = np.random.default_rng(n).gamma(2.0, 0.02, n).astype(np.float32)
    assert_bits_equal(jax.jit(torch_mean_f32)(jnp.asarray(x)), np.float32(torch.from_numpy(x).mean().item()), "mean")


def test_nested_dequant_rounds_twice_not_fma():
    """Every (code, nested scale) pair with an offset: XLA must not fuse code*scale + offset into an FMA."""
    rng = np.random.default_rng(0)
    q = np.arange(65536, dtype=np.int64) % 256
    nested = rng.uniform(0.01, 0.2, 256).astype(np.float32)
    offset = np.float32(0.05491256)
    ours = jax.jit(dequantize_absmax, static_argnums=3)(jnp.asarray(q.astype(np.uint8)), jnp.asarray(nested),
                                                         jnp.asarray(offset), 256)  # fmt: skip
    qs = F.QuantState(absmax=torch.from_numpy(nested), code=F.create_dynamic_map(), blocksize=256, dtype=torch.float32)
    ref = F.dequantize_blockwise(torch.from_numpy(q.astype(np.uint8)), qs).numpy() + offset
    assert_bits_equal(ours, ref, "absmax")


def test_8bit_lut_index_has_no_fma():
    """Values within a few ulps of the CPU lookup table's bin edges (an FMA there changes ~0.1% of them)."""
    rng = np.random.default_rng(1)
    j = rng.integers(0, 65535, 60_000)
    v = ((j + 0.5) / 65535 * 2 - 1).astype(np.float32)
    v = (v.view(np.int32) + rng.integers(-3, 4, v.size).astype(np.int32)).view(np.float32)
    x = np.clip(v[np.isfinite(v)], -1, 1)[: 256 * 200].reshape(-1, 256)
    x[:, 0] = 1.0
    q_ref, absmax_ref, _ = bnb_ref.quantize_blockwise(x.ravel(), blocksize=256)
    qt = quantize_blockwise(jnp.asarray(x.ravel()), blocksize=256)
    assert_bits_equal(qt.codes, q_ref, "codes")
    assert_bits_equal(qt.absmax, absmax_ref, "absmax")


# (130, 48) and (513, 16) are shapes where bnb's AVX512 dequant is wrong; 4-D, odd counts, 1 element.
CASES = [((130, 48), 64), ((7,), 64), ((3, 5, 7), 32), ((4097,), 4096), ((33, 65), 128),
         ((2, 3, 4, 5), 2048), ((513, 16), 1024)]  # fmt: skip


@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros", "thresholds", "tiny"])
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_4bit_awkward(shape, blocksize, kind):
    rng = np.random.default_rng(zlib.crc32(repr((shape, blocksize, kind)).encode()))
    dtype = list(DTYPES)[rng.integers(3)]  # each case one input dtype; dequant checks all three outputs
    w = awkward(rng, shape, DTYPES[dtype][0], kind)
    for qtype in ("nf4", "fp4"):
        check_4bit(w, blocksize, qtype, compress=qtype == "nf4")


def test_4bit_large_double_quant():
    """4096x4096 weight: 262,144 blocks, so torch would split the mean across threads if not pinned."""
    w = np.random.default_rng(2).standard_normal((1024, 4096)).astype(np.float32) * 0.02
    w = np.concatenate([w] * 4)  # 4096 x 4096 without paying for more random numbers
    check_4bit(np.asarray(w, jnp.bfloat16), 64, "nf4", compress=True, dequant=False)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
    dtype=st.sampled_from(list(DTYPES)),
    qtype=st.sampled_from(["nf4", "fp4"]),
    compress=st.booleans(),
    kind=st.sampled_from(["normal", "heavy", "zeros"]),
    seed=st.integers(0, 2**31),
)
def test_4bit_hypothesis(shape, blocksize, dtype, qtype, compress, kind, seed):
    w = awkward(np.random.default_rng(seed), tuple(shape), DTYPES[dtype][0], kind)
    check_4bit(w, blocksize, qtype, compress)


def test_one_changed_byte_fails():
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    ref, _ = bnb_ref.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qt = quantize_4bit(jnp.asarray(w), compress_statistics=True)
    assert_same_quant(qt, ref)
    for field in ("codes", "absmax", "nested_absmax"):
        bad = dict(ref)
        bad[field] = ref[field].copy()
        bits(bad[field]).reshape(-1)[17 % bad[field].size] ^= 1
        with pytest.raises(AssertionError):
            assert_same_quant(qt, bad)
    with pytest.raises(AssertionError):
        assert_same_quant(qt, dict(ref, offset=np.nextafter(ref["offset"], np.float32(1))))


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("n", [1, 1000, 5000, 12289])
def test_8bit_blockwise(n, blocksize):
    x = awkward(np.random.default_rng(n), (n,), np.float32, "zeros" if n > 1000 else "heavy")
    for dtype, (np_dtype, torch_dtype) in DTYPES.items():
        xd = np.asarray(x, np_dtype)
        q_ref, absmax_ref, (q, qs) = bnb_ref.quantize_blockwise(xd, blocksize=blocksize)
        qt = quantize_blockwise(jnp.asarray(xd), blocksize=blocksize)
        assert_bits_equal(qt.codes, q_ref, "codes")
        assert_bits_equal(qt.absmax, absmax_ref, "absmax")
        qs.dtype = torch_dtype
        assert_values_equal(dequantize_blockwise(qt), bnb_ref.to_numpy(F.dequantize_blockwise(q, qs)), "dq")


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_non_finite_follow_cpu_backend(qtype):
    w = np.random.default_rng(4).standard_normal(300).astype(np.float32)
    w[5], w[70], w[140], w[299] = np.nan, np.inf, -np.inf, np.nan  # NaN also in the tail block
    check_4bit(w, 64, qtype, compress=False, dequant=False)
    with pytest.raises(ValueError, match="4 non-finite values .*index 5"):
        quantize_4bit(jnp.asarray(w))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_state_dict_from_bnb_linear4bit(qtype, compress):
    torch.manual_seed(0)
    # in_features=128: rows align with blocks, so bnb's AVX512 dequant (the truth here) is correct
    lin = torch.nn.Linear(128, 40, bias=False).to(torch.bfloat16)
    layer = bnb_ref.bnb.nn.Linear4bit(128, 40, bias=False, quant_type=qtype, compress_statistics=compress,
                                      compute_dtype=torch.float32)  # fmt: skip
    layer.support_avx512bf16_for_cpu = False
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # quantizes
    sd = {k: v.numpy() for k, v in layer.state_dict().items()}
    qt = from_bnb_state_dict(sd)
    ref = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert_values_equal(dequantize_4bit(qt), bnb_ref.to_numpy(ref), "dequant")
    ours = to_bnb_state_dict(qt)
    assert sorted(ours) == sorted(sd)
    for k in sd:
        assert_values_equal(ours[k], sd[k], k) if sd[k].dtype == np.float32 else assert_bits_equal(ours[k], sd[k], k)


@pytest.mark.parametrize("compress", [False, True])
def test_state_dict_into_bnb_linear4bit(compress):
    # (48, 128): bnb's forward dequantizes with its AVX512 kernel, correct only when rows align with blocks
    w = np.random.default_rng(5).standard_normal((48, 128)).astype(np.float32) * 0.05
    qt = quantize_4bit(jnp.asarray(w, jnp.bfloat16), compress_statistics=compress)
    layer = bnb_ref.linear4bit(to_bnb_state_dict(qt), 128, 48, compute_dtype=torch.float32).eval()
    x = np.random.default_rng(6).standard_normal((3, 128)).astype(np.float32)
    y_bnb = layer(torch.from_numpy(x)).detach().numpy()
    w_dq = np.asarray(dequantize_4bit(qt, np.float32))
    y_ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w_dq)).numpy()
    assert_bits_equal(y_bnb, y_ref, "outputs")  # same weight values, same torch matmul
    assert not np.allclose(y_bnb, 0)
