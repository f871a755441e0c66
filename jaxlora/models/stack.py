"""Decoder layers stored stacked and run with `jax.lax.scan`: one layer's program, one layer's weights live.

A Python loop over 32 decoder layers lets XLA schedule every layer's dequantization early and keep all 32
dense copies alive, and compiles 32 copies of the layer. `LayerStack` stores consecutive layers of one
structure (a *run*) as a single layer module whose every array carries a leading layer axis, and runs each
run as one scan (MaxText's scanned layers, levanter's ``Stacked``). Layers whose structure differs (a
Mistral full-attention layer among sliding ones, an adapter of another rank from ``rank_pattern``, a layer
without an adapter) start a new run, so any model still scans in as few runs as its structure allows.

Users and file formats see per-layer names: ``model.layers[3]`` is a read-only view of layer 3, and the
checkpoint, quantization and adapter code edits layers inside `unstacked(model)`, which swaps each stack for
an ``nnx.List`` of per-layer modules (host views of the stacked arrays, no copies on the CPU) and stacks them
again on exit, reusing every stacked array whose layers were left untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.graph import replace_module
from jaxlora.models import scan

# Gradient checkpointing of each decoder layer:
#   "none"     autodiff keeps whatever the backward needs (fastest, most memory);
#   "full"     keep only each layer's input (the layer boundary, 2 bytes per bf16 activation) and recompute
#              the layer in the backward: transformers' gradient_checkpointing (`scan.remat_scan`);
#   "dots"     jax.checkpoint saving every matmul output (less recompute, more memory);
#   "offload"  "full" with the layer boundaries in pinned host memory instead of device memory;
#   "nested"   keep only every k-th layer boundary, k ≈ √layers (levanter's nested remat): a group's backward
#              first re-runs its first k - 1 layers for their inputs, so √layers boundaries are kept at
#              once instead of all of them, for up to one more forward pass of each layer.
RematPolicy = Literal["none", "full", "dots", "offload", "nested"]
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots", "offload", "nested")


def nested_group(layers: int) -> int:
    """Layers per group under remat "nested": about √layers, which keeps the fewest boundaries at once
    (layers / k kept between groups, k inside one)."""
    return max(1, round(layers ** 0.5))


def remat_policy(remat: bool | str) -> str:
    """`remat` as a policy name: True is "full", False "none" (the model's former boolean)."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {REMAT_POLICIES} (or True / False)")
    return remat


def _signature(layer: nnx.Module):
    graphdef, state = nnx.split(layer)
    return graphdef, jax.tree.structure(state)


def _stack_leaves(leaves: Sequence):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return jnp.stack([jnp.asarray(x) for x in leaves])


def _stack(layers: Sequence[nnx.Module], views: dict[int, tuple] | None = None) -> nnx.Module:
    """One module whose arrays are the layers' arrays stacked on a new leading axis. An array whose
    layers are all untouched views of one stacked array covering exactly these layers is reused whole."""
    graphdef = nnx.graphdef(layers[0])
    states = [nnx.state(layer) for layer in layers]
    flat = [jax.tree.leaves(s) for s in states]
    treedef = jax.tree.structure(states[0])
    out = []
    for position in range(len(flat[0])):
        leaves = [f[position] for f in flat]
        origin = [(views or {}).get(id(x)) for x in leaves]
        reuse = origin[0] is not None and all(
            o is not None and o[0] is origin[0][0] and o[1] == i and o[2] is x
            for i, (o, x) in enumerate(zip(origin, leaves)))
        if reuse and origin[0][0].shape[0] == len(leaves):
            out.append(origin[0][0])
            continue
        stacked = _stack_leaves(leaves)
        if isinstance(stacked, np.ndarray) and any(o is not None and not isinstance(o[0], np.ndarray) for o in origin):
            stacked = jnp.asarray(stacked)  # host views of device arrays go back to the device
        out.append(stacked)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, out))


