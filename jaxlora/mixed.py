"""Which adapter runs: `Active` (one adapter, or none, for the whole batch) or `AdapterRows` (PEFT's
``model(x, adapter_names=[...])``: each row runs its own adapter, or the base).

The selection is an argument of the model call, never state on a layer: `jaxlora.PeftModel` owns the active
adapter and passes it down to every adapter layer, through the scanned decoder layers too. A layer holds
only its own adapters.

For a mixed batch the names become `AdapterRows` outside jit: a per-row index (an array, so another combination of names
reuses the compiled program) into the names of all the model's adapters (static: fixed while the model's
adapters are). The rows travel as an argument of the model call down to every adapter layer -- through the
scanned decoder layers too -- never as state on a module. A layer adds each of its adapters' delta to the
rows that name it, so a batch costs one delta per adapter of the layer for every row (PEFT gathers
sub-batches, a data-dependent shape that jit cannot have); LoRA deltas are small next to the base matmul.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BASE = "__base__"  # PEFT's name for "this row runs the base model only"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Active:
    """Every row runs adapter `name` (a layer without it runs its base); None: the base alone (adapters
    disabled). Static, no array leaves: it passes through jit and scan as part of the program."""

    name: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    def check_batch(self, batch: int) -> None:
        del batch  # one adapter serves any batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterRows:
    """Which adapter each row of a batch runs: ``names[index[i]]``, or the base where ``index[i] == -1``."""

    index: jax.Array  # (batch,) int32
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))  # every adapter of the model

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], names: Sequence[str]) -> AdapterRows:
        """Rows naming adapters of `names` (or `BASE`); ValueError naming any unknown name."""
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names={adapter_names!r} must be a list of names, one per row of the batch")
        names = tuple(names)
        unknown = sorted({n for n in adapter_names if n != BASE and n not in names})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; have {list(names)} (or {BASE!r})")
        index = [-1 if n == BASE else names.index(n) for n in adapter_names]
        return cls(jnp.asarray(np.asarray(index, np.int32).reshape(len(index))), names)

    def __len__(self) -> int:
        return self.index.shape[0]

    def mask(self, name: str) -> jax.Array | None:
        """(batch,) bool: the rows that run adapter `name`; None for a name the model does not have."""
        if name not in self.names:
            return None
        return self.index == self.names.index(name)

    def check_batch(self, batch: int) -> None:
        if len(self) != batch:
            raise ValueError(f"adapter_names has {len(self)} names for a batch of {batch} rows; give one per row")


def only(names: Sequence[str]) -> str:
    """The one adapter a layer holds: what it runs, merges and saves when no name is given (a layer used on
    its own); ValueError when it holds several, since only its owner knows which one runs."""
    names = list(names)
    if len(names) != 1:
        raise ValueError(f"this layer holds adapters {names}; name the one to use (a jaxlora.PeftModel passes its "
                         "active adapter)")
    return names[0]


def where_rows(mask: jax.Array, on: jax.Array, off: jax.Array) -> jax.Array:
    """`on` in the rows of `mask` (batch,), `off` elsewhere; both (batch, ...)."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (on.ndim - 1)), on, off)


# What a model passes its layers: one adapter for the batch, one per row, or None -- a layer's only adapter
# (a layer used on its own, outside a `jaxlora.PeftModel`).
Selection = Active | AdapterRows | None


def call(module, x: jax.Array, adapters: Selection) -> jax.Array:
    """``module(x)``, passing the selection to a module that holds adapters (one with ``selects_adapters``).

    Models call their layers through this, so the same model code runs plain layers, quantized layers and
    adapter layers without knowing which it holds."""
    if adapters is None or not getattr(module, "selects_adapters", False):
        return module(x)
    return module(x, adapters)
