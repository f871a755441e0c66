"""Small operations on an NNX module tree, shared by quantization (models/quantize.py) and adapter
injection (peft_model.py)."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx


def replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    """Put `new` where `path` (as `nnx.iter_graph` yields it: attribute names and list indices) points."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def retype_variables(root: nnx.Module, old: type, new: type, *, within: Sequence[nnx.Module] | None = None) -> None:
    """Replaces every variable of exactly type `old` under `root` (only those found under the modules `within`,
    if given) by one of type `new` holding the same value, at *every* attribute of `root`'s graph that
    references it: a variable two modules share (a tied head's table and the embedding's) stays one variable.
    `nnx.iter_graph` yields a shared variable at one path only, so swapping it by path would split it in two."""
    chosen = None if within is None else {id(v) for m in within for _, v in nnx.iter_graph(m) if type(v) is old}
    swapped: dict[int, nnx.Variable] = {}
    for _, module in list(nnx.iter_graph(root)):
        if not isinstance(module, nnx.Module):
            continue
        for attr, value in list(vars(module).items()):
            if type(value) is old and (chosen is None or id(value) in chosen):
                if id(value) not in swapped:
                    swapped[id(value)] = new(value.get_value(), **value.get_metadata())
                setattr(module, attr, swapped[id(value)])
