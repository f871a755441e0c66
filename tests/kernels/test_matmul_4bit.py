"""The fused 4-bit dequantize-matmul kernels, run in Pallas interpret mode on CPU.

Reference: the jnp path, ``x @ dequantize(qt, qt.dtype).astype(cd).T`` (what jaxlora.qmatmul
computes). Shapes are small because the interpreter executes the grid one program at a time; tiles
are chosen so that tile counts are odd and double-quantization blocks start mid-row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxlora.kernels import matmul_4bit, matmul_4bit_t, supports
from jaxlora.quant import codes
from jaxlora.quant import QuantConfig, QuantizedTensor, dequantize, quantize

# (48, 384), blocksize 64: 6 blocks per row, 288 blocks, so the nested block boundary (block 256) falls
# in the middle of row 42; block_n = 16 and block_k = 128 give 3 × 3 tiles (odd counts both ways).
OUT, IN, BLOCKSIZE = 48, 384, 64
TILES = dict(block_n=16, block_k=128)


def _weight(seed: int, dtype=jnp.float32, shape=(OUT, IN)) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _quantized(double_quant: bool, quant_type: str = "nf4", dtype=jnp.float32, seed: int = 0,
               shape=(OUT, IN), blocksize: int = BLOCKSIZE) -> QuantizedTensor:
    return quantize(_weight(seed, dtype, shape),
                    QuantConfig(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant))


def _dense(qt: QuantizedTensor, compute_dtype) -> np.ndarray:  # (out, in)
    """The input gradient's weight: rounded to the stored dtype, then cast (bitsandbytes' backward)."""
    return np.asarray(dequantize(qt, qt.dtype).astype(compute_dtype))


def _dense_forward(qt: QuantizedTensor, compute_dtype) -> np.ndarray:  # (out, in)
    """The forward's weight: dequantized straight to the compute dtype (bitsandbytes' gemm_4bit)."""
    return np.asarray(dequantize(qt, compute_dtype))


def _matmul_tolerance(x: np.ndarray, w: np.ndarray, compute_dtype) -> np.ndarray:
    """Elementwise bound on |kernel - reference| for y = x @ w.T.

    Both sides multiply the same compute-dtype operands (bit-identical: see the identity test) and
    accumulate in float32, in a different order (block_k tiles vs XLA's dot). Reordering a float32 sum of K terms moves it by at most ~K·2⁻²³·Σ|x·w| (the standard
    γ_K bound; in practice ~√K smaller). A bf16 result is then rounded once more on each side, and
    two nearby float32 sums can round to neighbouring bf16 values: one bf16 ulp, ≤ 2⁻⁷·|y|.
    """
    k = x.shape[-1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    tol = 2 * k * 2.0**-23 * mag
    if compute_dtype == jnp.bfloat16:
        tol = tol + 2.0**-7 * (np.abs(x.astype(np.float64) @ w.astype(np.float64).T) + tol)
    return tol


def _assert_close(got: jax.Array, want: np.ndarray, tol: np.ndarray) -> None:
    err = np.abs(np.asarray(got, np.float64) - want.astype(np.float64))
    assert np.all(err <= tol), f"max excess {np.max(err - tol)}"


# --- the dequantized tile is bit-exact ------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_identity_exposes_exact_dequantization(double_quant: bool, quant_type: str) -> None:
    # x = I makes y = W.T exactly: each output is one product w·1 plus exact zeros, so any difference
    # is the dequantization's (codes, nibble order, scale indexing, the nested two-rounding rule).
    qt = _quantized(double_quant, quant_type)
    dense = _dense(qt, jnp.float32)
    y = matmul_4bit(jnp.eye(IN, dtype=jnp.float32), qt, compute_dtype=jnp.float32, interpret=True, **TILES)
    np.testing.assert_array_equal(np.asarray(y), dense.T)
    dx = matmul_4bit_t(jnp.eye(OUT, dtype=jnp.float32), qt, compute_dtype=jnp.float32, interpret=True,
                      **TILES)
    np.testing.assert_array_equal(np.asarray(dx), dense)


def test_double_quant_rounds_twice() -> None:
    # The test above can fail on the nested rule: a fused multiply-add (one rounding) gives other
    # scales for some of these blocks, hence another dequantized weight.
    qt = _quantized(double_quant=True)
    code8 = codes.table("dynamic8")[np.asarray(qt.absmax)]
    nested = np.asarray(qt.nested_absmax)[np.arange(qt.nblocks) // qt.nested_blocksize]
    offset = np.asarray(qt.offset, np.float32)
    two = (code8 * nested).astype(np.float32) + offset  # numpy float32: two roundings, no FMA
    fused = (code8.astype(np.float64) * nested + offset).astype(np.float32)  # one rounding
    y = matmul_4bit(jnp.eye(IN, dtype=jnp.float32), qt, compute_dtype=jnp.float32, interpret=True, **TILES)
    seen = np.asarray(y).T.reshape(qt.nblocks, qt.blocksize)
    np.testing.assert_array_equal(seen, _dense_from_scales(qt, two))
    assert np.any(seen != _dense_from_scales(qt, fused))


def _dense_from_scales(qt: QuantizedTensor, absmax: np.ndarray) -> np.ndarray:  # (nblocks, blocksize)
    packed = np.asarray(qt.codes)
    code4 = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(qt.nblocks, qt.blocksize)
    return (codes.table(qt.quant_type)[code4] * absmax[:, None]).astype(np.float32)


# --- the matmul equals the jnp path within the stated tolerance -----------------------------------

SHAPES = [(1,), (2, 5), (3, 40)]  # decode; batch × seq padded to a row tile; several row tiles


@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_matches_jnp_path(lead, compute_dtype, double_quant: bool) -> None:
    qt = _quantized(double_quant, dtype=jnp.bfloat16, seed=1)
    x = jax.random.normal(jax.random.key(2), (*lead, IN), jnp.float32)
    w = _dense_forward(qt, compute_dtype)
    xc = x.astype(compute_dtype)
    want = np.asarray(xc @ jnp.asarray(w).T, np.float64)
    got = matmul_4bit(x, qt, compute_dtype=compute_dtype, interpret=True, **TILES)
    assert got.shape == (*lead, OUT) and got.dtype == compute_dtype
    xn = np.asarray(xc.astype(jnp.float32)).reshape(-1, IN)
    wn = w.astype(np.float32)
    _assert_close(got.reshape(-1, OUT), want.reshape(-1, OUT), _matmul_tolerance(xn, wn, compute_dtype))


@pytest.mark.parametrize("lead", [(1,), (3, 40)])
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_input_gradient_matches_jnp_path(lead, compute_dtype, double_quant: bool) -> None:
    qt = _quantized(double_quant, seed=3)
    dy = jax.random.normal(jax.random.key(4), (*lead, OUT), jnp.float32)
    w = _dense(qt, compute_dtype)
    dyc = dy.astype(compute_dtype)
    want = np.asarray(dyc @ jnp.asarray(w), np.float64)
    got = matmul_4bit_t(dy, qt, compute_dtype=compute_dtype, interpret=True, **TILES)
    assert got.shape == (*lead, IN) and got.dtype == compute_dtype
    dyn = np.asarray(dyc.astype(jnp.float32)).reshape(-1, OUT)
    tol = _matmul_tolerance(dyn, w.astype(np.float32).T, compute_dtype)
    _assert_close(got.reshape(-1, IN), want.reshape(-1, IN), tol)


def test_default_tiles_and_blocks_wider_than_a_tile() -> None:
    # blocksize 256 > block_k 64: one scale per tile row, shared by four tiles.
    qt = _quantized(double_quant=True, shape=(32, 512), blocksize=256)
    x = jax.random.normal(jax.random.key(5), (4, 512), jnp.float32)
    for tiles in ({}, {"block_k": 64}):
        got = matmul_4bit(x, qt, compute_dtype=jnp.float32, interpret=True, **tiles)
        w = _dense(qt, jnp.float32)
        _assert_close(got, np.asarray(x) @ w.T, _matmul_tolerance(np.asarray(x), w, jnp.float32))
        dx = matmul_4bit_t(got, qt, compute_dtype=jnp.float32, interpret=True, **tiles)
        _assert_close(dx, np.asarray(got) @ w, _matmul_tolerance(np.asarray(got), w.T, jnp.float32))


# --- the kernels can fail --------------------------------------------------------------------------


def test_corrupted_code_byte_changes_only_its_output() -> None:
    qt = _quantized(double_quant=True, seed=6)
    x = jax.random.normal(jax.random.key(7), (2, IN), jnp.float32)
    row, byte = 37, 101  # weight row 37: output feature 37
    flat = row * IN // 2 + byte
    bad = dataclasses.replace(qt, codes=qt.codes.at[flat].set(qt.codes[flat] ^ 0x88))
    y = np.asarray(matmul_4bit(x, qt, compute_dtype=jnp.float32, interpret=True, **TILES))
    y_bad = np.asarray(matmul_4bit(x, bad, compute_dtype=jnp.float32, interpret=True, **TILES))
    changed = np.any(y != y_bad, axis=0)
    assert changed[row] and changed.sum() == 1


# --- what the kernels do not take ------------------------------------------------------------------


def test_supports_rejects_and_kernels_raise() -> None:
    qt = _quantized(double_quant=False)
    x = jnp.ones((2, IN), jnp.float32)
    assert supports(qt, x, **TILES) and supports(qt, x)
    narrow = _quantized(double_quant=False, shape=(24, 128))  # out 24: no power-of-two tile >= 16
    spanning = _quantized(double_quant=False, shape=(16, 96))  # 96 % 64: blocks span rows
    eight_bit = dataclasses.replace(qt, config=QuantConfig(quant_type="dynamic8", double_quant=False,
                                                           blocksize=qt.blocksize))
    cases = [
        (narrow, jnp.ones((1, 128)), {}),
        (spanning, jnp.ones((1, 96)), {}),
        (eight_bit, x, {}),
        (qt, jnp.ones((2, IN + 2)), {}),  # wrong in_features
        (qt, x, {"block_k": 96}),  # not a power of two
        (qt, x, {"block_n": 8}),  # below Triton's dot minimum
        (qt, x, {"block_k": 256}),  # does not divide 384
    ]
    for q, xx, tiles in cases:
        assert not supports(q, xx, **tiles)
        with pytest.raises(ValueError, match="does not support"):
            matmul_4bit(xx, q, interpret=True, **tiles)


# Lowering for CUDA (the Triton kernels, their tiles, the train step and generate): tests/test_cuda_lowering.py.


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_qmatmul_with_kernel_equals_jnp_path_forward_and_backward(compute_dtype):
    """`qmatmul(use_kernel=True)` routes the forward and the input gradient through the kernels
    (interpreted on CPU) and matches the jnp path; unsupported shapes fall back silently."""
    from jaxlora.qmatmul import qmatmul

    w = jax.random.normal(jax.random.key(3), (64, 128), jnp.float32)
    qt = quantize(w, QuantConfig())
    x = jax.random.normal(jax.random.key(4), (2, 3, 128), jnp.float32)

    def loss(x, use_kernel):
        y = qmatmul(x, qt, compute_dtype=compute_dtype, use_kernel=use_kernel)
        return jnp.sum(jnp.sin(y))

    y_ref, g_ref = jax.value_and_grad(loss)(x, False)
    y_ker, g_ker = jax.value_and_grad(loss)(x, True)
    # The fused path really ran: forward and backward each hold a pallas_call in each of the two
    # branches of their platform_dependent (Triton for CUDA, interpreted elsewhere).
    assert str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(x, True)).count("pallas_call") == 2 * 2
    assert "pallas_call" not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(x, False))
    # Same operands, float32 sums in another order: |dx error| <= 2K * 2^-23 * sum|dy||W| with K = 64
    # terms of size <= ~1, i.e. ~2e-4 absolute in fp32; in bf16 one more rounding of dx (2^-8 relative).
    atol, rtol = (2e-4, 1e-5) if compute_dtype == jnp.float32 else (2e-2, 2e-2)
    np.testing.assert_allclose(float(y_ker), float(y_ref), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(g_ker, np.float32), np.asarray(g_ref, np.float32), rtol=rtol, atol=atol)
    # A shape the kernel rejects (out_features 24) takes the jnp path instead of failing.
    qt_odd = quantize(w[:24], QuantConfig())
    np.testing.assert_allclose(
        qmatmul(x, qt_odd, compute_dtype=jnp.float32, use_kernel=True),
        qmatmul(x, qt_odd, compute_dtype=jnp.float32),
    )
