"""PEFT adapter directories: ``adapter_model.safetensors`` + ``adapter_config.json``, both ways.

Tensor names are PEFT's with the adapter name stripped (peft 0.21 ``get_peft_model_state_dict``), which are
a `jaxlora.PeftModel`'s own module paths: ``base_model.model.<module path>.lora_A.weight`` (r, in),
``.lora_B.weight`` (out, r), and for DoRA ``.lora_magnitude_vector`` (out,), all float32; with
``bias="all"`` / ``"lora_only"`` the trained base biases as PEFT names them, ``<path>.base_layer.bias`` under
an adapted layer and ``<path>.bias`` elsewhere; and each module of ``modules_to_save`` under its own names
(``base_model.model.lm_head.weight``), in its dtype; beside an adapted embedding or ``lm_head`` (tied or not)
its base weight, ``<path>.base_layer.weight``, as PEFT's ``save_embedding_layers``.
``peft.PeftModel.from_pretrained(hf_model, dir)`` loads
what `save_adapter` writes; `load_adapter` reads what PEFT's ``save_pretrained`` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlora.base import TableBase
from jaxlora.fileio import atomic_directory
from jaxlora.layers import LoRALinear
from jaxlora.modules_to_save import ModulesToSave, module_tensors, original_of
from jaxlora.lora_config import ALL_LINEAR, LoraConfig
from jaxlora.models.stack import per_layer, unstacked
from jaxlora.targets import (OUTPUT_HEAD, base_of, embedding_modules, find_saved_modules, find_targets,
                             linear_modules, lora_layers, peft_modules_to_save, peft_target_modules, saved_modules,
                             trained_biases)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # where a PeftModel holds the user's model: its paths are the file's names
# Adapter tensors may come in any float width (PEFT saves the parameters' dtype); each widens to float32 exactly.
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def save_adapter(peft: nnx.Module, directory: str | os.PathLike, *, adapter_name: str | None = None) -> Path:
    """Writes one adapter of a `jaxlora.PeftModel` (default: the active one) as a PEFT adapter directory,
    atomically: the files are written in a temporary directory beside `directory` and renamed into place.
    "all-linear" is written as the list of adapted module paths, as PEFT does."""
    _check_unmerged(peft)
    configs = peft.peft_config
    name = adapter_name or peft.active_adapter
    if name not in configs:
        raise ValueError(f"no adapter {name!r} to save; have {list(configs)}")
    tensors = {}
    with unstacked(peft):  # paths from the wrapper down: the file's names
        for path, layer in lora_layers(peft).items():
            if name in layer.adapters:
                for key, value in layer.peft_state(name).items():
                    tensors[f"{path}.{key}"] = np.ascontiguousarray(np.asarray(value, np.float32))
        adapted = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
        names = peft_target_modules(peft.base_model.model, configs[name])  # as PEFT holds and saves them
        tables = _writes_tables(peft.base_model.model, names)
        for path, layer in lora_layers(peft).items():  # PEFT saves an adapted embedding's or head's weight too
            if tables and name in layer.adapters and _saves_base_weight(path, layer.base):
                tensors[f"{path}.{_TABLE}"] = np.ascontiguousarray(np.asarray(_base_weight(layer.base)))
        for path, base in trained_biases(peft, configs[name], name).items():  # in the base's dtype, as PEFT
            tensors[_bias_key(path, path in adapted)] = np.ascontiguousarray(np.asarray(base.bias.get_value()))
        for path, wrapper in saved_modules(peft).items():  # PEFT drops "modules_to_save.<adapter>" from names
            if name in wrapper.adapters:
                for key, value in wrapper.peft_state(name).items():
                    tensors[f"{path}.{key}"] = np.ascontiguousarray(np.asarray(value))
    config = configs[name].to_peft_dict()
    if config["target_modules"] == ALL_LINEAR:
        config["target_modules"] = [k[len(PREFIX):] for k in adapted]
    else:  # under ensure_weight_tying PEFT saves the names it rewrote to tie (either reads the other's)
        config["target_modules"] = _listed(names)
    config["modules_to_save"] = _listed(peft_modules_to_save(peft.base_model.model, configs[name]))
    target = Path(directory)
    with atomic_directory(target) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def _listed(names):
    return list(names) if isinstance(names, tuple) else names  # JSON's list; a regex or None as it is


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a PEFT adapter directory needs {CONFIG_NAME}")
    try:
        return LoraConfig.from_peft_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from e


# PEFT's save_embedding_layers="auto" writes the base weight of an adapted embedding or output head (for a
# resized vocabulary) and loads it into the base -- the shared table, on a tied model; jaxlora does both (a
# file without it loads too).
_TABLE = "base_layer.weight"
_EMBEDDING_LAYER_NAMES = ("embed_tokens", OUTPUT_HEAD)  # PEFT's EMBEDDING_LAYER_NAMES


def _writes_tables(model: nnx.Module, names: str | tuple[str, ...]) -> bool:
    """PEFT's ``embedding_is_targeted`` (get_peft_model_state_dict): the adapted embeddings' and heads' base
    weights are written when target_modules as PEFT holds them (`names`: `targets.peft_target_modules`)
    contain "embed_tokens" or "lm_head" themselves -- a longer name such as "model.embed_tokens" does not
    count -- or, as a regex, full-match a module path ending in one. ("all-linear" adapts neither.)"""
    if names == ALL_LINEAR:
        return False
    if isinstance(names, str):
        paths = linear_modules(model) | embedding_modules(model)
        return any(re.fullmatch(names, p) for p in paths if p.rsplit(".", 1)[-1] in _EMBEDDING_LAYER_NAMES)
    return any(end in names for end in _EMBEDDING_LAYER_NAMES)


def _saves_base_weight(path: str, base: nnx.Module) -> bool:
    """Whether PEFT writes this adapted layer's base weight (``save_embedding_layers``): an embedding, a tied
    head, a dense lm_head. (A quantized lm_head's packed bytes are not written.)"""
    return isinstance(base, TableBase) or path.rsplit(".", 1)[-1] == OUTPUT_HEAD and isinstance(base, nnx.Linear)


def _base_weight(base: nnx.Module) -> jax.Array:
    """The base weight in transformers' layout: a table (vocab, hidden), or a linear layer's (out, in)."""
    return base.embedding.get_value() if isinstance(base, TableBase) else base.kernel.get_value().T


def _set_base_weight(base: nnx.Module, weight: jax.Array) -> None:
    var, value = (base.embedding, weight) if isinstance(base, TableBase) else (base.kernel, weight.T)
    var.set_value(value.astype(var.get_value().dtype))


def _check_unmerged(peft) -> None:
    # A merged base holds the delta: saved, an embedding's table would carry it twice; loaded into, the table
    # would lose the delta a later unmerge subtracts.
    if peft.merged_adapters:
        raise ValueError(f"adapters {peft.merged_adapters} are merged into the base weights; unmerge_adapter() "
                         "before saving or loading adapters")


def _bias_key(path: str, adapted: bool) -> str:
    """PEFT's name of a trained base bias at module `path` (from the wrapper down): under ``base_layer``
    where a LoRA layer wraps the linear layer."""
    return f"{path}.base_layer.bias" if adapted else f"{path}.bias"


def _expected(model: nnx.Module, config: LoraConfig
              ) -> tuple[dict[str, tuple[int, ...]], dict, dict[str, str], list[tuple[str, str]]]:
    """File key -> shape, for the layers `config` selects in the user's `model` (call it inside `unstacked`):
    the tensors a file must hold, those it may hold (an adapted embedding's table), and the other name a file
    may give each trained bias (``base_layer.bias`` or ``bias``: PEFT names it by which layers some adapter
    wraps when it saves, so a file from a model with other adapters may use either); and the (head key,
    embedding key) pairs a tied LoRA stores twice, the one the other's transpose (PEFT saves views of one
    storage under both names)."""
    shapes, optional, aliases, tied = {}, {}, {}, []
    targets = find_targets(model, config)
    embeddings = embedding_modules(model)
    for t in targets:
        if t.name in embeddings:  # PEFT's lora.Embedding: lora_embedding_A (r, vocab), lora_embedding_B (hidden, r)
            table = base_of(t.module).embedding.get_value()
            shapes[f"{PREFIX}{t.name}.lora_embedding_A"] = (t.r, table.shape[0])
            shapes[f"{PREFIX}{t.name}.lora_embedding_B"] = (table.shape[1], t.r)
            optional[f"{PREFIX}{t.name}.{_TABLE}"] = tuple(table.shape)
            continue
        if _saves_base_weight(t.name, base_of(t.module)):  # a head: PEFT writes its weight (the tied table) too
            optional[f"{PREFIX}{t.name}.{_TABLE}"] = tuple(_base_weight(base_of(t.module)).shape)
        in_f, out_f = t.module.in_features, t.module.out_features
        if t.tied_to is not None:  # head A (r, hidden) = embedding B.T, head B (vocab, r) = embedding A.T
            tied += [(f"{PREFIX}{t.name}.lora_A.weight", f"{PREFIX}{t.tied_to}.lora_embedding_B"),
                     (f"{PREFIX}{t.name}.lora_B.weight", f"{PREFIX}{t.tied_to}.lora_embedding_A")]
        shapes[f"{PREFIX}{t.name}.lora_A.weight"] = (t.r, in_f)
        shapes[f"{PREFIX}{t.name}.lora_B.weight"] = (out_f, t.r)
        if config.use_dora:
            shapes[f"{PREFIX}{t.name}.lora_magnitude_vector"] = (out_f,)
    targeted = {t.name for t in targets}
    for name, (_, module) in linear_modules(model).items():  # the biases `trained_biases` will select
        adapted = name in targeted or isinstance(module, LoRALinear)
        bias = base_of(module).bias
        if bias is not None and (config.bias == "all" or config.bias == "lora_only" and name in targeted):
            shapes[_bias_key(PREFIX + name, adapted)] = tuple(bias.get_value().shape)
            aliases[_bias_key(PREFIX + name, adapted)] = _bias_key(PREFIX + name, not adapted)
    for name, (_, module) in find_saved_modules(model, config).items():
        original = original_of(module)
        shapes.update({f"{PREFIX}{name}.{k}": tuple(v.shape) for k, v in module_tensors(original).items()})
    return shapes, optional, aliases, tied


@per_layer
def load_adapter(peft: nnx.Module, directory: str | os.PathLike, *, adapter_name: str = "default",
                 rngs: nnx.Rngs | None = None) -> None:
    """Injects the adapter of a PEFT adapter directory into a `jaxlora.PeftModel` and fills it. Every tensor's
    name, shape and dtype is checked against the model before the model is touched. The first adapter
    becomes active; a further one does not (PEFT's ``load_adapter``; use `set_adapter`).

    `rngs` is optional, as in PEFT: every weight comes from the file, so the draws it would seed are
    overwritten; only a `lora_dropout` layer keeps a stream from it (default ``nnx.Rngs(0)``)."""
    rngs = nnx.Rngs(0) if rngs is None else rngs
    directory = Path(directory)
    config = read_adapter_config(directory)
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (jaxlora reads safetensors adapters only)")
    if adapter_name in peft.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; have {list(peft.peft_config)}")
    _check_unmerged(peft)
    # PiSSA / LoftQ initialisation would rewrite the base weights; the file already holds the result.
    init = config.init_lora_weights if isinstance(config.init_lora_weights, bool) else True
    inject = dataclasses.replace(config, init_lora_weights=init)
    expected, optional, aliases, tied = _expected(peft.base_model.model, inject)
    try:
        with safe_open(file, framework="np") as f:
            stored = set(f.keys())
            renamed = {alt: k for k, alt in aliases.items() if k not in stored and alt in stored}  # file -> ours
            keys = {renamed.get(k, k) for k in stored}
            in_file = {k: alt for alt, k in renamed.items()}
            expected |= {k: shape for k, shape in optional.items() if k in keys}
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing:
                raise ValueError(f"{file}: missing {len(missing)} adapter tensors, e.g. {missing[:3]}")
            if extra:
                raise ValueError(f"{file}: {len(extra)} tensors no targeted module takes, e.g. {extra[:3]} "
                                 f"(target_modules={config.target_modules!r})")
            for key, shape in expected.items():
                info = f.get_slice(in_file.get(key, key))
                if tuple(info.get_shape()) != shape:
                    raise ValueError(f"{file}: {key} has shape {tuple(info.get_shape())}, the model and "
                                     f"config imply {shape}")
                if info.get_dtype() not in _FLOAT_DTYPES:
                    raise ValueError(f"{file}: {key} has dtype {info.get_dtype()}, expected one of {_FLOAT_DTYPES}")
        tensors = {renamed.get(k, k): v for k, v in _read(file).items()}
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    for head_key, embed_key in tied:  # one pair of matrices here: two different copies would lose one
        if not np.array_equal(np.asarray(tensors[head_key]), np.asarray(tensors[embed_key]).T, equal_nan=True):
            raise ValueError(f"{file}: {head_key} is not {embed_key} transposed, but ensure_weight_tying=True ties "
                             "the head's LoRA to the embedding's (one pair of matrices); the file's two copies differ")
    peft.add_adapter(adapter_name, inject, rngs=rngs)
    peft._register(adapter_name, config)  # the file's config, not the injection's
    for path, layer in lora_layers(peft).items():
        if adapter_name in layer.adapters:
            prefix = f"{path}."
            layer.load_peft_state({k[len(prefix):]: v for k, v in tensors.items()
                                   if k.startswith(prefix) and ".lora_" in k}, adapter_name)
    for path, wrapper in saved_modules(peft).items():
        if adapter_name in wrapper.adapters:
            prefix = f"{path}."
            wrapper.load_peft_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                    adapter_name)
    adapted = lora_layers(peft)
    for path, layer in adapted.items():
        if adapter_name in layer.adapters and f"{path}.{_TABLE}" in tensors:
            _set_base_weight(layer.base, tensors[f"{path}.{_TABLE}"])
    for path, base in trained_biases(peft, config, adapter_name).items():  # into the base, as PEFT loads them
        base.bias.set_value(tensors[_bias_key(path, path in adapted)].astype(base.bias.get_value().dtype))


def _read(file: Path) -> dict:
    """All tensors as float32 jax arrays (bf16 goes through the flax reader: numpy has no bfloat16)."""
    with safe_open(file, framework="flax") as f:
        return {k: jnp.asarray(f.get_tensor(k), jnp.float32) for k in f.keys()}
