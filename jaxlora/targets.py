"""Which modules of a model a `LoraConfig` adapts, trains in full or trains the bias of.

A module's name is its attribute path joined by dots (``model.layers.0.self_attn.q_proj``): the
transformers module name, so PEFT's ``target_modules`` select the same layers here. Every function takes the
user's model (what `jaxlora.PeftModel` holds at ``base_model.model``) and runs on the per-layer picture of
its stacked decoder layers (`jaxlora.models.stack.per_layer`). Nothing here changes the model.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import NamedTuple

from flax import nnx

from jaxlora.base import LinearBase
from jaxlora.embedding import LoRAEmbedding
from jaxlora.layers import LoRALinear, set_bias_trainable
from jaxlora.lora import pissa_niter
from jaxlora.lora_config import ALL_LINEAR, LoraConfig
from jaxlora.models.stack import per_layer
from jaxlora.models.tied import TiedHead
from jaxlora.modules_to_save import ModulesToSave, original_of
from jaxlora.qlinear import QuantizedLinear

OUTPUT_HEAD = "lm_head"  # transformers' output embedding name; "all-linear" leaves it alone, as PEFT
# Linear layers: flax's, any LinearBase (QuantizedLinear, a tied head: jaxlora.models.tied.TiedHead), LoRA layers.
_LINEAR = (nnx.Linear, LinearBase, LoRALinear)


class Target(NamedTuple):
    """A layer an adapter goes to: where it sits and what it gets."""

    path: tuple[str | int, ...]  # attribute path, ints index nnx.List
    name: str  # the dotted path, PEFT's module name
    module: nnx.Module  # nnx.Linear, a LinearBase, nnx.Embed, or a LoRA layer that gets one more adapter
    r: int
    lora_alpha: float
    # A tied head under ensure_weight_tying: the name of the embedding whose adapter it reads (`tied_lora`).
    tied_to: str | None = None


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


def modules(model: nnx.Module, kinds: tuple[type, ...]) -> dict[str, tuple[tuple, nnx.Module]]:
    """Dotted path -> (path, module) of the modules of `kinds`, not descending into adapter layers."""
    found = {dotted(p): (tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, kinds)}
    wrappers = [dotted(p) for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear | ModulesToSave)]
    return {name: v for name, v in found.items() if not any(name.startswith(w + ".") for w in wrappers)}


def base_of(module: nnx.Module) -> nnx.Module:
    """The base layer under a LoRA layer; any other module is its own base."""
    return module.base if isinstance(module, LoRALinear) else module


@per_layer
def linear_modules(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """Dotted path -> (path, module) of every linear layer, not descending into LoRA layers or the modules
    trained in full (`ModulesToSave`)."""
    return {k: v for k, v in modules(model, _LINEAR).items() if not isinstance(v[1], LoRAEmbedding)}


@per_layer
def embedding_modules(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
    """Dotted path -> (path, module) of every token embedding (``nnx.Embed`` or `LoRAEmbedding`)."""
    return modules(model, (nnx.Embed, LoRAEmbedding))


@per_layer
def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """Dotted path -> every LoRA layer in the model: `LoRALinear` (over any base), `LoRAEmbedding`."""
    return {name: m for name, (_, m) in modules(model, (LoRALinear,)).items()}


@per_layer
def saved_modules(model: nnx.Module) -> dict[str, ModulesToSave]:
    """Dotted path -> every `ModulesToSave` (a module trained in full) in the model."""
    return {name: m for name, (_, m) in modules(model, (ModulesToSave,)).items()}


def adapter_layers(model: nnx.Module) -> dict[str, LoRALinear | ModulesToSave]:
    """Every layer holding adapters: LoRA layers and modules trained in full (the same adapter methods)."""
    return lora_layers(model) | saved_modules(model)


@per_layer
def find_targets(model: nnx.Module, config: LoraConfig) -> list[Target]:
    """The layers `config` selects, each with its rank and alpha; ValueError if none or a rank is too big.
    Under ``ensure_weight_tying`` with LoRA on a tied model's embedding or head (`tied_lora`) the embedding
    is a target and the head comes last, ``tied_to`` the embedding."""
    targets = []
    linears = linear_modules(model)
    tie = tied_lora(model, config)
    # Embeddings are adapted when named, never by "all-linear" (PEFT's rule as well).
    embeddings = {} if config.target_modules == ALL_LINEAR else embedding_modules(model)
    for name, (path, module) in (linears | embeddings).items():
        if tie is not None and name == tie[1]:
            continue  # the tied head: after its embedding, below
        if not (config.targets(name, is_output_head=name == OUTPUT_HEAD) or tie is not None and name == tie[0]):
            continue
        r = config.r_for(name)  # may exceed min(in, out): PEFT accepts that too
        if name in embeddings and (config.use_dora or config.init_lora_weights not in (True, False, "gaussian")):
            why = "" if tie is None else f" (ensure_weight_tying puts the tied {tie[1]}'s LoRA on it)"
            raise ValueError(f"{name} is an embedding{why}: LoRA there takes init_lora_weights True, False or "
                             f"'gaussian' and no DoRA, as in PEFT (got {config.init_lora_weights!r}, "
                             f"use_dora={config.use_dora})")
        needs_dense = config.init_lora_weights in ("pissa", "loftq") or pissa_niter(config.init_lora_weights)
        if needs_dense and isinstance(base_of(module), TiedHead):
            raise ValueError(f"{name} is tied to the embedding: init_lora_weights={config.init_lora_weights!r} "
                             "would rewrite the shared matrix; use init_lora_weights True, False or 'gaussian'")
        if needs_dense and isinstance(base_of(module), QuantizedLinear):
            raise ValueError(f"{name}: init_lora_weights={config.init_lora_weights!r} needs the dense weight, but "
                             "this layer is already quantized; inject into the dense model and quantize with "
                             "jaxlora.qlora_linear")
        targets.append(Target(path, name, module, r, config.alpha_for(name)))
    if tie is not None:
        path, module = linears[tie[1]]
        targets.append(Target(path, tie[1], module, config.r_for(tie[0]), config.alpha_for(tie[1]), tied_to=tie[0]))
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


@per_layer
def tied_pair(model: nnx.Module) -> tuple[str, str] | None:
    """(embedding name, head name) of a model with tied embeddings -- a `TiedHead` reading an embedding's
    table, either of them possibly wrapped (a LoRA layer, a `ModulesToSave`) -- or None if nothing is tied."""
    found = {name: base_of(original_of(m)) for name, (_, m) in
             modules(model, (nnx.Embed, TiedHead, LoRALinear, ModulesToSave)).items()}
    heads = {name: m for name, m in found.items() if isinstance(m, TiedHead)}
    for embed_name, embed in found.items():
        if isinstance(embed, nnx.Embed):
            for head_name, head in heads.items():
                if head.embedding is embed.embedding:
                    return embed_name, head_name
    return None


def _names_tied_layer(target_modules: str | tuple[str, ...], pair: tuple[str, str]) -> bool:
    """PEFT's ``is_embedding_in_target``, decided from the names alone: a listed name ending in the embedding's
    or the head's last segment, or a regex full-matching that segment ("all-linear" names neither)."""
    ends = {name.rsplit(".", 1)[-1] for name in pair}
    if target_modules == ALL_LINEAR:
        return False
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, end) for end in ends)
    return any(name.rsplit(".", 1)[-1] in ends for name in target_modules)


