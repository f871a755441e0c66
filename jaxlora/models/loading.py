"""Hugging Face checkpoints <-> `LlamaForCausalLM`: `from_pretrained` and `save_pretrained`.

Loading builds the model abstractly (`nnx.eval_shape`: shapes only, no random init), checks every
tensor's name, shape and dtype against the safetensors headers before reading any data, then fills the
model one tensor at a time, so peak host memory stays near one model plus one tensor.

Every checkpoint key names a path in the module tree (``model.layers.0.mlp.up_proj.weight`` is
``model.model.layers[0].mlp.up_proj`` and its HF leaf ``weight``); `_slots` lists them and
`_load_tensor` converts one tensor for its module: the seam where quantize-on-load plugs in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM, RMSNorm

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype tags a float parameter may come in
# Keys some checkpoints carry that hold no parameter: old llama checkpoints saved RoPE's inv_freq.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class _Slot(NamedTuple):
    """Where one checkpoint tensor goes: a module, the HF leaf name, and the Variable it fills."""

    module: nnx.Module
    leaf: str  # "weight" or "bias"
    variable: nnx.Variable
    transpose: bool  # nnx.Linear kernels are (in, out); HF weights are (out, in)


def _slots(model: LlamaForCausalLM) -> dict[str, _Slot]:
    """Checkpoint key -> slot, for every parameter of the (possibly abstract) model."""
    slots = {}
    for path, node in nnx.iter_graph(model):
        prefix = ".".join(str(p) for p in path)
        if isinstance(node, nnx.Linear):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.kernel, True)
            if node.bias is not None:
                slots[f"{prefix}.bias"] = _Slot(node, "bias", node.bias, False)
        elif isinstance(node, nnx.Embed):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.embedding, False)
        elif isinstance(node, RMSNorm):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.weight, False)
    return slots


def _hf_shape(slot: _Slot) -> tuple[int, ...]:
    shape = tuple(slot.variable.get_value().shape)
    return shape[::-1] if slot.transpose else shape


def _load_tensor(slot: _Slot, array: np.ndarray) -> None:
    """Converts one checkpoint tensor (in HF layout) and stores it in its slot.

    Quantize-on-load seam: for a targeted nnx.Linear's "weight", a per-tensor quantizer takes `array`
    here in HF's (out, in) layout, which is bitsandbytes' layout too, and keeps the quantized tensor
    instead of a dense kernel (which then stays abstract, never allocated); once all tensors are in,
    the Linear is replaced by a quantized layer built from it and its bias.
    """
    value = array.T if slot.transpose else array
    slot.variable.set_value(jnp.asarray(value, dtype=slot.variable.get_value().dtype))


def _build_abstract(config: LlamaConfig, dtype, compute_dtype, remat: bool, quantization: Any):
    """The model with shapes and dtypes but no storage (nothing is initialised)."""
    if quantization is not None:
        # Quantize-on-load seam: validate `quantization` here; the per-tensor work is in `_load_tensor`.
        raise NotImplementedError("quantize-on-load is not wired yet (jaxlora/models/loading.py)")
    return nnx.eval_shape(
        lambda: LlamaForCausalLM(config, dtype=compute_dtype, param_dtype=dtype, remat=remat, rngs=nnx.Rngs(0))
    )


def _resolve(path_or_id: str | os.PathLike, revision: str | None) -> Path:
    """A local checkpoint directory: `path_or_id` itself, or a hub snapshot when it is no local path."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download  # optional ("train" extra); only for hub ids
    except ImportError as e:
        raise FileNotFoundError(f"{text}: not a local directory, and huggingface_hub is not installed") from e
    patterns = ["config.json", "*.safetensors", INDEX_FILE]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "no checkpoint here"
        raise FileNotFoundError(f"{text}: not a local directory, and the hub download failed ({e})") from e


