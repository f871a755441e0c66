"""`PeftModel`: PEFT's wrapper in NNX, the one owner of a model's adapter configs and of which adapter runs.

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=model.trainable)  # the active adapter moves

The user's model sits at ``base_model.model`` (PEFT's PeftModel -> LoraModel -> model), so every module path
is PEFT's state-dict name, ``base_model.model.model.layers.0.self_attn.q_proj``, and the adapter file's keys
are those paths (`jaxlora.peft_io`). `LoraConfig` module names are matched against the user model's own paths
(``model.layers.0.self_attn.q_proj``), as PEFT matches them (`jaxlora.targets`).

Layers hold only their own adapters. The wrapper passes the active adapter -- or none when disabled, or a
mixed batch's rows -- down every call (`jaxlora.mixed`); it keeps the configs and the active adapter as static
graph data, so a jitted function taking the wrapper compiles again when they change, as the program does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import os
from collections.abc import Iterator, Sequence

from flax import nnx

from jaxlora import peft_io, targets
from jaxlora.base import LinearBase
from jaxlora.embedding import LoRAEmbedding
from jaxlora.graph import replace_module, retype_variables
from jaxlora.layers import LoRALinear
from jaxlora.lora import CombinationType
from jaxlora.lora_config import LoraConfig
from jaxlora.mixed import BASE, Active, AdapterRows
from jaxlora.models.stack import per_layer, stochastic
from jaxlora.models.tied import sync_tie
from jaxlora.modules_to_save import ModulesToSave, trained_copies
from jaxlora.qlinear import QuantizedLinear

# The LoRA layer each kind of base gets: any LinearBase (QuantizedLinear, a tied head) a LoRALinear.
_LORA_LAYER = {nnx.Linear: LoRALinear, LinearBase: LoRALinear, nnx.Embed: LoRAEmbedding}


@dataclasses.dataclass(frozen=True)
class NotOwnedBy:
    """An nnx filter predicate: a variable none of the adapters `others` owns -- no ``adapters`` dict of a
    `LoRALinear` or `ModulesToSave` holds it under one of those names. Trained base biases belong to no
    adapter. Frozen, so filters built from it compare and hash by the names."""

    others: frozenset[str]

    def __call__(self, path: tuple, _) -> bool:
        return not any(key == "adapters" and path[i + 1] in self.others for i, key in enumerate(path[:-1]))


class LoraModel(nnx.Module):
    """PEFT's ``LoraModel``: holds the user's model at ``model`` (the ``base_model.model.`` of PEFT's names)."""

    def __init__(self, model: nnx.Module):
        self.model = model


class PeftModel(nnx.Module):
    """A model with named LoRA adapters, PEFT's ``PeftModel``: `get_peft_model` or `from_pretrained` build it.

    Calls go to the wrapped model with the active adapter selected: ``peft_model(input_ids, ...)`` returns
    what ``model(input_ids, ...)`` returns; ``adapter_names=[...]`` (or prebuilt ``adapter_rows``, which
    reuse one compiled program for every combination) runs one adapter per row, as PEFT's.
    """

    def __init__(self, model: nnx.Module, config: LoraConfig | None = None, adapter_name: str = "default", *,
                 rngs: nnx.Rngs | None = None):
        if isinstance(model, PeftModel):
            raise TypeError("model is already a PeftModel; add more adapters with its add_adapter")
        held = targets.adapter_layers(model)
        if held:  # one owner: another PeftModel holds these adapters
            raise ValueError(f"model already holds adapters (e.g. at {list(held)[:2]}): use the PeftModel that owns "
                             "them, or its unload() first")
        self.base_model = LoraModel(model)
        self._configs: tuple[tuple[str, LoraConfig], ...] = ()  # in the order added
        self.active_adapter: str | None = None
        self.disabled = False
        if config is not None:
            if rngs is None:
                raise TypeError("a new adapter draws its initial weights: pass rngs=nnx.Rngs(seed)")
            self.add_adapter(adapter_name, config, rngs=rngs)

    @classmethod
    def from_pretrained(cls, model: nnx.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                        rngs: nnx.Rngs | None = None) -> PeftModel:
        """PEFT's ``PeftModel.from_pretrained``: `model` with the adapter of a PEFT adapter directory, active."""
        peft = cls(model)
        peft.load_adapter(directory, adapter_name, rngs=rngs)
        return peft

    # --- what it holds ---------------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name -> its `LoraConfig`, in the order the adapters were added (a copy)."""
        return dict(self._configs)

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def trainable(self):
        """The nnx filter of what trains: the active adapter's ``nnx.LoRAParam`` variables (A, B, DoRA's
        magnitude, its trained copies) and the trained base biases -- what PEFT's ``set_adapter`` leaves with
        ``requires_grad``. ``nnx.Optimizer(model, tx, wrt=model.trainable)`` leaves the other adapters alone
        (no weight decay); the Trainer uses it. Built from the active adapter when read: after `set_adapter`,
        build the optimizer again. (Base biases are `nnx.LoRAParam` only where the active adapter trains
        them: `_sync_biases`.)"""
        return nnx.All(nnx.LoRAParam, NotOwnedBy(frozenset(self.peft_config) - {self.active_adapter}))

    @property
    def config(self):
        """The wrapped model's config (transformers' ``peft_model.config``)."""
        return self.base_model.model.config

    def get_base_model(self) -> nnx.Module:
        """The wrapped model, with its adapter layers in place (PEFT's ``get_base_model``)."""
        return self.base_model.model

    def _known(self, name: str) -> LoraConfig:
        configs = self.peft_config
        if name not in configs:
            raise ValueError(f"unknown adapter {name!r}; have {list(configs)}")
        return configs[name]

    # --- forward -----------------------------------------------------------------------------------------

    def _selection(self, adapter_names: Sequence[str] | None, adapter_rows: AdapterRows | None):
        if adapter_names is not None and adapter_rows is not None:
            raise ValueError("pass adapter_names or adapter_rows, not both")
        if self.disabled:  # PEFT: disabled adapters win over adapter_names
            return Active(None)
        if adapter_names is not None:
            return self.adapter_rows(adapter_names)
        return Active(self.active_adapter) if adapter_rows is None else adapter_rows

    def __call__(self, *args, adapter_names: Sequence[str] | None = None, adapter_rows: AdapterRows | None = None,
                 **kwargs):
        return self.base_model.model(*args, adapters=self._selection(adapter_names, adapter_rows), **kwargs)

    def hidden_states(self, *args, adapter_rows: AdapterRows | None = None, **kwargs):
        """The wrapped model's ``hidden_states`` (everything but the output head) with the adapters selected."""
        return self.base_model.model.hidden_states(*args, adapters=self._selection(None, adapter_rows), **kwargs)

    def logits(self, h, adapter_rows: AdapterRows | None = None):
        """The wrapped model's output head on hidden states `h`, with the adapters selected."""
        return self.base_model.model.logits(h, adapters=self._selection(None, adapter_rows))

    def init_cache(self, batch: int, slots: int):
        return self.base_model.model.init_cache(batch, slots)

    def adapter_rows(self, adapter_names: Sequence[str]) -> AdapterRows:
        """PEFT's ``adapter_names=[...]``: one adapter name per row of a batch, ``"__base__"`` for the base model
        alone, as rows for ``peft_model(input_ids, adapter_rows=...)``. Built outside jit, any combination of
        names reuses one compiled program.

        Refused as PEFT refuses: an unknown name, a DoRA adapter's name, merged adapters, dropout in train mode.
        """
        configs = self.peft_config
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names={adapter_names!r} must be a list of names, one per row of the batch")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in configs})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; have {list(configs)} (or {BASE!r})")
        dora = sorted({n for n in adapter_names if n in configs and configs[n].use_dora})
        if dora:
            raise ValueError(f"adapter_names names DoRA adapters {dora}: mixed-adapter batches do not support DoRA "
                             "(as PEFT)")
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged; unmerge them before passing adapter_names "
                             "(as PEFT)")
        if stochastic(self):
            raise ValueError("adapter_names is for inference, as in PEFT: the model's dropout is in train mode "
                             "(use model.eval() or jaxlora.generate.inference_view)")
        return AdapterRows.from_names(adapter_names, tuple(n for n, c in configs.items() if not c.use_dora))

    # --- adding, switching, removing -----------------------------------------------------------------------

    @per_layer
    def add_adapter(self, adapter_name: str, config: LoraConfig, *, rngs: nnx.Rngs) -> None:
        """Adds adapter `adapter_name` to the layers `config` selects; the first adapter becomes active, a
        further one does not (PEFT). The model is changed only once every layer's adapter is built: an
        error leaves it as it was."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a jaxlora LoraConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE:
            raise ValueError(f"adapter_name={adapter_name!r}: give a non-empty name other than {BASE!r} (the base "
                             "model's name in adapter_names)")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; have {list(self.peft_config)}")
        model = self.base_model.model
        found = targets.find_targets(model, config)
        tie = targets.check_weight_tying(model, config, adapted={t.name for t in found})
        saved = targets.find_saved_modules(model, config)
        copies = trained_copies({name: module for name, (_, module) in saved.items()}, tie)
        new_layers, grown, built = [], [], {}
        try:
            for t in found:  # a tied head after its embedding (targets.find_targets): it reads that adapter
                kw = dict(r=t.r, lora_alpha=t.lora_alpha, lora_dropout=config.lora_dropout,
                          use_rslora=config.use_rslora, use_dora=config.use_dora,
                          init_lora_weights=config.init_lora_weights,
                          loftq_iter=config.loftq_config.get("loftq_iter", 1),
                          tied=None if t.tied_to is None else built[t.tied_to], rngs=rngs)
                if isinstance(t.module, LoRALinear):
                    grown.append((t.module, t.module.base))  # PiSSA / LoftQ give the layer a new base
                    built[t.name] = t.module.add_adapter(adapter_name, **kw)
                else:  # built beside the model (its own copy of the base), put in place below
                    layer = next(c for base, c in _LORA_LAYER.items() if isinstance(t.module, base))
                    new_layers.append((t.path, layer(t.module, adapter_name=adapter_name, **kw)))
                    built[t.name] = new_layers[-1][1].adapters[adapter_name]
        except Exception:
            for layer, base in grown:
                if adapter_name in layer.adapters:
                    layer.delete_adapter(adapter_name)
                layer.base = base
            raise
        for path, layer in new_layers:
            replace_module(model, path, layer)
        for name, (path, module) in saved.items():
            if isinstance(module, ModulesToSave):
                module.add_adapter(adapter_name, copies[name])
            else:
                replace_module(model, path, ModulesToSave(module, adapter_name, copies[name]))
        self._configs = (*self._configs, (adapter_name, config))
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._sync_biases()

    def _sync_biases(self) -> None:
        """Each base bias trains iff the active adapter's config says so (PEFT marks them trainable by the
        active adapter's ``bias``); another adapter's biases are saved from the same base, frozen meanwhile."""
        active = {n: c for n, c in self.peft_config.items() if n == self.active_adapter}
        targets.sync_biases(self.base_model.model, active)

    def set_adapter(self, adapter_name: str) -> None:
        """Makes `adapter_name` the adapter that runs (layers without it run their base)."""
        self._known(adapter_name)
        merged = self.merged_adapters
        if merged and adapter_name not in merged:
            raise ValueError(f"adapters {merged} are merged; unmerge_adapter() before switching")
        self.active_adapter = adapter_name
        self._sync_biases()

    @per_layer
    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter; a layer left without adapters goes back to its base. If it was active, the first
        remaining adapter becomes active (PEFT's rule)."""
        self._known(adapter_name)
        model = self.base_model.model
        for path, layer in targets.modules(model, (LoRALinear,)).values():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
                if not layer.adapters:
                    replace_module(model, path, layer.unload())
        for path, wrapper in targets.modules(model, (ModulesToSave,)).values():
            if adapter_name in wrapper.adapters:
                wrapper.delete_adapter(adapter_name)
                if not wrapper.adapters:
                    replace_module(model, path, wrapper.original)
        self._configs = tuple((n, c) for n, c in self._configs if n != adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._sync_biases()

    @per_layer
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: CombinationType = "svd", svd_rank: int | None = None) -> None:
        """PEFT's ``add_weighted_adapter``: a new adapter on the union of the sources' layers, combined per layer
        ("linear", "svd" or "cat", see `jaxlora.lora`), with scale 1 (lora_alpha = r). Not activated. With
        "cat" a layer's rank is the sum of the ranks present there (PEFT pads to the global sum with zero
        columns of B: the same delta)."""
        configs = self.peft_config
        unknown = [a for a in adapters if a not in configs]
        if unknown or not adapters:
            raise ValueError(f"unknown adapters {unknown or adapters!r}; have {list(configs)}")
        if len(weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        if adapter_name in configs:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if any(configs[a].use_dora for a in adapters):
            raise ValueError("DoRA adapters cannot be combined (their magnitude has no weighted sum)")
        layers = targets.lora_layers(self.base_model.model)
        tied = sorted({a for layer in layers.values() for a in adapters
                       if a in layer.adapters and layer.adapters[a].shares_delta})
        if tied:  # checked before any layer changes
            raise ValueError(f"adapters {tied} tie a head's LoRA to the embedding's (ensure_weight_tying): combining "
                             "them is not supported (the combination would train and merge the two apart)")
        ranks = {}
        for name, layer in layers.items():
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
            if present:
                layer.add_weighted_adapter([a for a, _ in present], [w for _, w in present], adapter_name,
                                           combination_type=combination_type, svd_rank=svd_rank)
                ranks[name] = layer.adapters[adapter_name].r
        r = max(ranks.values())
        pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
        config = dataclasses.replace(
            configs[adapters[0]], r=r, lora_alpha=r, target_modules=tuple(ranks), exclude_modules=None,
            rank_pattern=pattern, alpha_pattern=pattern, use_rslora=False, lora_dropout=0.0, init_lora_weights=True,
            loftq_config={}, modules_to_save=None,  # a combined adapter has LoRA weights only (no trained copies)
        )
        self._configs = (*self._configs, (adapter_name, config))

    # --- disabling -----------------------------------------------------------------------------------------

    def disable_adapter_layers(self) -> None:
        """The base model alone until `enable_adapter_layers`. Merged adapters are unmerged first, as PEFT does."""
        if self.merged_adapters:
            self.unmerge_adapter()
        self.disabled = True

    def enable_adapter_layers(self) -> None:
        self.disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[PeftModel]:
        """PEFT's ``with model.disable_adapter():`` -- the base model alone inside the block."""
        self.disable_adapter_layers()
        try:
            yield self
        finally:
            self.enable_adapter_layers()

    # --- merging -------------------------------------------------------------------------------------------

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into base weights now (PEFT's ``merged_adapters``). The stacked layers are LoRA
        layers too (with stacked arrays): their static state reads without unstacking."""
        return sorted({n for _, m in nnx.iter_graph(self) if isinstance(m, LoRALinear) for n in m.merged_adapters})

    @per_layer
    def merge_adapter(self) -> None:
        """Folds the active adapter into each base weight it adapts (PEFT's ``merge_adapter``); the model then
        runs the merged weights. A quantized base is re-quantized (`LoRALinear.merge`)."""
        if self.active_adapter is None or self.merged_adapters:
            raise ValueError(f"nothing to merge: active adapter {self.active_adapter!r}, merged {self.merged_adapters}")
        for layer in targets.lora_layers(self.base_model.model).values():
            if self.active_adapter in layer.adapters:
                layer.merge(self.active_adapter)

    @per_layer
    def unmerge_adapter(self) -> None:
        for layer in targets.lora_layers(self.base_model.model).values():
            if layer.merged_adapters:
                layer.unmerge()

    @per_layer
    def _strip(self, merge: bool, requantize: bool) -> nnx.Module:
        model, active = self.base_model.model, self.active_adapter
        for path, layer in targets.modules(model, (LoRALinear,)).values():
            if merge and (layer.merged_adapters or active in layer.adapters):
                base = layer.merge_and_unload(layer.merged_adapters[0] if layer.merged_adapters else active,
                                              requantize=requantize)
            else:
                base = layer.unload()
            replace_module(model, path, base)
        kept = []
        for path, wrapper in targets.modules(model, (ModulesToSave,)).values():  # PEFT keeps the active copy
            kept.append(wrapper.unload(active))
            replace_module(model, path, kept[-1])
        # The kept copies are frozen again, every reference at once: under ensure_weight_tying the embedding's
        # copy and the head's share one table. A head left over a table no embedding holds is untied.
        retype_variables(model, nnx.LoRAParam, nnx.Param, within=kept)
        sync_tie(model)
        self._configs, self.active_adapter = (), None
        targets.sync_biases(model, {})  # no adapters left: every bias is frozen again
        return model

    def merge_and_unload(self, *, requantize: bool = False) -> nnx.Module:
        """The plain model with the active adapter folded into each layer, in place; `save_pretrained` writes it
        as an HF checkpoint. A dense base is merged exactly (W + s A B in float32, cast to W's dtype). A
        quantized base becomes an ``nnx.Linear`` holding dequantize(W) + delta in W's original dtype -- no new
        quantization error; ``requantize=True`` re-quantizes instead, as PEFT's bnb merge does (adds a fresh NF4
        error). The wrapper is left without adapters."""
        return self._strip(merge=True, requantize=requantize)

    def unload(self) -> nnx.Module:
        """The base model again, adapters dropped (nothing merged); the wrapper is left without adapters."""
        return self._strip(merge=False, requantize=False)

    # --- files ---------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None) -> None:
        """PEFT's ``save_pretrained``: each adapter (default: all) as a PEFT adapter directory -- "default" in
        `directory` itself, any other in ``directory/<name>``."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._known(name)
        for name in names:
            peft_io.save_adapter(self, directory if name == "default" else os.path.join(directory, name),
                                 adapter_name=name)

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", *,
                     rngs: nnx.Rngs | None = None) -> None:
        """PEFT's ``load_adapter``: adds the adapter of a PEFT adapter directory, checked against the model
        before the model is touched; it becomes active only if it is the first (use `set_adapter`)."""
        peft_io.load_adapter(self, directory, adapter_name=adapter_name, rngs=rngs)

    def _register(self, adapter_name: str, config: LoraConfig) -> None:
        """Record the config `adapter_name` was loaded with (`jaxlora.peft_io`: the file's, not the injected)."""
        self._configs = tuple((n, config if n == adapter_name else c) for n, c in self._configs)

    # --- counting ------------------------------------------------------------------------------------------

    @per_layer  # a stacked QuantizedLinear's packed weight has no per-layer (out * in) shape to count
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all). Trainable = the elements of `trainable` (the active adapter's A, B, DoRA magnitude
        and trained copies, and the trained biases), as PEFT counts ``requires_grad``. All = every ``nnx.Param``
        (every adapter's too) plus each quantized layer's bias and its weight counted as out * in elements --
        PEFT's convention for bitsandbytes 4-bit (packed bytes x 2); absmax and other quantization state are
        not counted, as in PEFT."""
        count = lambda state: sum(math.prod(x.shape) for x in nnx.to_flat_state(state).leaves)  # noqa: E731
        trainable = count(nnx.state(self, self.trainable))
        total = count(nnx.state(self, nnx.Param))
        for _, module in nnx.iter_graph(self):
            if isinstance(module, QuantizedLinear):
                total += math.prod(module.weight.get_value().shape)
                if module.bias is not None and not isinstance(module.bias, nnx.Param):  # a trained bias is counted
                    total += math.prod(module.bias.get_value().shape)
        return trainable, total

    def print_trainable_parameters(self) -> tuple[int, int]:
        """Prints PEFT's line and returns (trainable, all), see `get_nb_trainable_parameters`."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
        return trainable, total


def get_peft_model(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, adapter_name: str = "default"
                   ) -> PeftModel:
    """PEFT's ``get_peft_model``: wraps `model` in a `PeftModel` with adapter `adapter_name`, active. Each targeted
    ``nnx.Linear`` or `QuantizedLinear` becomes a `LoRALinear` over it (an ``nnx.Embed`` a `LoRAEmbedding`), in
    place."""
    if isinstance(model, PeftModel):
        raise ValueError(f"model already has adapters {list(model.peft_config)}; use its add_adapter")
    return PeftModel(model, config, adapter_name, rngs=rngs)


def load_adapter(model: nnx.Module, directory: str | os.PathLike, *, adapter_name: str = "default",
                 rngs: nnx.Rngs | None = None) -> PeftModel:
    """The adapter of a PEFT adapter directory on `model`: added to a `PeftModel`, or on a plain model a new
    `PeftModel` with it active (`PeftModel.from_pretrained`). Returns the `PeftModel`."""
    if isinstance(model, PeftModel):
        model.load_adapter(directory, adapter_name, rngs=rngs)
        return model
    return PeftModel.from_pretrained(model, directory, adapter_name, rngs=rngs)


def _peft(model) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a jaxlora.PeftModel (what get_peft_model returns), got {type(model).__name__}")
    return model


# Functional forms of the methods, the names of jaxlora before PeftModel (each takes the PeftModel).

def add_adapter(model: PeftModel, adapter_name: str, config: LoraConfig, *, rngs: nnx.Rngs) -> PeftModel:
    _peft(model).add_adapter(adapter_name, config, rngs=rngs)
    return model


def set_adapter(model: PeftModel, adapter_name: str) -> None:
    _peft(model).set_adapter(adapter_name)


def delete_adapter(model: PeftModel, adapter_name: str) -> None:
    _peft(model).delete_adapter(adapter_name)


def add_weighted_adapter(model: PeftModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: CombinationType = "svd", svd_rank: int | None = None) -> None:
    _peft(model).add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank)


def adapter_rows(model: PeftModel, adapter_names: Sequence[str]) -> AdapterRows:
    return _peft(model).adapter_rows(adapter_names)


def merge_and_unload(model: PeftModel, *, requantize: bool = False) -> nnx.Module:
    return _peft(model).merge_and_unload(requantize=requantize)


def unload(model: PeftModel) -> nnx.Module:
    return _peft(model).unload()


def print_trainable_parameters(model: PeftModel) -> tuple[int, int]:
    return _peft(model).print_trainable_parameters()


def save_adapter(model: PeftModel, directory: str | os.PathLike, *, adapter_name: str | None = None):
    """One adapter (default: the active one) as a PEFT adapter directory (`jaxlora.peft_io.save_adapter`)."""
    return peft_io.save_adapter(_peft(model), directory, adapter_name=adapter_name)
