"""Hugging Face checkpoints <-> `LlamaForCausalLM`: `from_pretrained` and `save_pretrained`.

Loading builds the model abstractly (`nnx.eval_shape`: shapes only, no random init), checks every
tensor's name, shape and dtype against the safetensors headers before reading any data, then fills the
model one tensor at a time, so peak host memory stays near one model plus one tensor.

Every checkpoint key names a path in the module tree (``model.layers.0.mlp.up_proj.weight`` is
``model.model.layers[0].mlp.up_proj`` and its HF leaf ``weight``); `_slots` lists them and
`_load_tensor` converts one tensor for its module.

Quantization, two ways in and one way out:

* quantize-on-load (``quantization=QuantConfig(...)`` on a dense checkpoint): the abstract model already
  holds abstract `QuantizedLinear` layers; each targeted weight is read, cast to `dtype` (round to
  nearest even, as transformers casts before bitsandbytes quantizes) and quantized alone, so the dense
  linear weights are never all resident (peak ≈ quantized model + one dense tensor; measured in
  tests/models/test_loading.py);
* a bitsandbytes 4-bit checkpoint (config.json has ``quantization_config``): a quantized layer's
  ``weight`` and ``weight.*`` entries are read as one group and become its QuantizedTensor as stored;
* `save_pretrained` writes quantized layers in that bitsandbytes format, which transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxlora.fileio import atomic_directory
from jaxlora.qlinear import QuantizedLinear, QuantizedWeight
from jaxlora.models.config import LlamaConfig
from jaxlora.models.hf_files import (INDEX_FILE, SINGLE_FILE, TensorReader, load_config, open_safetensors,
                                     resolve, weight_files)
from jaxlora.models.llama import LlamaForCausalLM, RMSNorm
from jaxlora.models.quantize import QuantConfig, hf_quantization_config, quantize_model
from jaxlora.models.stack import device_arrays, host_buffers, unstacked
from jaxlora.models.tied import TiedHead
from jaxlora.quant import from_bnb_state_dict, quantize, to_bnb_state_dict
from jaxlora.quant.config import FORMAT_FIELDS

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype tags a float parameter may come in
# safetensors tags a bitsandbytes packed weight may be stored as (its quant_storage), and their byte sizes.
_STORAGE_SIZES = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}
# The QuantConfig fields a `quantization` passed with a bnb checkpoint may set: how its layers run, and
# re-quantize (bnb_backend). The format and skip_modules are the checkpoint's.
_RUNTIME_FIELDS = ("compute_dtype", "use_kernel", "bnb_backend")
# Keys some checkpoints carry that hold no parameter: old llama checkpoints saved RoPE's inv_freq.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class _Slot(NamedTuple):
    """Where one checkpoint tensor goes: a module, the HF leaf name, and the Variable it fills."""

    module: nnx.Module
    leaf: str  # "weight" or "bias"
    variable: nnx.Variable
    transpose: bool  # nnx.Linear kernels are (in, out); HF weights are (out, in)
    quant: QuantConfig | None = None  # set: a dense checkpoint tensor quantized on load with these settings

    @property
    def quantized(self) -> bool:
        return isinstance(self.variable, QuantizedWeight)


def _slots(model: LlamaForCausalLM, quantize: QuantConfig | None = None) -> dict[str, _Slot]:
    """Checkpoint key -> slot, for every parameter of the (possibly abstract) model. With `quantize`,
    quantized layers take a dense checkpoint weight; without, a bitsandbytes group (`_bnb_owners`).
    Call it inside `unstacked(model)`, where module paths are the checkpoint's per-layer names."""
    slots = {}
    for path, node in nnx.iter_graph(model):
        prefix = ".".join(str(p) for p in path)
        if isinstance(node, QuantizedLinear):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.weight, False, quantize)
            if node.bias is not None:
                slots[f"{prefix}.bias"] = _Slot(node, "bias", node.bias, False)
        elif isinstance(node, nnx.Linear):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.kernel, True)
            if node.bias is not None:
                slots[f"{prefix}.bias"] = _Slot(node, "bias", node.bias, False)
        elif isinstance(node, nnx.Embed):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.embedding, False)
        elif isinstance(node, RMSNorm):
            slots[f"{prefix}.weight"] = _Slot(node, "weight", node.weight, False)
    return slots