def load_config(directory: str | os.PathLike) -> LlamaConfig:
    """Reads ``config.json`` of a checkpoint directory."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory needs a config.json")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    try:
        return LlamaConfig.from_hf_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from e


def _weight_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, from the headers alone."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                "(only safetensors checkpoints are read)")
    where: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing")
        with _open(file) as f:
            for key in f.keys():
                if key in where:
                    raise ValueError(f"{key}: in both {where[key].name} and {file.name}")
                where[key] = file
    if index.is_file():
        absent = sorted(set(weight_map) - set(where))
        if absent:
            raise ValueError(f"{index}: keys listed but in no shard: {absent[:5]}")
    return where


def _open(file: Path):
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _check(slots: dict[str, _Slot], where: dict[str, Path], config: LlamaConfig) -> None:
    """Names, shapes and dtypes of the checkpoint against the model, before any data is read."""
    ignored = {k for k in where if k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    missing = sorted(set(slots) - set(where))
    extra = sorted(set(where) - set(slots) - ignored)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} unexpected tensors, e.g. {extra[:5]} "
                         f"(in {where[extra[0]]})")
    for file in sorted(set(where.values())):
        with _open(file) as f:
            for key in (k for k in f.keys() if k in slots):
                info = f.get_slice(key)
                shape, expected = tuple(info.get_shape()), _hf_shape(slots[key])
                if shape != expected:
                    raise ValueError(f"{key} in {file.name}: shape {shape}, the config implies {expected}")
                if info.get_dtype() not in _FLOAT_DTYPES:
                    raise ValueError(f"{key} in {file.name}: dtype {info.get_dtype()}, expected a float "
                                     f"dtype ({', '.join(_FLOAT_DTYPES)})")


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    dtype=jnp.float32,
    compute_dtype=None,
    remat: bool = False,
    quantization: Any = None,
    revision: str | None = None,
) -> LlamaForCausalLM:
    """Loads a llama / mistral / qwen2 checkpoint (config.json + safetensors, single or sharded).

    dtype: parameter storage dtype (checkpoint tensors are cast to it); compute_dtype: activations'
    dtype, default `dtype`. quantization: reserved for quantize-on-load (NotImplementedError for now).
    path_or_id: a local directory, or a hub id fetched with huggingface_hub when a network exists.
    """
    directory = _resolve(path_or_id, revision)
    config = load_config(directory)
    model = _build_abstract(config, dtype, compute_dtype or dtype, remat, quantization)
    slots = _slots(model)
    where = _weight_files(directory)
    _check(slots, where, config)
    for file in sorted(set(where.values())):
        with _open(file) as f:
            for key in (k for k in f.keys() if k in slots):
                try:
                    array = f.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{file}: cannot read {key}, corrupt or truncated ({e})") from e
                _load_tensor(slots[key], array)
                del array  # one host tensor alive at a time
    return model


def state_dict(model: LlamaForCausalLM, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tensor) pairs in transformers' names and layouts, one tensor materialised at a time."""
    for key, slot in _slots(model).items():
        value = slot.variable.get_value()
        if dtype is not None:
            value = value.astype(dtype)
        array = np.asarray(value)
        yield key, np.ascontiguousarray(array.T if slot.transpose else array)


def save_pretrained(model: LlamaForCausalLM, directory: str | os.PathLike, *, dtype=None) -> Path:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads.

    Files are written in a temporary directory beside the target and renamed into place, so a crash
    never leaves a half-written checkpoint; other files in an existing directory are kept.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(state_dict(model, dtype))
    saved_dtype = next(iter(tensors.values())).dtype
    config = model.config.to_hf_dict() | {"torch_dtype": saved_dtype.name}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})  # transformers requires "pt"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not target.exists():
            tmp.rename(target)
            return target
        (target / INDEX_FILE).unlink(missing_ok=True)  # a stale index would shadow the new file
        for name in (SINGLE_FILE, "config.json"):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