@per_layer
def tied_lora(model: nnx.Module, config: LoraConfig) -> tuple[str, str] | None:
    """The (embedding, head) ``ensure_weight_tying`` ties with LoRA -- `config` names either of a tied model's
    pair in target_modules (and neither in modules_to_save, which ties copies instead: `tied_saved`) -- or
    None. Then, as PEFT's ``_add_targets_to_tie``, the embedding gets the LoRA (named or not) and the head a
    `jaxlora.adapter.TiedAdapter` reading it (`Target.tied_to`). ValueError if the embedding is excluded or
    rank_pattern / alpha_pattern give the two different ranks or scalings (one delta serves both)."""
    pair = tied_pair(model)
    if not config.ensure_weight_tying or pair is None or _ties_copies(config, pair) \
            or not _names_tied_layer(config.target_modules, pair):
        return None
    embed, head = pair
    trained_in_full = sorted(set(pair) & set(saved_modules(model)))
    if trained_in_full:
        raise ValueError(f"ensure_weight_tying=True would tie LoRA on {list(pair)}, but another adapter trains "
                         f"{trained_in_full} in full (modules_to_save); delete that adapter first")
    if config.excludes(embed):
        raise ValueError(f"ensure_weight_tying=True puts the tied {head}'s LoRA on {embed}, but exclude_modules="
                         f"{config.exclude_modules!r} excludes it")
    if config.r_for(embed) != config.r_for(head) or config.scaling_for(embed) != config.scaling_for(head):
        # One delta read both ways: merged once into the table, it must be the head's delta too.
        raise ValueError(f"ensure_weight_tying=True: the tied {embed} and {head} share one LoRA, but rank_pattern / "
                         f"alpha_pattern give them r={config.r_for(embed)}, lora_alpha={config.alpha_for(embed)} and "
                         f"r={config.r_for(head)}, lora_alpha={config.alpha_for(head)}; give them one rank and alpha")
    return pair


