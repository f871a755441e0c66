"""`QuantizedTensor`: a blockwise-quantized array as a JAX pytree value.

Invariant: ``dequantize(qt) ≈ original``, with the error of the code table (NF4, FP4 or bitsandbytes'
signed dynamic 8-bit map) times each block's absmax. The layout is bitsandbytes' own, so that
`to_bnb_state_dict` is a reshape and a rename, never a conversion:

* the original tensor is flattened in C order; block ``i // blocksize`` holds element ``i`` (blocks span
  rows);
* 4-bit codes are packed two to a byte, the first element in the HIGH nibble; an odd count is padded
  with one zero element;
* 8-bit codes (``quant_type="dynamic8"``) are one byte per element;
* ``codes`` are always uint8 here; ``quant_storage`` only says which dtype bitsandbytes views those
  bytes as in a state dict (`to_bnb_state_dict`): the bytes are the same;
* ``absmax`` holds one float32 scale per block, or, when double-quantized (``compress_statistics``),
  the uint8 codes of ``absmax - offset`` in bitsandbytes' signed dynamic map, blocks of
  ``nested_blocksize`` (256) scaled by ``nested_absmax``.

A linear layer's weight is stored in PyTorch's ``(out_features, in_features)`` layout, as bitsandbytes
stores it, so quantized bytes are identical to a `bnb.nn.Linear4bit`'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

QuantType = Literal["nf4", "fp4", "dynamic8"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "dynamic8")
# bitsandbytes' blocksize set for 4-bit and 8-bit blockwise quantization (functional.py asserts it).
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes double-quantizes absmax in blocks of 256 (functional.quantize_4bit).
NESTED_BLOCKSIZE = 256
# bitsandbytes' quant_storage: the dtype its packed 4-bit bytes are *viewed* as (``packed.view(dtype)``;
# FSDP-QLoRA stores them as the model's float dtype so that they shard like the other parameters).
QUANT_STORAGES: tuple[str, ...] = ("uint8", "float16", "bfloat16", "float32")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise-quantized tensor: array leaves plus static metadata (see the module docstring)."""

    codes: jax.Array  # uint8; 4-bit: ((numel + 1) // 2,) packed, high nibble first; 8-bit: (numel,)
    absmax: jax.Array  # (nblocks,) float32, or uint8 when double-quantized
    nested_absmax: jax.Array | None  # (ceil(nblocks / 256),) float32 when double-quantized, else None
    offset: jax.Array | None  # () float32 mean of absmax when double-quantized, else None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))  # dtype of the original tensor
    blocksize: int = dataclasses.field(metadata=dict(static=True))
    quant_type: str = dataclasses.field(metadata=dict(static=True))  # one of QUANT_TYPES
    nested_blocksize: int = dataclasses.field(default=NESTED_BLOCKSIZE, metadata=dict(static=True))
    quant_storage: str = dataclasses.field(default="uint8", metadata=dict(static=True))  # one of QUANT_STORAGES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "dynamic8" else 4

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and nested scales (what the frozen base costs in memory)."""
        leaves = (self.codes, self.absmax, self.nested_absmax, self.offset)
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves if a is not None)

    def validate(self) -> QuantizedTensor:
        """Check that the leaves agree with the metadata (shapes and dtypes only, so it works on traced
        values); raise ValueError naming the disagreement. Returns self."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.numel == 0:
            raise ValueError(f"shape {self.shape} has no elements")
        ncodes = (self.numel + 1) // 2 if self.bits == 4 else self.numel
        _expect("codes", self.codes, (ncodes,), np.uint8, self.shape)
        check_quant_storage(self.quant_storage, ncodes if self.bits == 4 else None)
        if (self.nested_absmax is None) != (self.offset is None):
            raise ValueError("nested_absmax and offset must both be set (double quantization) or both None")
        if self.double_quant:
            nnested = -(-self.nblocks // self.nested_blocksize)
            _expect("absmax", self.absmax, (self.nblocks,), np.uint8, self.shape)
            _expect("nested_absmax", self.nested_absmax, (nnested,), np.float32, self.shape)
            _expect("offset", self.offset, (), np.float32, self.shape)
        else:
            _expect("absmax", self.absmax, (self.nblocks,), np.float32, self.shape)
        return self


def check_quant_storage(quant_storage: str, nbytes: int | None) -> None:
    """`quant_storage` is one of QUANT_STORAGES and, for `nbytes` packed 4-bit bytes, divides them (bitsandbytes
    views the bytes as that dtype); 8-bit tensors (`nbytes` None) have no bitsandbytes format and stay uint8."""
    if quant_storage not in QUANT_STORAGES:
        raise ValueError(f"quant_storage must be one of {QUANT_STORAGES}, got {quant_storage!r}")
    if nbytes is None:
        if quant_storage != "uint8":
            raise ValueError(f"quant_storage={quant_storage!r} applies to 4-bit tensors only; 8-bit codes are uint8")
        return
    size = np.dtype(jnp.dtype(quant_storage)).itemsize
    if nbytes % size:
        raise ValueError(f"quant_storage={quant_storage!r} views the packed bytes {size} at a time, but this tensor "
                         f"has {nbytes} bytes (not a multiple of {size}); use 'uint8' or another shape")


def _expect(name: str, a, shape: tuple[int, ...], dtype, of_shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != shape or np.dtype(a.dtype) != np.dtype(dtype):
        raise ValueError(
            f"{name} must be {np.dtype(dtype).name}{list(shape)} for a tensor of shape {of_shape}, "
            f"got {np.dtype(a.dtype).name}{list(a.shape)}"
        )
