"""Tile sizes for the fused 4-bit matmul kernels, and the cases those kernels accept.

A case the kernels reject is not an error of the caller's: `supports` says so, and the caller runs
the jnp path instead (`jaxlora.qmatmul`). The reasons are the Triton lowering's and the format's:

* every tile dimension is a power of two (Triton tensors) and at least 16 (Triton's smallest dot);
* tiles divide the matrix (no masked edge tiles);
* quantization blocks do not span weight rows (``in_features % blocksize == 0``), so a row's scales
  are a contiguous run of ``in_features / blocksize`` entries.
"""

from __future__ import annotations

import dataclasses

from jaxlora.quant.tensor import QuantizedTensor

KERNEL_QUANT_TYPES = ("nf4", "fp4")
MIN_TILE = 16  # Triton's tt.dot needs M, N, K >= 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tiles:
    block_m: int  # rows of x (batch × seq) per program; rows past the end are zero padding
    block_n: int  # out_features per tile
    block_k: int  # in_features per tile
    blocksize: int  # the weight's quantization blocksize

    @property
    def scales_per_tile(self) -> int:
        """Scales covering one (block_n, block_k) tile's row: 1 when a block is wider than the tile."""
        return max(self.block_k // self.blocksize, 1)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = cap
    while d > 1 and n % d:
        d //= 2
    return d


def _defaults(rows: int, n_out: int, n_in: int) -> tuple[int, int, int]:
    """Decode (≤ 16 rows) is memory-bound: narrow out tiles for many programs, long in tiles for
    long streaming loads. Prefill is compute-bound: square-ish tiles. (See matmul_4bit's docstring.)"""
    decode = rows <= MIN_TILE
    block_m = MIN_TILE if decode else min(64, 1 << (rows - 1).bit_length())
    block_n = _largest_pow2_divisor(n_out, 32 if decode else 64)
    block_k = _largest_pow2_divisor(n_in, 256 if decode else 128)
    return block_m, block_n, block_k


def why_unsupported(
    qt: QuantizedTensor,
    n_in_x: int,  # the in_features the input carries (x's last axis, or dx's for the transpose)
    *,
    rows: int = 1,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> str | None:
    """None when the kernels run this case, else the reason they do not."""
    if qt.quant_type not in KERNEL_QUANT_TYPES:
        return f"quant_type {qt.quant_type!r} is not one of {KERNEL_QUANT_TYPES}"
    if len(qt.shape) != 2:
        return f"weight shape {qt.shape} is not (out_features, in_features)"
    n_out, n_in = qt.shape
    if n_in_x != n_in:
        return f"input features {n_in_x} != the weight's in_features {n_in}"
    if n_in % qt.blocksize:
        return f"in_features {n_in} is not a multiple of the blocksize {qt.blocksize}"
    d_m, d_n, d_k = _defaults(rows, n_out, n_in)
    tiles = {"block_m": block_m or d_m, "block_n": block_n or d_n, "block_k": block_k or d_k}
    for name, size in tiles.items():
        if not _is_pow2(size) or size < MIN_TILE:
            return f"{name}={size} is not a power of two >= {MIN_TILE}"
    if n_out % tiles["block_n"]:
        return f"out_features {n_out} is not a multiple of block_n={tiles['block_n']}"
    if n_in % tiles["block_k"]:
        return f"in_features {n_in} is not a multiple of block_k={tiles['block_k']}"
    return None


def choose(
    qt: QuantizedTensor,
    n_in_x: int,
    *,
    rows: int,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> Tiles:
    """The tiles for this case (explicit sizes win over defaults); ValueError if unsupported."""
    reason = why_unsupported(qt, n_in_x, rows=rows, block_m=block_m, block_n=block_n, block_k=block_k)
    if reason is not None:
        raise ValueError(f"fused 4-bit matmul does not support this case: {reason}")
    d_m, d_n, d_k = _defaults(rows, *qt.shape)
    return Tiles(block_m=block_m or d_m, block_n=block_n or d_n, block_k=block_k or d_k,
                 blocksize=qt.blocksize)
