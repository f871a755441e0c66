"""JAX-only tests of jaxlora.quant (no torch): round-trip error, packing, transformations, the CUDA
backend's documented choices (from a reading of csrc/kernels.cu; no GPU here), and error messages.
Byte parity with bitsandbytes is in parity_tests/test_quant_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.quant import (
    QuantizedTensor, dequantize_4bit, dequantize_blockwise, from_bnb_state_dict, quantize_4bit,
    quantize_blockwise, to_bnb_state_dict,
)  # fmt: skip
from jaxlora.quant import codes as C


def normal(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("quant_type,bound", [("nf4", 0.0763), ("fp4", 0.0997)])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_error_within_bnb_bound(quant_type, bound, compress):
    """bitsandbytes' test_4bit_quant bounds the mean |error| of N(0,1) data at blocksize 64 (nf4 0.072,
    fp4 0.096 at mean + 7 sigma over its runs); relative to absmax it is the table's spacing."""
    w = normal((512, 512))
    err = jnp.abs(dequantize_4bit(quantize_4bit(w, quant_type=quant_type, compress_statistics=compress)) - w)
    assert float(err.mean()) < bound


def test_8bit_round_trip_error():
    w = normal((300, 70))
    assert float(jnp.abs(dequantize_blockwise(quantize_blockwise(w, blocksize=256)) - w).mean()) < 0.011


def test_packing_order_high_nibble_first_and_odd_pad():
    # absmax 1: 1.0 -> code 15, -1.0 -> code 0, 0.0 -> code 7 (also the pad of an odd count)
    qt = quantize_4bit(jnp.array([1.0, -1.0, 0.0, 1.0, 0.0], jnp.float32), blocksize=32)
    assert np.asarray(qt.codes).tolist() == [0xF0, 0x7F, 0x77]
    assert qt.codes.shape == (3,) and qt.absmax.shape == (1,)


def test_cpu_and_cuda_documented_differences():
    w = jnp.concatenate([jnp.zeros(64), normal((64,)), jnp.zeros(10)])  # zero block, data, zero tail
    cpu, cuda = quantize_4bit(w, bnb_backend="cpu"), quantize_4bit(w, bnb_backend="cuda")
    assert np.all(np.asarray(cpu.codes[:32]) == 0x77) and np.all(np.asarray(cuda.codes[:32]) == 0)
    np.testing.assert_array_equal(cpu.codes[32:64], cuda.codes[32:64])
    assert np.asarray(cpu.absmax)[-1:].view(np.uint32)[0] == 0x006CE3EE  # clamped 1e-38, subnormal
    assert float(cuda.absmax[-1]) == 0.0
    # FP4: CPU puts small positives on code 8, CUDA uses the sign bit
    tiny = jnp.array([1.0, 0.001, -0.001, 0.0] * 8, jnp.float32)
    assert np.asarray(quantize_4bit(tiny, quant_type="fp4").codes)[:2].tolist() == [0x38, 0x00]
    assert np.asarray(quantize_4bit(tiny, quant_type="fp4", bnb_backend="cuda").codes)[:2].tolist() == [0x30, 0x80]


def test_cuda_8bit_search_is_exact_nearest_away_from_ties():
    x = jax.random.uniform(jax.random.key(1), (4096,), jnp.float32, -1, 1).at[0].set(1.0)
    q = np.asarray(quantize_blockwise(x, blocksize=4096, bnb_backend="cuda").codes)
    nearest = np.argmin(np.abs(np.asarray(x)[:, None] - C.DYNAMIC8[None, :]), axis=1)
    assert np.mean(q == nearest) == 1.0


def test_jit_vmap_eval_shape():
    w = normal((4, 64, 96), jnp.bfloat16)
    eager = quantize_4bit(w[0], compress_statistics=True)
    jitted = jax.jit(lambda a: quantize_4bit(a, compress_statistics=True))(w[0])
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)
    batched = jax.vmap(lambda a: quantize_4bit(a, compress_statistics=True))(w)
    np.testing.assert_array_equal(batched.codes[0], eager.codes)
    np.testing.assert_array_equal(jax.vmap(dequantize_4bit)(batched)[0], dequantize_4bit(eager))
    shapes = jax.eval_shape(lambda a: quantize_4bit(a, compress_statistics=True), w[0])
    assert shapes.codes.shape == (3072,) and shapes.absmax.dtype == jnp.uint8
    assert shapes.nested_absmax.shape == (1,)
    assert dequantize_4bit(eager).dtype == jnp.bfloat16 and dequantize_4bit(eager, jnp.float16).dtype == jnp.float16