def _hf_shape(slot: _Slot) -> tuple[int, ...]:
    shape = tuple(slot.variable.get_value().shape)  # a QuantizedTensor's shape is already (out, in)
    return shape[::-1] if slot.transpose else shape


def _load_tensor(slot: _Slot, array: np.ndarray) -> None:
    """Converts one dense checkpoint tensor (in HF layout) and stores it in its slot.

    A weight quantized on load is cast to the slot's dtype first (XLA's convert rounds to nearest even,
    as torch's ``.to(dtype)`` in transformers), then quantized in HF's (out, in) layout, which is
    bitsandbytes' too; only the quantized tensor is kept.
    """
    dtype = slot.variable.get_value().dtype
    if slot.quant is not None:
        # Wait for the quantization, so that this dense tensor is freed before the next one is read.
        _store(slot.variable, jax.block_until_ready(quantize(jnp.asarray(array, dtype=dtype), slot.quant)))
        return
    value = array.T if slot.transpose else array
    _store(slot.variable, jnp.asarray(value, dtype=dtype))


def _store(variable: nnx.Variable, value) -> None:
    """Write `value` into the host buffer the variable views (a layer of a stacked array), or replace it
    when the buffer's structure differs (a bnb checkpoint's stored dtype)."""
    current = variable.get_value()
    leaves = jax.tree.leaves(current)
    if jax.tree.structure(current) == jax.tree.structure(value) and all(isinstance(x, np.ndarray) for x in leaves):
        jax.tree.map(lambda dst, src: np.copyto(dst, np.asarray(src)), current, value)
    else:
        variable.set_value(value)


def _load_bnb_group(slot: _Slot, key: str, group: dict[str, np.ndarray]) -> None:
    """Stores a bitsandbytes group (``<p>.weight``, ``<p>.weight.absmax``, ...) as stored: no dequantizing.
    The file gives the format; how the layer runs (compute dtype, kernels, backend) is the model's config."""
    qt = from_bnb_state_dict(group, prefix=key[: -len("weight")])
    model_config = slot.variable.get_value().config
    qt = qt.with_config(**{f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)
                           if f.name not in FORMAT_FIELDS})
    expected = _hf_shape(slot)
    if qt.shape != expected:
        state_key = next(k for k in group if ".quant_state." in k)
        raise ValueError(f"{state_key}: quant state shape {list(qt.shape)}, the config implies {list(expected)}")
    _store(slot.variable, qt)


def from_config(config: LlamaConfig, *, dtype=jnp.float32, compute_dtype=None, remat: bool | str = False,
                attention: str = "auto", quantization: QuantConfig | None = None) -> LlamaForCausalLM:
    """The model of `config` with shapes and dtypes but no storage (nothing initialised, nothing quantized):
    every array is a ``jax.ShapeDtypeStruct``. With `quantization`, targeted linears are abstract
    `QuantizedLinear` layers of dtype `dtype`. Plan memory with it before any download::

        model = from_config(config, dtype=jnp.bfloat16, quantization=QuantConfig())
        model = get_peft_model(model, LoraConfig(r=16), rngs=nnx.Rngs(0))  # adapters abstract too
        jax.jit(step).lower(...).compile().memory_analysis()
    """
    if quantization is not None and not isinstance(quantization, QuantConfig):
        raise TypeError(f"quantization must be a jaxlora QuantConfig (e.g. QuantConfig(quant_type='nf4')), "
                        f"got {quantization!r}")

    def build():
        model = LlamaForCausalLM(config, dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat,
                                 attention=attention, rngs=nnx.Rngs(0))
        return model if quantization is None else quantize_model(model, quantization)

    return nnx.eval_shape(build)


