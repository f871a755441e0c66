"""`ModulesToSave`: PEFT's ``modules_to_save`` -- a module trained in full, one copy per adapter.

As PEFT's ``ModulesToSaveWrapper``: the original module stays frozen, each adapter owns a full copy whose
parameters are ``nnx.LoRAParam`` (so ``wrt=nnx.LoRAParam`` trains them), and the active adapter's copy
runs; with adapters disabled, or an active adapter that has no copy here, the original runs. The copy is
written to the adapter file under the module's own transformers names (``lm_head.weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.graph import replace_module
from jaxlora.mixed import AdapterRows, where_rows

# The modules a copy can be made of, and their transformers tensors: name -> (variable, transposed).
_TENSORS = {nnx.Linear: {"weight": ("kernel", True), "bias": ("bias", False)},
            nnx.Embed: {"weight": ("embedding", False)}}


def _retype(module: nnx.Module, old: type, new: type) -> nnx.Module:
    """`module` with every variable of exactly type `old` replaced by one of type `new` (values kept)."""
    for path, node in list(nnx.iter_graph(module)):
        if type(node) is old:
            replace_module(module, tuple(path), new(node.get_value()))
    return module


def module_tensors(module: nnx.Module) -> dict[str, jax.Array]:
    """An ``nnx.Linear`` / ``nnx.Embed`` as transformers tensors: ``{"weight": (out, in)[, "bias": (out,)]}``
    of a linear layer, ``{"weight": (vocab, hidden)}`` of an embedding."""
    out = {}
    for key, (attr, transposed) in _TENSORS[type(module)].items():
        var = getattr(module, attr)
        if var is not None:
            out[key] = var.get_value().T if transposed else var.get_value()
    return out


class ModulesToSave(nnx.Module):
    """A frozen `original` (``nnx.Linear`` or ``nnx.Embed``) and per-adapter trained copies, in ``adapters``.
    Its adapter methods are `jaxlora.layers.LoRALinear`'s, so the model-level operations treat both alike."""

    def __init__(self, original: nnx.Module, adapter_name: str):
        if type(original) not in _TENSORS:
            raise ValueError(f"modules_to_save takes nnx.Linear or nnx.Embed modules, got {type(original).__name__} "
                             "(a quantized layer cannot be trained in full: keep it dense with QuantConfig's "
                             "skip_modules)")
        self.original = original
        self.adapters = nnx.Dict()
        self.active_adapter: str | None = adapter_name
        self.disabled = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        self.adapters[name] = _retype(nnx.clone(self.original), nnx.Param, nnx.LoRAParam)

    def set_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; have {sorted(self.adapters)}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def disable_adapter_layers(self) -> None:
        self.disabled = True

    def enable_adapter_layers(self) -> None:
        self.disabled = False

    def module(self) -> nnx.Module:
        """The module that runs now: the active adapter's copy, else the original."""
        if self.disabled or self.active_adapter is None:
            return self.original
        return self.adapters[self.active_adapter]

    routes_adapter_rows = True  # jaxlora.mixed.call passes it a mixed batch's rows

    def __call__(self, x: jax.Array, rows: AdapterRows | None = None) -> jax.Array:
        """The running module's output; with `rows` (a mixed batch) each row gets its adapter's copy, and the
        original where the row names the base or an adapter without a copy here (PEFT's _mixed_batch_forward)."""
        if rows is None:
            return self.module()(x)
        out = self.original(x)
        if self.disabled or self.active_adapter is None:  # PEFT: then the original runs for every row
            return out
        for name, copy in self.adapters.items():
            mask = rows.mask(name)
            if mask is not None:
                out = where_rows(mask, copy(x), out)
        return out

    def unload(self) -> nnx.Module:
        """What PEFT's unload and merge_and_unload leave: the active copy (frozen again), else the original."""
        if self.active_adapter is None:
            return self.original
        return _retype(self.adapters[self.active_adapter], nnx.LoRAParam, nnx.Param)

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
        for key, (attr, transposed) in _TENSORS[type(self.original)].items():
            if key in tensors:
                if tuple(tensors[key].shape) != expected[key]:
                    raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {expected[key]}")
                var, value = getattr(copy, attr), jnp.asarray(tensors[key])
                var.set_value((value.T if transposed else value).astype(var.get_value().dtype))
