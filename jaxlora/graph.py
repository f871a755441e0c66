"""Small operations on an NNX module tree, shared by quantization (models/quantize.py) and adapter
injection (peft_model.py)."""

from __future__ import annotations

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
