"""`QuantizedTensor` <-> the state-dict entries bitsandbytes' `Linear4bit` (and transformers) write.

The keys are ``QuantState.as_dict(packed=True)`` under ``<prefix>weight.``; the non-tensor fields travel
as the UTF-8 bytes of a ``json.dumps`` string in ``weight.quant_state.bitsandbytes__<nf4|fp4>``.
Only 4-bit tensors have this format: bitsandbytes has no module that saves 8-bit blockwise
(``dynamic8``) weights, so those are rejected rather than given an invented layout.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant import codes as C
from jaxlora.quant.config import QUANT_STORAGES, QuantConfig
from jaxlora.quant.tensor import NESTED_BLOCKSIZE, QuantizedTensor

# torch dtype names as QuantState writes them (str(torch.bfloat16).strip("torch.")).
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(jnp.bfloat16): "bfloat16"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_STORAGE = {name: np.dtype(jnp.dtype(name)) for name in QUANT_STORAGES}


def _quant_map(quant_type: str) -> np.ndarray:
    # bitsandbytes writes get_4bit_type(quant_type), whose FP4 index 8 is +0.0 (codes.FP4 has -0.0).
    return np.where(C.table(quant_type) == 0, np.float32(0), C.table(quant_type)).astype(np.float32)


def to_bnb_state_dict(qt: QuantizedTensor, prefix: str = "") -> dict[str, np.ndarray]:
    """The entries `bnb.nn.Linear4bit.state_dict()` holds for its weight, as numpy arrays.

    `prefix` is prepended verbatim, torch style (``"model.layers.0.self_attn.q_proj."``).
    """
    qt.validate()
    if qt.bits != 4:
        raise ValueError(f"only 4-bit tensors have a bitsandbytes checkpoint format, got {qt.quant_type!r}")
    p = prefix + "weight"
    # Params4bit keeps the packed bytes as ((n + 1) // 2, 1) uint8, or viewed as its quant_storage dtype:
    # ((n + 1) // 2 // itemsize, 1), the same bytes.
    out = {
        p: np.asarray(qt.codes).view(_STORAGE[qt.quant_storage]).reshape(-1, 1),
        p + ".absmax": np.asarray(qt.absmax),
        p + ".quant_map": _quant_map(qt.quant_type),
    }
    meta = {
        "quant_type": qt.quant_type,
        "blocksize": qt.blocksize,
        "dtype": _DTYPE_NAMES[np.dtype(qt.dtype)],
        "shape": list(qt.shape),
    }
    if qt.double_quant:
        out[p + ".nested_absmax"] = np.asarray(qt.nested_absmax)
        out[p + ".nested_quant_map"] = C.DYNAMIC8.copy()
        # float(offset) is the double of the float32, whose repr reads back to the same float32.
        meta |= {"nested_blocksize": qt.nested_blocksize, "nested_dtype": "float32",
                 "nested_offset": float(np.asarray(qt.offset))}  # fmt: skip
    out[p + ".quant_state.bitsandbytes__" + qt.quant_type] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8
    ).copy()
    return out


def _numpy(v) -> np.ndarray:
    """An array or CPU tensor as numpy; torch's bfloat16 (which .numpy() refuses) bit for bit."""
    if type(v).__module__.startswith("torch") and str(v.dtype) == "torch.bfloat16":
        import torch  # reached only with a torch tensor in hand

        return v.detach().cpu().view(torch.int16).numpy().view(np.dtype(jnp.bfloat16))
    return np.asarray(v)