def _quantization(directory: Path, quantization: QuantConfig | None) -> tuple[QuantConfig | None, bool]:
    """The settings to build the model with, and whether the checkpoint is already (bnb 4-bit) quantized.

    A checkpoint's own ``quantization_config`` decides its layout; a `quantization` passed with it may
    only change the runtime settings (compute_dtype, use_kernel, bnb_backend), not the stored format.
    """
    if quantization is not None and not isinstance(quantization, QuantConfig):
        raise TypeError(f"quantization must be a jaxlora QuantConfig (e.g. QuantConfig(quant_type='nf4')), "
                        f"got {quantization!r}")
    hf = json.loads((directory / "config.json").read_text()).get("quantization_config")
    if hf is None:
        return quantization, False
    runtime = {} if quantization is None else {f: getattr(quantization, f) for f in _RUNTIME_FIELDS}
    try:
        stored = QuantConfig.from_hf_dict(hf, **runtime)
    except ValueError as e:
        raise ValueError(f"{directory / 'config.json'}: {e}") from None
    if quantization is not None and (quantization.quant_type, quantization.double_quant) != (
            stored.quant_type, stored.double_quant):
        raise ValueError(f"{directory} is already quantized (quant_type={stored.quant_type!r}, double_quant="
                         f"{stored.double_quant}); quantization asks for quant_type={quantization.quant_type!r}, "
                         f"double_quant={quantization.double_quant}: pass a matching QuantConfig or None")
    return stored, True


def _bnb_owners(slots: dict[str, _Slot], where: dict[str, Path]) -> dict[str, str]:
    """Checkpoint key -> the quantized slot whose bitsandbytes group holds it (``<p>.weight.absmax`` ->
    ``<p>.weight``), for the slots that read a group rather than quantize a dense tensor."""
    owners = {}
    for key in where:
        base = key.split(".weight.", 1)[0] + ".weight" if ".weight." in key else key
        slot = slots.get(base)
        if slot is not None and slot.quantized and slot.quant is None:
            owners[key] = base
    return owners


def _check(slots: dict[str, _Slot], where: dict[str, Path], config: LlamaConfig, owners: dict[str, str]) -> None:
    """Names, shapes and dtypes of the checkpoint against the model, before any data is read."""
    ignored = {k for k in where if k.endswith(_IGNORED_SUFFIXES)} | set(owners)
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
        with open_safetensors(file) as f:
            for key in (k for k in f.keys() if k in slots):
                info = f.get_slice(key)
                shape, expected = tuple(info.get_shape()), _hf_shape(slots[key])
                if key in owners:  # bitsandbytes packs two 4-bit codes per byte, as ((n + 1) // 2, 1) uint8,
                    n = int(np.prod(expected))  # or those bytes viewed as its quant_storage dtype
                    size = _STORAGE_SIZES.get(info.get_dtype())
                    if size is None or shape != ((n + 1) // 2 // size, 1):
                        raise ValueError(f"{key} in {file.name}: {info.get_dtype()}{list(shape)}, a bitsandbytes "
                                         f"4-bit weight of shape {list(expected)} is U8{[(n + 1) // 2, 1]} (or "
                                         "those bytes as F16 / BF16 / F32, bnb_4bit_quant_storage)")
                    continue
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
    remat: bool | str = False,
    attention: str = "auto",
    quantization: QuantConfig | None = None,
    revision: str | None = None,
) -> LlamaForCausalLM:
    """Loads a llama / mistral / qwen2 checkpoint (config.json + safetensors, single or sharded).

    dtype: parameter storage dtype (checkpoint tensors are cast to it; weights quantized on load are cast
    to it first and dequantize to it; a bnb checkpoint's keep their stored dtype); compute_dtype:
    activations' dtype, default `dtype`. remat, attention: see `LlamaForCausalLM`.
    quantization: a `QuantConfig` to quantize targeted linear layers tensor by tensor while loading.
    A bitsandbytes 4-bit checkpoint (``quantization_config`` in config.json) loads as stored, without
    `quantization`, or with one that only sets compute_dtype / use_kernel / bnb_backend.
    path_or_id: a local directory, or a hub id fetched with huggingface_hub when a network exists.
    """
    directory = resolve(path_or_id, revision)
    config = load_config(directory)
    quant, prequantized = _quantization(directory, quantization)
    model = from_config(config, dtype=dtype, compute_dtype=compute_dtype, remat=remat, attention=attention,
                        quantization=quant)
    # Host buffers filled in place, layer by layer through the stacks' per-layer views, then moved to the
    # device one array at a time: peak host memory stays near one model plus one tensor.
    host_buffers(model)
    with unstacked(model):
        _fill(model, directory, config, None if prequantized else quant)
    device_arrays(model)
    return model