def _ties_copies(config: LoraConfig, pair: tuple[str, str] | None) -> bool:
    """Whether ``ensure_weight_tying`` ties trained copies (PEFT's ``modules_to_tie``): a tied `pair` and
    either of it in modules_to_save."""
    return config.ensure_weight_tying and pair is not None and any(config.saves(n) for n in pair)


def _tied_names(names: list[str], embed: str, head: str) -> list[str]:
    """`names` as PEFT rewrites them to tie (``_add_targets_to_tie``, ``_add_modules_to_save_to_tie``): the
    embedding's name added, and the first name that matches the head taken out (the tie handles it)."""
    names = list(names) if embed in names else [*names, embed]
    hit = next((n for n in names if re.match(rf"(^|.*\.){n}($|\..*)", head)), None)
    if hit is not None:
        names.remove(hit)  # its first occurrence, as PEFT's
    return names


@per_layer
def peft_target_modules(model: nnx.Module, config: LoraConfig) -> str | tuple[str, ...]:
    """`config`'s target_modules as PEFT holds (and saves) them after injecting it into `model`, which its
    ``save_embedding_layers="auto"`` reads: as given, but under a tied LoRA (`tied_lora`) rewritten to tie
    (`_tied_names`; a regex gets ``|^<embedding>$``)."""
    names, tie = config.target_modules, tied_lora(model, config)
    if tie is None or names == ALL_LINEAR:
        return names
    if isinstance(names, str):
        return rf"(?:{names}|^{re.escape(tie[0])}$)"
    return tuple(_tied_names(list(names), *tie))


@per_layer
def peft_modules_to_save(model: nnx.Module, config: LoraConfig) -> tuple[str, ...] | None:
    """`config`'s modules_to_save as PEFT saves them: as given, but rewritten to tie (`_tied_names`) where
    ``ensure_weight_tying`` ties the copies (``["lm_head"]`` becomes ``["model.embed_tokens"]``)."""
    pair = tied_pair(model)
    if not _ties_copies(config, pair):
        return config.modules_to_save
    return tuple(_tied_names(list(config.modules_to_save), *pair))


@per_layer
def tied_saved(model: nnx.Module, config: LoraConfig) -> tuple[str, str] | None:
    """The (embedding, head) names ``ensure_weight_tying`` ties: on a tied model whose embedding or head
    `config` names in modules_to_save, both are trained as one copy (`jaxlora.modules_to_save.trained_copies`);
    None otherwise. ValueError if either carries LoRA (from `config` or an adapter added before)."""
    pair = tied_pair(model)
    if not _ties_copies(config, pair):
        return None
    asked = sorted(set(pair) & {t.name for t in find_targets(model, config)})
    held = {name: sorted(layer.adapters) for name, layer in lora_layers(model).items() if name in pair}
    if asked or held:
        where = (f"target_modules puts LoRA on {asked} as well (drop it there, or tie the pair's LoRA instead: "
                 "without the pair in modules_to_save, ensure_weight_tying ties LoRA on it)" if asked else
                 f"{sorted(held)} carry LoRA of adapters {sorted({a for v in held.values() for a in v})} (delete "
                 "them first)")
        raise ValueError(f"ensure_weight_tying=True with {list(config.modules_to_save)} in modules_to_save trains "
                         f"the tied {list(pair)} in full, as one copy, but {where}")
    return pair