def from_bnb_state_dict(d: dict, prefix: str = "") -> QuantizedTensor:
    """Read the `<prefix>weight*` entries of a bitsandbytes 4-bit state dict (arrays or CPU tensors).

    Raises ValueError for missing or unknown `<prefix>weight.*` keys, wrong dtypes, metadata that
    disagrees with the data, or a quant_map that is not bitsandbytes' table.
    """
    p = prefix + "weight"
    mine = {k: v for k, v in d.items() if k == p or k.startswith(p + ".")}
    qs_keys = [k for k in mine if k.startswith(p + ".quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(f"expected one '{p}.quant_state.bitsandbytes__nf4' or '__fp4' entry, found {qs_keys}")
    try:
        meta = json.loads(bytes(np.asarray(mine[qs_keys[0]], dtype=np.uint8)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{qs_keys[0]} does not hold a JSON quant state: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{qs_keys[0]} must hold a JSON object (QuantState.as_dict), got {type(meta).__name__}")
    quant_type = meta.get("quant_type")
    if quant_type not in ("nf4", "fp4") or qs_keys[0] != f"{p}.quant_state.bitsandbytes__{quant_type}":
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' and match the key {qs_keys[0]!r}, got {quant_type!r}")
    nested = "nested_offset" in meta
    want = {p, p + ".absmax", p + ".quant_map", qs_keys[0]}
    if nested:
        want |= {p + ".nested_absmax", p + ".nested_quant_map"}
    if set(mine) != want:
        raise ValueError(
            f"state dict keys for {p!r}: missing {sorted(want - set(mine))}, unexpected {sorted(set(mine) - want)}"
        )
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {meta.get('dtype')!r}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise ValueError(f"{qs_keys[0]}: 'shape' must be a list of non-negative ints, e.g. [64, 64], got {shape!r}")
    shape = tuple(shape)
    blocksize = meta.get("blocksize")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"{qs_keys[0]}: 'blocksize' must be an int, e.g. 64, got {blocksize!r}")
    offset = meta.get("nested_offset")
    if nested and (isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset)):
        raise ValueError(f"{qs_keys[0]}: 'nested_offset' must be a finite number, got {offset!r}")
    arr = {k: _numpy(v) for k, v in mine.items()}
    for key, dtype in [(p + ".quant_map", np.float32)] + ([(p + ".nested_quant_map", np.float32)] if nested else []):
        if arr[key].dtype != dtype:
            raise ValueError(f"{key} must be float32, got {arr[key].dtype}")
    if not np.array_equal(arr[p + ".quant_map"], _quant_map(quant_type)):
        raise ValueError(f"{p}.quant_map is not bitsandbytes' {quant_type} table; custom maps are not supported")
    if nested:
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or meta.get("nested_dtype") != "float32":
            raise ValueError(
                f"nested_blocksize/nested_dtype must be {NESTED_BLOCKSIZE}/'float32', "
                f"got {meta.get('nested_blocksize')!r}/{meta.get('nested_dtype')!r}"
            )
        if arr[p + ".nested_quant_map"].view(np.uint32).tolist() != C.DYNAMIC8.view(np.uint32).tolist():
            raise ValueError(f"{p}.nested_quant_map is not bitsandbytes' signed dynamic map")
    codes = arr[p]
    n = math.prod(shape)
    storage = next((name for name, dt in _STORAGE.items() if dt == codes.dtype), None)
    if storage is None or codes.shape != ((n + 1) // 2 // codes.dtype.itemsize, 1):
        raise ValueError(
            f"{p} must be uint8[{(n + 1) // 2}, 1] for shape {list(shape)} (or those bytes viewed as a "
            f"quant_storage of {', '.join(QUANT_STORAGES[1:])}), got {codes.dtype}{list(codes.shape)}"
        )
    codes = np.ascontiguousarray(codes).view(np.uint8)
    # The file does not say which bitsandbytes backend wrote it: a re-quantization takes this platform's
    # (QuantConfig's default), and `QuantizedTensor.with_config(bnb_backend=...)` says otherwise.
    try:
        config = QuantConfig(quant_type=quant_type, blocksize=blocksize, double_quant=nested, quant_storage=storage)
    except ValueError as e:
        raise ValueError(f"{qs_keys[0]}: {e}") from None
    qt = QuantizedTensor(
        codes=codes.reshape(-1),
        absmax=arr[p + ".absmax"],
        nested_absmax=arr[p + ".nested_absmax"] if nested else None,
        offset=np.asarray(np.float32(offset)) if nested else None,
        shape=shape,
        dtype=_DTYPES[meta["dtype"]],
        config=config,
    ).validate()  # on the numpy arrays, before jnp.asarray could silently cast a wrong dtype
    return jax.tree.map(jnp.asarray, qt)