def _fill(model: LlamaForCausalLM, directory: Path, config: LlamaConfig, quant: QuantConfig | None) -> None:
    slots = _slots(model, quant)
    where = weight_files(directory)
    owners = _bnb_owners(slots, where)
    _check(slots, where, config, owners)
    groups: dict[str, dict[str, np.ndarray]] = {}  # bitsandbytes groups being read (they may span shards)
    need = {base: sum(1 for o in owners.values() if o == base) for base in set(owners.values())}
    for file in sorted(set(where.values())):
        with TensorReader(file) as f:
            for key in (k for k in f.keys() if k in slots or k in owners):
                try:
                    array = f.read(key)
                except OSError as e:
                    raise ValueError(f"{file}: cannot read {key}, corrupt or truncated ({e})") from e
                if key not in owners:
                    try:
                        _load_tensor(slots[key], array)
                    except ValueError as e:  # e.g. a NaN in a weight quantized on load
                        raise ValueError(f"{file}: {key}: {e}") from None
                    del array  # one host tensor alive at a time
                    continue
                base = owners[key]
                group = groups.setdefault(base, {})
                group[key] = array
                if len(group) == need[base]:
                    try:
                        _load_bnb_group(slots[base], base, groups.pop(base))
                    except ValueError as e:
                        raise ValueError(f"{where[key]}: {e}") from None


def state_dict(model: LlamaForCausalLM, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tensor) pairs in transformers' names and layouts, one tensor materialised at a time.
    Quantized layers give their bitsandbytes entries (bytes as stored; `dtype` casts dense tensors only)."""
    with unstacked(model):  # the slots keep their per-layer views (host views on the CPU) after restacking
        slots = _slots(model)
    for key, slot in slots.items():
        value = slot.variable.get_value()
        if slot.quantized:
            yield from to_bnb_state_dict(value, prefix=key[: -len("weight")]).items()
            continue
        if dtype is not None:
            value = value.astype(dtype)
        array = np.asarray(value)
        yield key, np.ascontiguousarray(array.T if slot.transpose else array)


def save_pretrained(model: LlamaForCausalLM, directory: str | os.PathLike, *, dtype=None) -> Path:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads. A model with
    `QuantizedLinear` layers is written as a bitsandbytes 4-bit checkpoint (config.json carries its
    ``quantization_config``), which transformers loads with bitsandbytes and `from_pretrained` as stored.

    The directory is written beside the target and swapped into place (`jaxlora.fileio`), so a crash
    never leaves a half-written checkpoint; other files of an existing directory are kept.
    """
    adapted = sorted({".".join(map(str, path[:-2])) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))})
    if adapted:  # transformers has no place for adapter tensors in a base checkpoint
        raise ValueError(
            f"the model still holds LoRA adapters (e.g. {adapted[:3]}): save them with jaxlora.save_adapter, "
            "or merge them first with jaxlora.merge_and_unload(model) to save a merged checkpoint"
        )
    target = Path(directory)
    quantization_config = hf_quantization_config(model)  # raises before anything is written
    tensors = dict(state_dict(model, dtype))
    saved_dtype = tensors["model.embed_tokens.weight"].dtype  # never quantized
    # Tied iff the head reads the embedding's table: a tied head replaced by an untied trained copy
    # (modules_to_save, then unload / merge_and_unload) is written as lm_head.weight, as PEFT's merge does.
    tied = isinstance(model.lm_head, TiedHead)
    config = model.config.to_hf_dict() | {"torch_dtype": saved_dtype.name, "tie_word_embeddings": tied}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    # Weights of an earlier save (a sharded index, its shards) would shadow or contradict the new file;
    # anything else in the directory (tokenizer files, a README) is carried over.
    stale = lambda name: name == INDEX_FILE or name.endswith(".safetensors")  # noqa: E731
    with atomic_directory(target, keep=lambda name: not stale(name)) as tmp:
        save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt"})  # transformers requires "pt"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target