@per_layer
def find_saved_modules(model: nnx.Module, config: LoraConfig) -> dict[str, tuple[tuple, nnx.Module]]:
    """The modules `config.modules_to_save` names (path -> (path, module): an ``nnx.Linear``, ``nnx.Embed`` or
    `ModulesToSave` that gets one more copy); ValueError if a name matches nothing or a LoRA target.

    Under ``ensure_weight_tying``, naming a tied model's embedding or head saves both (`tied_saved`)."""
    if not config.modules_to_save:
        return {}
    every = modules(model, (*_LINEAR, nnx.Embed, ModulesToSave))
    found = {name: v for name, v in every.items() if config.saves(name)}
    pair = tied_saved(model, config)
    if pair is not None:
        found = {name: every[name] for name in pair} | found
    targeted = {t.name for t in find_targets(model, config)}
    for name, (_, module) in found.items():
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is quantized and cannot be trained in full (modules_to_save); keep it dense "
                             "with QuantConfig(skip_modules=...)")
        if isinstance(module, LoRALinear) or name in targeted:
            raise ValueError(f"{name} is both a LoRA target and in modules_to_save={list(config.modules_to_save)}; "
                             "choose one")
    missing = [n for n in config.modules_to_save if not any(path.endswith(n) for path in found)]
    if missing:
        raise ValueError(f"modules_to_save names {missing} match no module of the model")
    return found


def check_weight_tying(model: nnx.Module, config: LoraConfig, *, adapted: set[str]) -> tuple[str, str] | None:
    """PEFT's checks of ``ensure_weight_tying`` (tuners_utils ``_check_tied_modules``), as its warnings.
    `adapted`: the names `config` puts LoRA on (`find_targets`). Returns the pair whose trained copies to tie
    (`tied_saved`, which refuses LoRA on a pair trained in full)."""
    pair = tied_pair(model)
    if pair is None:
        if config.ensure_weight_tying:
            warnings.warn("ensure_weight_tying=True, but the model has no tied embeddings: nothing to tie",
                          UserWarning, stacklevel=4)
        return None
    in_adapter = set(pair) & adapted or any(config.saves(n) for n in pair)
    if not config.ensure_weight_tying:
        if in_adapter:
            warnings.warn(f"the model has tied embeddings ({pair[0]} and {pair[1]} share one matrix) and a tied "
                          "layer is part of the adapter, but ensure_weight_tying is not set to True: the two "
                          "layers are trained apart (as PEFT does; README 'Tied embeddings')", UserWarning,
                          stacklevel=4)
        return None
    if not in_adapter:
        warnings.warn(f"ensure_weight_tying=True, but neither {pair[0]} nor {pair[1]} is in modules_to_save or "
                      "target_modules: nothing to tie", UserWarning, stacklevel=4)
    return tied_saved(model, config)


@per_layer
def trained_biases(model: nnx.Module, config: LoraConfig, adapter_name: str) -> dict[str, nnx.Module]:
    """Dotted path -> base linear layer whose bias adapter `adapter_name` (configured by `config`) trains: every
    biased linear layer for bias="all", those it adapts for "lora_only" (PEFT's rule), none for "none"."""
    found = {}
    for name, (_, module) in linear_modules(model).items():
        adapted = isinstance(module, LoRALinear) and adapter_name in module.adapters
        if base_of(module).bias is not None and (config.bias == "all" or config.bias == "lora_only" and adapted):
            found[name] = base_of(module)
    return found


@per_layer
def sync_biases(model: nnx.Module, configs: Mapping[str, LoraConfig]) -> None:
    """Each base bias trains iff some adapter's config says so (derived from the configs, never kept)."""
    trained = {name for adapter, config in configs.items() for name in trained_biases(model, config, adapter)}
    for name, (_, module) in linear_modules(model).items():
        set_bias_trainable(base_of(module), name in trained)