def _slice(x, i: int, host: dict | None):
    """Layer i of a stacked array: a numpy view when `host` (a cache of host copies, one per array)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    if isinstance(x, np.ndarray):
        return x[i]  # a view: loading writes into it in place
    keys = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # typed RNG keys have no numpy form
    if host is not None and not keys and not isinstance(x, jax.core.Tracer):
        if id(x) not in host:  # on the CPU a view of the device buffer; on a GPU one host copy per array
            host[id(x)] = np.asarray(x)
        return host[id(x)][i]
    return x[i]


class LayerStack(nnx.Module):
    """Decoder layers as runs of stacked layers; ``stack(x, ...)`` runs them all in order with scans.

    ``len(stack)``, ``stack[i]`` (a read-only per-layer view: edits to it are lost, use `unstacked`) and
    iteration give the per-layer picture."""

    def __init__(self, layers: Sequence[nnx.Module], *, views: dict[int, tuple] | None = None):
        if not layers:
            raise ValueError("a LayerStack needs at least one layer")
        runs: list[list[nnx.Module]] = []
        last = None
        for layer in layers:
            sig = _signature(layer)
            if runs and sig == last:
                runs[-1].append(layer)
            else:
                runs.append([layer])
            last = sig
        self.sizes: tuple[int, ...] = tuple(len(r) for r in runs)
        self.runs = nnx.List([_stack(r, views) for r in runs])

    def __len__(self) -> int:
        return sum(self.sizes)

    def adopt(self, other: LayerStack) -> None:
        """Take `other`'s layers, in place: where the structure is unchanged the same run modules get the
        new values, so whoever holds this stack or its runs (a cached jitted step) sees them."""
        same = other.sizes == self.sizes and all(
            nnx.graphdef(a) == nnx.graphdef(b) for a, b in zip(self.runs, other.runs))
        if same:
            for mine, theirs in zip(self.runs, other.runs):
                nnx.update(mine, nnx.state(theirs))
        else:
            self.sizes, self.runs = other.sizes, other.runs

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"layer {i} out of range for {len(self)} layers")
        i %= len(self)
        for r, n in enumerate(self.sizes):
            if i < n:
                return r, i
            i -= n
        raise AssertionError("unreachable")

    def layer(self, i: int, *, host: dict | None = None, views: dict[int, tuple] | None = None) -> nnx.Module:
        """Layer `i` as its own module holding slices of the stacked arrays (recorded in `views`); with
        `host` (a dict caching host copies) the slices are numpy views."""
        r, j = self._locate(i)
        graphdef, state = nnx.split(self.runs[r])
        leaves, treedef = jax.tree.flatten(state)
        sliced = []
        for x in leaves:
            s = _slice(x, j, host)
            if views is not None:
                views[id(s)] = (x, j, s)
            sliced.append(s)
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, sliced))

    def __getitem__(self, i: int) -> nnx.Module:
        return self.layer(i)

    def __iter__(self) -> Iterator[nnx.Module]:
        return (self.layer(i) for i in range(len(self)))

    def __call__(self, x: jax.Array, caches: tuple | None, remat: str, run_layer, consts) -> tuple:
        """``x, cache = run_layer(layer, x, cache, consts)`` for every layer in order; x (batch, seq, hidden).

        caches: per run a (keys, values) pair of (layers, batch, slots, kv_heads, head_dim) arrays, or None.
        consts: arrays every layer reads (rotary tables, slots, segment ids); no gradient flows to them.
        Returns the output and the updated caches (None without). Dropout RNG streams advance as in a loop.
        """
        new_caches = []
        for r, run in enumerate(self.runs):
            # Params (adapters, and a dense model's weights when it trains in full) get gradients.
            graphdef, diff, rng, frozen = nnx.split(run, nnx.Param, nnx.RngState, ...)
            rest = (rng, frozen, None if caches is None else caches[r])

            def step(h, diff_i, rest_i, consts, graphdef=graphdef):
                # The barrier keeps each layer's work inside its own step: XLA may not hoist a layer's
                # dequantization or conversions out of the loop, for all layers at once.
                h, diff_i, rest_i = jax.lax.optimization_barrier((h, diff_i, rest_i))
                rng_i, frozen_i, cache_i = rest_i
                layer = nnx.merge(graphdef, diff_i, rng_i, frozen_i)
                h, new_cache = run_layer(layer, h, cache_i, consts)
                return h, (nnx.state(layer, nnx.RngState), new_cache)

            if caches is not None or remat == "none":  # decoding has no backward pass
                x, (new_rng, new_cache) = scan.checkpoint_scan(step, x, diff, rest, consts)
            elif remat == "dots":
                policy = jax.checkpoint_policies.checkpoint_dots
                x, (new_rng, new_cache) = scan.checkpoint_scan(step, x, diff, rest, consts, policy=policy)
            else:
                group = nested_group(self.sizes[r]) if remat == "nested" else 1
                x, (new_rng, new_cache) = scan.remat_scan(step, x, diff, rest, consts, offload=remat == "offload",
                                                          group=group)
            if stochastic(run):  # dropout drew masks: advance the streams (in eval mode nothing changed)
                nnx.update(run, new_rng)
            new_caches.append(new_cache)
        return x, None if caches is None else tuple(new_caches)


def stochastic(module: nnx.Module) -> bool:
    """Whether some submodule draws random numbers in its current mode (a Dropout in train mode)."""
    return any(getattr(m, "deterministic", True) is False for _, m in nnx.iter_graph(module))


def stacks(model: nnx.Module) -> list[tuple[tuple, LayerStack]]:
    """(path, stack) of every `LayerStack` in `model`."""
    return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, LayerStack)]


@contextlib.contextmanager
def unstacked(model: nnx.Module, *, host: bool = True) -> Iterator[nnx.Module]:
    """Within the block every `LayerStack` of `model` is an ``nnx.List`` of per-layer modules, so module
    paths are transformers' (``model.layers.3.mlp.up_proj``) and layers can be replaced, adapted or filled.
    On exit (also on an error) the layers are stacked again; arrays of untouched layers are reused, not
    copied. host=True slices as host numpy views (no device copy on the CPU, one host copy on a GPU)."""
    found = stacks(model)
    views: dict[int, tuple] = {}
    cache = {} if host else None
    for path, stack in found:
        replace_module(model, path, nnx.List([stack.layer(i, host=cache, views=views) for i in range(len(stack))]))
    try:
        yield model
    finally:
        for path, stack in found:
            stack.adopt(LayerStack(list(_get(model, path)), views=views))
            replace_module(model, path, stack)


def per_layer(fn):
    """Run ``fn(model, ...)`` inside `unstacked(model)`: it sees, edits and returns per-layer modules. What
    it returns of the model is a view once it has returned: read it, edit through another `per_layer` call."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with unstacked(model):
            return fn(model, *args, **kwargs)

    return wrapper


def _get(model: nnx.Module, path: tuple):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def host_buffers(model: nnx.Module) -> None:
    """Give every abstract array of `model` (from `nnx.eval_shape`) an uninitialised host numpy buffer, which
    loading fills in place through the per-layer views of `unstacked`."""
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        var.set_value(jax.tree.map(
            lambda x: np.empty(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, value))


def device_arrays(model: nnx.Module) -> None:
    """Replace every host numpy array of `model` by a jax array, one at a time (loading fills host buffers)."""
    # The model's own Variables, one at a time: a State of the model would hold every host buffer until
    # the end (2x the model at the peak).
    variables = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)]
    for var in variables:
        var.set_value(jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, var.get_value()))
