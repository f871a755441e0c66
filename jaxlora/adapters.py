"""Adapters at model level: inject `LoRALinear` / `LoRAEmbedding` by `LoraConfig`, switch, combine, merge.

A module's path is its attribute path joined by dots (``model.layers.0.self_attn.q_proj``): the
transformers module name, so PEFT's ``target_modules`` select the same layers here. Each function runs on
the per-layer picture of the model's stacked decoder layers (`jaxlora.models.stack.per_layer`). The model
records its adapters' configs in ``model.lora_configs`` (``(name, LoraConfig)`` pairs: static, hashable graph
data, so a jitted function may take the model) and the active one in ``model.active_adapter``; each
layer holds its own adapters (`jaxlora.layers`). Nothing here knows file formats (`jaxlora.peft_io`).

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)  # adapters move, nothing else
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

from flax import nnx

from jaxlora.graph import replace_module
from jaxlora.mixed import BASE, AdapterRows
from jaxlora.models.stack import per_layer, stochastic, unstacked
from jaxlora.embedding import LoRAEmbedding
from jaxlora.layers import LoRALinear, set_bias_trainable
from jaxlora.modules_to_save import ModulesToSave
from jaxlora.qlinear import QuantizedLinear
from jaxlora.lora import CombinationType, pissa_niter
from jaxlora.lora_config import ALL_LINEAR, LoraConfig

OUTPUT_HEAD = "lm_head"  # transformers' output embedding name; "all-linear" leaves it alone, as PEFT
_LINEAR = (nnx.Linear, QuantizedLinear, LoRALinear)
_LORA_LAYER = {nnx.Linear: LoRALinear, QuantizedLinear: LoRALinear, nnx.Embed: LoRAEmbedding}  # base -> layer


class Target(NamedTuple):
    """A linear layer an adapter goes to: where it sits and what it gets."""

    path: tuple[str | int, ...]  # attribute path, ints index nnx.List
    name: str  # the dotted path, PEFT's module name
    module: nnx.Module  # nnx.Linear, QuantizedLinear, or a LoRALinear that gets one more adapter
    r: int
    lora_alpha: float


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _modules(model: nnx.Module, kinds: tuple[type, ...]) -> dict[str, tuple[tuple, nnx.Module]]:
    """Dotted path -> (path, module) of the modules of `kinds`, not descending into adapter layers."""
    found = {_dotted(p): (tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, kinds)}
    wrappers = [_dotted(p) for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear | ModulesToSave)]
    return {name: v for name, v in found.items() if not any(name.startswith(w + ".") for w in wrappers)}


@per_layer
def linear_modules(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """Dotted path -> (path, module) of every linear layer, not descending into LoRA layers or the modules
    trained in full (`ModulesToSave`)."""
    return {k: v for k, v in _modules(model, _LINEAR).items() if not isinstance(v[1], LoRAEmbedding)}


@per_layer
def embedding_modules(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """Dotted path -> (path, module) of every token embedding (``nnx.Embed`` or `LoRAEmbedding`)."""
    return _modules(model, (nnx.Embed, LoRAEmbedding))


@per_layer
def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """Dotted path -> every LoRA layer in the model: `LoRALinear` (over any base), `LoRAEmbedding`."""
    return {name: m for name, (_, m) in _modules(model, (LoRALinear,)).items()}


@per_layer
def saved_modules(model: nnx.Module) -> dict[str, ModulesToSave]:
    """Dotted path -> every `ModulesToSave` (a module trained in full) in the model."""
    return {name: m for name, (_, m) in _modules(model, (ModulesToSave,)).items()}


def _adapter_layers(model: nnx.Module) -> dict[str, LoRALinear | ModulesToSave]:
    """Every layer holding adapters: LoRA layers and modules trained in full (the same adapter methods)."""
    return lora_layers(model) | saved_modules(model)


@per_layer
def find_saved_modules(model: nnx.Module, config: LoraConfig) -> dict[str, tuple[tuple, nnx.Module]]:
    """The modules `config.modules_to_save` names (path -> (path, module): an ``nnx.Linear``, ``nnx.Embed`` or
    `ModulesToSave` that gets one more copy); ValueError if a name matches nothing or a LoRA target."""
    if not config.modules_to_save:
        return {}
    found = {name: v for name, v in _modules(model, (*_LINEAR, nnx.Embed, ModulesToSave)).items()
             if config.saves(name)}
    targeted = {t.name for t in find_targets(model, config)}
    for name, (_, module) in found.items():
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is quantized and cannot be trained in full (modules_to_save); keep it dense "
                             "with QuantConfig(skip_modules=...)")
        if isinstance(module, LoRALinear) or name in targeted:
            raise ValueError(f"{name} is both a LoRA target and in modules_to_save={list(config.modules_to_save)}; "
                             "choose one")
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        # PEFT (ensure_weight_tying=False) trains an untied copy there: the logits keep the original matrix,
        # and merge_and_unload unties the model -- which a tied jaxlora model has no lm_head module to hold.
        raise ValueError(f"modules_to_save={list(config.modules_to_save)} on a model with tied embeddings is not "
                         "supported (it has no lm_head module, and PEFT's trained copy would untie the model)")
    missing = [n for n in config.modules_to_save if not any(path.endswith(n) for path in found)]
    if missing:
        raise ValueError(f"modules_to_save names {missing} match no module of the model")
    return found


def adapter_configs(model: nnx.Module) -> dict[str, LoraConfig]:
    """Adapter name -> its `LoraConfig`, in the order the adapters were added."""
    return dict(getattr(model, "lora_configs", ()))


@per_layer
def find_targets(model: nnx.Module, config: LoraConfig) -> list[Target]:
    """The layers `config` selects, each with its rank and alpha; ValueError if none or a rank is too big."""
    targets = []
    linears = linear_modules(model)
    # Embeddings are adapted when named, never by "all-linear" (PEFT's rule as well).
    embeddings = {} if config.target_modules == ALL_LINEAR else embedding_modules(model)
    for name, (path, module) in (linears | embeddings).items():
        if not config.targets(name, is_output_head=name == OUTPUT_HEAD):
            continue
        r = config.r_for(name)  # may exceed min(in, out): PEFT accepts that too
        if name in embeddings and (config.use_dora or config.init_lora_weights not in (True, False, "gaussian")):
            raise ValueError(f"{name} is an embedding: LoRA there takes init_lora_weights True, False or 'gaussian' "
                             f"and no DoRA, as in PEFT (got {config.init_lora_weights!r}, use_dora={config.use_dora})")
        needs_dense = config.init_lora_weights in ("pissa", "loftq") or pissa_niter(config.init_lora_weights)
        if needs_dense and isinstance(_base(module), QuantizedLinear):
            raise ValueError(f"{name}: init_lora_weights={config.init_lora_weights!r} needs the dense weight, but "
                             "this layer is already quantized; inject into the dense model and quantize with "
                             "jaxlora.qlora_linear")
        targets.append(Target(path, name, module, r, config.alpha_for(name)))
    if config.exclude_modules and not any(config.excludes(name) for name in linears):
        # PEFT's inject_adapter warns the same way: an exclusion that names nothing is likely a typo.
        warnings.warn(f"exclude_modules={config.exclude_modules!r} excludes no linear layer of the model; "
                      "check its names", UserWarning, stacklevel=3)
    if not targets:
        names = list(linears)
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
                         f"matches no linear layer; available names: {suffixes}, e.g. paths {names[:4]}")
    return targets


def _base(module):
    return module.base if isinstance(module, LoRALinear) else module


@per_layer
def add_adapter(model: nnx.Module, adapter_name: str, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Adds adapter `adapter_name` to the layers `config` selects; the active adapter stays active (PEFT).
    All checks run before the model is touched."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jaxlora LoraConfig, got {type(config).__name__}")
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; have {list(configs)}")
    targets = find_targets(model, config)
    saved = find_saved_modules(model, config)
    for t in targets:
        kw = dict(r=t.r, lora_alpha=t.lora_alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                  use_dora=config.use_dora, init_lora_weights=config.init_lora_weights,
                  loftq_iter=config.loftq_config.get("loftq_iter", 1), rngs=rngs)
        if isinstance(t.module, LoRALinear):
            t.module.add_adapter(adapter_name, **kw)
            continue
        cls = next(c for base, c in _LORA_LAYER.items() if isinstance(t.module, base))
        layer = cls(t.module, adapter_name=adapter_name, **kw)
        if configs:  # a fresh layer activates its first adapter; the model's active one decides
            _activate(layer, getattr(model, "active_adapter", None))
        replace_module(model, t.path, layer)
    for path, module in saved.values():
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
            continue
        wrapper = ModulesToSave(module, adapter_name)
        if configs:
            _activate(wrapper, getattr(model, "active_adapter", None))
        replace_module(model, path, wrapper)
    model.lora_configs = tuple(configs.items()) + ((adapter_name, config),)
    if not configs:
        model.active_adapter = adapter_name
    _sync_biases(model)
    return model


def trained_biases(model: nnx.Module, adapter_name: str) -> dict[str, nnx.Module]:
    """Dotted path -> base linear layer whose bias adapter `adapter_name` trains (its ``bias`` setting):
    every biased linear layer for "all", those it adapts for "lora_only" (PEFT's rule), none for "none".
    Call it on the per-layer model (inside `unstacked`)."""
    bias = adapter_configs(model)[adapter_name].bias
    found = {}
    for name, (_, module) in linear_modules(model).items():
        adapted = isinstance(module, LoRALinear) and adapter_name in module.adapters
        if _base(module).bias is not None and (bias == "all" or bias == "lora_only" and adapted):
            found[name] = _base(module)
    return found


def _sync_biases(model: nnx.Module) -> None:
    """Each base bias trains iff some adapter's config says so (derived from `lora_configs`, never kept)."""
    trained = {name for adapter in adapter_configs(model) for name in trained_biases(model, adapter)}
    for name, (_, module) in linear_modules(model).items():
        set_bias_trainable(_base(module), name in trained)


@per_layer
def get_peft_model(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, adapter_name: str = "default"):
    """PEFT's ``get_peft_model``: replaces each targeted ``nnx.Linear`` or `QuantizedLinear` by a `LoRALinear`
    over it (an ``nnx.Embed`` by a `LoRAEmbedding`), in place, and returns the model with `adapter_name` active."""
    if adapter_configs(model):
        raise ValueError(f"model already has adapters {list(adapter_configs(model))}; use add_adapter")
    return add_adapter(model, adapter_name, config, rngs=rngs)


def _activate(layer: LoRALinear | ModulesToSave, name: str | None) -> None:
    if name is not None and name in layer.adapters:
        layer.set_adapter(name)
    else:  # this layer has no such adapter: it runs its base alone
        layer.active_adapter = None


@per_layer
def set_adapter(model: nnx.Module, adapter_name: str) -> None:
    """Makes `adapter_name` the active adapter of every layer (layers without it run their base)."""
    if adapter_name not in adapter_configs(model):
        raise ValueError(f"unknown adapter {adapter_name!r}; have {list(adapter_configs(model))}")
    for layer in _adapter_layers(model).values():
        _activate(layer, adapter_name)
    model.active_adapter = adapter_name


def adapter_rows(model: nnx.Module, adapter_names: Sequence[str]) -> AdapterRows:
    """PEFT's ``adapter_names=[...]``: one adapter name per row of a batch, ``"__base__"`` for the base model
    alone, as rows to pass to ``model(input_ids, adapter_rows=...)`` (or `jaxlora.generate`'s
    ``adapter_names``). Built outside jit; any combination of names reuses one compiled program.

    Refused as PEFT refuses: an unknown name, a DoRA adapter's name, merged adapters, dropout in train mode.
    """
    configs = adapter_configs(model)
    dora = sorted({n for n in adapter_names if n in configs and configs[n].use_dora})
    if dora:
        raise ValueError(f"adapter_names names DoRA adapters {dora}: mixed-adapter batches do not support DoRA "
                         "(as PEFT)")
    # The stacked layers are LoRALinear modules too (with stacked arrays): no need to unstack to read state.
    merged = sorted({n for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear) for n in m.merged_adapters})
    if merged:
        raise ValueError(f"adapters {merged} are merged; unmerge them before passing adapter_names (as PEFT)")
    if stochastic(model):
        raise ValueError("adapter_names is for inference, as in PEFT: the model's dropout is in train mode "
                         "(use model.eval() or jaxlora.generate.inference_view)")
    names = tuple(n for n, c in configs.items() if not c.use_dora)
    unknown = sorted({n for n in adapter_names if n != BASE and n not in configs})
    if unknown:
        raise ValueError(f"adapter_names has unknown adapters {unknown}; have {list(configs)} (or {BASE!r})")
    return AdapterRows.from_names(adapter_names, names)