def test_state_dict_round_trip():
    qt = quantize_4bit(normal((33, 65), jnp.float16), quant_type="fp4", compress_statistics=True)
    sd = to_bnb_state_dict(qt, prefix="m.q_proj.")
    assert sd["m.q_proj.weight"].shape == (1073, 1)
    back = from_bnb_state_dict(sd, prefix="m.q_proj.")
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    assert back.shape == qt.shape and back.dtype == qt.dtype


@pytest.mark.parametrize("storage, rows", [("float16", 512), ("bfloat16", 512), ("float32", 256)])
def test_quant_storage_views_the_same_bytes(storage, rows):
    qt = quantize_4bit(normal((16, 128), jnp.bfloat16), compress_statistics=True, quant_storage=storage)
    sd = to_bnb_state_dict(qt)
    assert sd["weight"].shape == (rows, 1) and sd["weight"].dtype == np.dtype(jnp.dtype(storage))
    plain = to_bnb_state_dict(quantize_4bit(normal((16, 128), jnp.bfloat16), compress_statistics=True))
    assert sd["weight"].tobytes() == plain["weight"].tobytes()
    back = from_bnb_state_dict(sd)
    assert back.quant_storage == storage and back.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(dequantize_4bit(back), dequantize_4bit(qt))
    with pytest.raises(ValueError, match=r"uint8\[1024, 1\].*got float16\[1024, 1\]"):
        from_bnb_state_dict(sd | {"weight": np.zeros((1024, 1), np.float16)})


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantize_4bit(normal((64,)), blocksize=48), r"blocksize must be one of \(32, .*got 48"),
        (lambda: quantize_4bit(normal((64,)), quant_type="int4"), r"quant_type must be one of .*'int4'"),
        (lambda: quantize_4bit(normal((64,)), bnb_backend="rocm"), r"bnb_backend must be .*'rocm'"),
        (lambda: quantize_4bit(normal((64,)), quant_storage="int4"), r"quant_storage must be one of .*'int4'"),
        (lambda: quantize_4bit(normal((6,)), quant_storage="float32"), r"3 bytes \(not a multiple of 4\)"),
        (lambda: quantize_4bit(jnp.arange(64)), r"dtype must be one of float32, float16, bfloat16, got int32"),
        (lambda: quantize_4bit(jnp.zeros((0, 4))), r"at least one element, got shape \(0, 4\)"),
        (lambda: quantize_4bit(normal((64,)).at[3].set(jnp.nan)), r"1 non-finite .*index 3"),
        (lambda: quantize_blockwise(normal((64,)), blocksize=100), r"blocksize must be one of"),
        (lambda: dequantize_4bit(quantize_4bit(normal((64,))), jnp.int8), r"dtype must be one of"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_state_dicts():
    sd = to_bnb_state_dict(quantize_4bit(normal((8, 64)), compress_statistics=True))
    with pytest.raises(ValueError, match=r"missing \['weight.nested_absmax'\]"):
        from_bnb_state_dict({k: v for k, v in sd.items() if k != "weight.nested_absmax"})
    with pytest.raises(ValueError, match=r"unexpected \['weight.extra'\]"):
        from_bnb_state_dict(sd | {"weight.extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"absmax must be uint8\[8\] .*got float32\[8\]"):
        from_bnb_state_dict(sd | {"weight.absmax": sd["weight.absmax"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"weight must be uint8\[256, 1\] .*got uint8\[255, 1\]"):
        from_bnb_state_dict(sd | {"weight": sd["weight"][:255]})
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        from_bnb_state_dict({})
    with pytest.raises(ValueError, match="dynamic8"):
        to_bnb_state_dict(quantize_blockwise(normal((64,))))
    with pytest.raises(ValueError, match="offset must be float32"):
        good = from_bnb_state_dict(sd)
        QuantizedTensor(good.codes, good.absmax, good.nested_absmax, jnp.zeros((1,)), good.shape, good.dtype,
                        good.config).validate()  # fmt: skip


def test_non_finite_allowed_follows_backend():
    w = normal((128,)).at[3].set(jnp.nan)
    qt = quantize_4bit(w, allow_non_finite=True)
    assert np.isnan(np.asarray(qt.absmax)[0]) and np.all(np.asarray(qt.codes[:32]) == 0xFF)  # CPU: NaN -> 15
    assert np.all(np.asarray(quantize_4bit(w, allow_non_finite=True, bnb_backend="cuda").codes[:32]) == 0)
