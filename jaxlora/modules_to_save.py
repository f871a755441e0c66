"""`ModulesToSave`: PEFT's ``modules_to_save`` -- a module trained in full, one copy per adapter.

As PEFT's ``ModulesToSaveWrapper``: the original module stays frozen, each adapter owns a full copy whose
parameters are ``nnx.LoRAParam`` (so ``wrt=nnx.LoRAParam`` trains them), and the selected adapter's copy
runs (the selection comes with each call, `jaxlora.mixed`); with adapters disabled, or a selected adapter
that has no copy here, the original runs. The copy is
written to the adapter file under the module's own transformers names (``lm_head.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.graph import retype_variables
from jaxlora.mixed import AdapterRows, Selection, only, where_rows
from jaxlora.models.tied import TiedHead

# The modules a copy can be made of, and their transformers tensors: name -> (variable, transposed). A tied
# head's weight is the embedding's table (vocab, hidden), transformers' lm_head.weight layout.
_TENSORS = {nnx.Linear: {"weight": ("kernel", True), "bias": ("bias", False)},
            nnx.Embed: {"weight": ("embedding", False)},
            TiedHead: {"weight": ("embedding", False)}}


def original_of(module: nnx.Module) -> nnx.Module:
    """The module a `ModulesToSave` trains copies of; any other module is its own."""
    return module.original if isinstance(module, ModulesToSave) else module


def trained_copies(saved: dict[str, nnx.Module], tie: tuple[str, str] | None = None) -> dict[str, nnx.Module]:
    """Name -> a new trained copy of each module of `saved` (name -> module or its `ModulesToSave`), built
    beside the model, which is not changed. `tie` (embedding name, head name), under ``ensure_weight_tying``:
    the head's copy is a `TiedHead` over the embedding's copy, so both train one table (PEFT's
    ``modules_to_tie``)."""
    copies = {name: _trainable_copy(original_of(m)) for name, m in saved.items() if tie is None or name != tie[1]}
    if tie is not None:
        copies[tie[1]] = TiedHead(copies[tie[0]])
    return copies


def _trainable_copy(original: nnx.Module) -> nnx.Module:
    """A copy of `original` whose parameters are ``nnx.LoRAParam``. Of a tied head, the untied ``nnx.Linear``
    PEFT trains there (its copy of the shared matrix): the embedding keeps the original table."""
    # arrays=True: the copy owns its buffers. A clone sharing the original's arrays would hand the train step
    # one buffer twice (the frozen original and the trained copy), which a donating step refuses.
    copy = original.untied() if isinstance(original, TiedHead) else nnx.clone(original, arrays=True)
    retype_variables(copy, nnx.Param, nnx.LoRAParam)
    return copy


def module_tensors(module: nnx.Module) -> dict[str, jax.Array]:
    """An ``nnx.Linear`` / ``nnx.Embed`` / tied head as transformers tensors: ``{"weight": (out, in)[, "bias":
    (out,)]}`` of a linear layer, ``{"weight": (vocab, hidden)}`` of an embedding or a tied head."""
    out = {}
    for key, (attr, transposed) in _TENSORS[type(module)].items():
        var = getattr(module, attr)
        if var is not None:
            out[key] = var.get_value().T if transposed else var.get_value()
    return out


class ModulesToSave(nnx.Module):
    """A frozen `original` (``nnx.Linear``, ``nnx.Embed`` or a tied head) and per-adapter trained copies, in
    ``adapters`` (of a tied head: untied ``nnx.Linear`` layers, so unloading one unties the model, as PEFT;
    under ``ensure_weight_tying`` a `TiedHead` over the embedding's copy, `trained_copies`).
    Its adapter methods are `jaxlora.layers.LoRALinear`'s, so the model-level operations treat both alike."""

    def __init__(self, original: nnx.Module, adapter_name: str, copy: nnx.Module | None = None):
        if type(original) not in _TENSORS:
            raise ValueError(f"modules_to_save takes nnx.Linear, nnx.Embed or tied-head modules, got "
                             f"{type(original).__name__} (a quantized layer cannot be trained in full: keep it "
                             "dense with QuantConfig's skip_modules)")
        self.original = original
        self.adapters = nnx.Dict()
        self.add_adapter(adapter_name, copy)

    def add_adapter(self, name: str, copy: nnx.Module | None = None) -> None:
        """Adds adapter `name`'s trained copy: `copy` if given (`trained_copies`), else a fresh copy of the
        original."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        self.adapters[name] = _trainable_copy(self.original) if copy is None else copy

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]

    def module(self, name: str | None) -> nnx.Module:
        """The module adapter `name` runs: its copy, else (no copy here, or None) the original."""
        return self.adapters[name] if name is not None and name in self.adapters else self.original

    selects_adapters = True  # jaxlora.mixed.call passes it the selection

    def __call__(self, x: jax.Array, adapters: Selection = None) -> jax.Array:
        """The selected copy's output (None: the only copy); with `AdapterRows` (a mixed batch) each row gets
        its adapter's copy, and the original where the row names the base or an adapter without a copy here
        (PEFT's _mixed_batch_forward)."""
        if not isinstance(adapters, AdapterRows):
            return self.module(only(self.adapters) if adapters is None else adapters.name)(x)
        rows = adapters
        out = self.original(x)
        for name, copy in self.adapters.items():
            mask = rows.mask(name)
            if mask is not None:
                out = where_rows(mask, copy(x), out)
        return out

    def unload(self, name: str | None) -> nnx.Module:
        """What PEFT's unload and merge_and_unload leave: adapter `name`'s copy, else the original (no copy
        here, or None). The copy's parameters are still ``nnx.LoRAParam``: the caller freezes them across the
        whole model (`jaxlora.graph.retype_variables`), since a tied head may share them."""
        if name is None or name not in self.adapters:
            return self.original
        return self.adapters[name]

    # --- PEFT layout ----------------------------------------------------------------------------------

    def peft_state(self, name: str) -> dict[str, jax.Array]:
        """Adapter `name`'s copy as transformers tensors: ``{"weight": (out, in)[, "bias": (out,)]}`` of a
        linear layer, ``{"weight": (vocab, hidden)}`` of an embedding."""
        return module_tensors(self.adapters[name])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in module_tensors(self.original).items()}

    def load_peft_state(self, tensors: dict[str, jax.Array], name: str) -> None:
        copy = self.adapters[name]
        expected = self.shapes()
        if set(tensors) != set(expected):
            raise ValueError(f"modules_to_save tensors {sorted(tensors)} do not match the expected {sorted(expected)}")
        for key, (attr, transposed) in _TENSORS[type(copy)].items():
            if key in tensors:
                if tuple(tensors[key].shape) != expected[key]:
                    raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {expected[key]}")
                var, value = getattr(copy, attr), jnp.asarray(tensors[key])
                var.set_value((value.T if transposed else value).astype(var.get_value().dtype))
