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
* ``absmax`` holds one float32 scale per block, or, when double-quantized (``config.double_quant``),
  the uint8 codes of ``absmax - offset`` in bitsandbytes' signed dynamic map, blocks of
  ``nested_blocksize`` (256) scaled by ``nested_absmax``.

``config`` is the `QuantConfig` the tensor was quantized with (static metadata): quant type, blocksize,
double quantization, quant_storage and bitsandbytes backend, so re-quantizing reproduces them, plus the
compute dtype and kernel choice a `QuantizedLinear` runs it with.

A linear layer's weight is stored in PyTorch's ``(out_features, in_features)`` layout, as bitsandbytes
stores it, so quantized bytes are identical to a `bnb.nn.Linear4bit`'s.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant.config import FORMAT_FIELDS, QuantConfig

# bitsandbytes double-quantizes absmax in blocks of 256 (functional.quantize_4bit).
NESTED_BLOCKSIZE = 256


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
    config: QuantConfig = dataclasses.field(metadata=dict(static=True))  # how it was quantized (and is used)
    nested_blocksize: int = dataclasses.field(default=NESTED_BLOCKSIZE, metadata=dict(static=True))

    # The config's format fields, read-only, for readers of the stored layout.
    quant_type = property(lambda self: self.config.quant_type)
    blocksize = property(lambda self: self.config.blocksize)
    double_quant = property(lambda self: self.config.double_quant)
    quant_storage = property(lambda self: self.config.quant_storage)
    bits = property(lambda self: self.config.bits)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and nested scales (what the frozen base costs in memory)."""
        leaves = (self.codes, self.absmax, self.nested_absmax, self.offset)
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves if a is not None)

    def with_config(self, **changes) -> QuantizedTensor:
        """The same bytes under a config with `changes` to the fields that do not decide them (compute_dtype,
        use_kernel, skip_modules, bnb_backend: whose bytes a re-quantization reproduces). A change to a
        format field (quant_type, blocksize, double_quant, quant_storage) raises: quantize again."""
        changed = sorted(f for f in FORMAT_FIELDS if f in changes and changes[f] != getattr(self.config, f))
        if changed:
            raise ValueError(f"with_config cannot change {changed} of a quantized tensor (the bytes are "
                             f"{self.quant_type}/{self.blocksize}/double_quant={self.double_quant}/"
                             f"{self.quant_storage}); quantize the dense weight with the new QuantConfig instead")
        return dataclasses.replace(self, config=self.config.replace(**changes))

    def validate(self) -> QuantizedTensor:
        """Check that the leaves agree with the metadata (shapes and dtypes only, so it works on traced
        values); raise ValueError naming the disagreement. Returns self."""
        if not isinstance(self.config, QuantConfig):
            raise ValueError(f"config must be a QuantConfig, got {self.config!r}")
        if self.numel == 0:
            raise ValueError(f"shape {self.shape} has no elements")
        ncodes = (self.numel + 1) // 2 if self.bits == 4 else self.numel
        _expect("codes", self.codes, (ncodes,), np.uint8, self.shape)
        check_quant_storage(self.quant_storage, ncodes if self.bits == 4 else None)
        if (self.nested_absmax is None) != (self.offset is None):
            raise ValueError("nested_absmax and offset must both be set (double quantization) or both None")
        if self.double_quant != (self.nested_absmax is not None):
            raise ValueError(f"config.double_quant={self.double_quant} but nested_absmax is "
                             f"{'None' if self.nested_absmax is None else 'set'}")
        if self.double_quant:
            nnested = -(-self.nblocks // self.nested_blocksize)
            _expect("absmax", self.absmax, (self.nblocks,), np.uint8, self.shape)
            _expect("nested_absmax", self.nested_absmax, (nnested,), np.float32, self.shape)
            _expect("offset", self.offset, (), np.float32, self.shape)
        else:
            _expect("absmax", self.absmax, (self.nblocks,), np.float32, self.shape)
        return self


def check_quant_storage(quant_storage: str, nbytes: int | None) -> None:
    """For `nbytes` packed 4-bit bytes, `quant_storage` (already a valid name: QuantConfig checks it) must
    divide them, as bitsandbytes views the bytes as that dtype; 8-bit tensors (`nbytes` None) stay uint8."""
    if nbytes is None:
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