class disable_adapters:  # noqa: N801 -- used as a function and as a context manager, like PEFT's disable_adapter
    """Base model only: ``disable_adapters(model)`` until `enable_adapters`, or ``with disable_adapters(model):``.
    Merged adapters are unmerged first, as PEFT does."""

    def __init__(self, model: nnx.Module):
        self.model = model
        with unstacked(model):
            for layer in _adapter_layers(model).values():
                layer.disable_adapter_layers()

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        enable_adapters(self.model)


@per_layer
def enable_adapters(model: nnx.Module) -> None:
    for layer in _adapter_layers(model).values():
        layer.enable_adapter_layers()


@per_layer
def delete_adapter(model: nnx.Module, adapter_name: str) -> None:
    """Removes an adapter; a layer left without adapters goes back to its base. If it was active, the first
    remaining adapter becomes active (PEFT's rule)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; have {list(configs)}")
    for name, (path, layer) in _modules(model, (LoRALinear,)).items():
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                replace_module(model, path, layer.unload())
    for name, (path, wrapper) in _modules(model, (ModulesToSave,)).items():
        if adapter_name in wrapper.adapters:
            wrapper.delete_adapter(adapter_name)
            if not wrapper.adapters:
                replace_module(model, path, wrapper.original)
    del configs[adapter_name]
    model.lora_configs = tuple(configs.items())
    _sync_biases(model)
    if model.active_adapter == adapter_name:
        model.active_adapter = None
        if configs:
            set_adapter(model, next(iter(configs)))


@per_layer
def add_weighted_adapter(model: nnx.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: CombinationType = "svd", svd_rank: int | None = None) -> None:
    """PEFT's ``add_weighted_adapter``: a new adapter on the union of the sources' layers, combined per layer
    ("linear", "svd" or "cat", see `jaxlora.lora`), with scale 1 (lora_alpha = r). Not activated. With
    "cat" a layer's rank is the sum of the ranks present there (PEFT pads to the global sum with zero
    columns of B: the same delta)."""
    configs = adapter_configs(model)
    unknown = [a for a in adapters if a not in configs]
    if unknown or not adapters:
        raise ValueError(f"unknown adapters {unknown or adapters!r}; have {list(configs)}")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if any(configs[a].use_dora for a in adapters):
        raise ValueError("DoRA adapters cannot be combined (their magnitude has no weighted sum)")
    ranks = {}
    for name, layer in lora_layers(model).items():
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
        if present:
            layer.add_weighted_adapter([a for a, _ in present], [w for _, w in present], adapter_name,
                                       combination_type=combination_type, svd_rank=svd_rank)
            _activate(layer, model.active_adapter)
            ranks[name] = layer.adapters[adapter_name].r
    r = max(ranks.values())
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = dataclasses.replace(
        configs[adapters[0]], r=r, lora_alpha=r, target_modules=tuple(ranks), exclude_modules=None,
        rank_pattern=pattern, alpha_pattern=pattern, use_rslora=False, lora_dropout=0.0, init_lora_weights=True,
        loftq_config={},
    )
    model.lora_configs = tuple(configs.items()) + ((adapter_name, config),)


@per_layer
def _strip(model: nnx.Module, merge: bool, requantize: bool) -> nnx.Module:
    for name, (path, layer) in _modules(model, (LoRALinear,)).items():
        if merge and layer.active_adapter is not None:
            base = layer.merge_and_unload(requantize=requantize)  # a dense base: requantize changes nothing
        else:
            base = layer.unload()
        replace_module(model, path, base)
    for name, (path, wrapper) in _modules(model, (ModulesToSave,)).items():  # PEFT keeps the active copy
        replace_module(model, path, wrapper.unload())
    for attr in ("lora_configs", "active_adapter"):
        if hasattr(model, attr):
            delattr(model, attr)
    _sync_biases(model)  # no adapters left: every bias is frozen again
    return model


def merge_and_unload(model: nnx.Module, *, requantize: bool = False) -> nnx.Module:
    """The plain model with each layer's active adapter folded in, in place; `save_pretrained` writes it as an
    HF checkpoint. A dense base is merged exactly (W + s A B in float32, cast to W's dtype). A quantized base
    becomes an ``nnx.Linear`` holding dequantize(W) + delta in W's original dtype -- no new quantization
    error; ``requantize=True`` re-quantizes instead, as PEFT's bnb merge does (adds a fresh NF4 error)."""
    return _strip(model, merge=True, requantize=requantize)


def unload(model: nnx.Module) -> nnx.Module:
    """The base model again, adapters dropped (nothing merged)."""
    return _strip(model, merge=False, requantize=False)


@per_layer
def print_trainable_parameters(model: nnx.Module) -> tuple[int, int]:
    """Prints PEFT's line and returns (trainable, all). Trainable = ``nnx.LoRAParam`` elements (A, B, DoRA
    magnitude). All = every ``nnx.Param`` plus each quantized layer's bias and its weight counted as
    out * in elements -- PEFT's convention for bitsandbytes 4-bit (packed bytes x 2); absmax and other
    quantization state are not counted, as in PEFT."""
    count = lambda state: sum(math.prod(x.shape) for x in nnx.to_flat_state(state).leaves)  # noqa: E731
    trainable = count(nnx.state(model, nnx.LoRAParam))
    total = count(nnx.state(model, nnx.Param))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, QuantizedLinear):
            total += math.prod(module.weight.get_value().shape)
            if module.bias is not None and not isinstance(module.bias, nnx.Param):  # a trained bias is counted
                total += math.prod(module.bias.get_value().shape)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total
