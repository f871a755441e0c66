"""Atomic training checkpoints: adapter weights, optimizer state, RNG streams, step and data position.

Layout (names as transformers' Trainer uses them)::

    run_dir/checkpoint-000120/
        train_state.safetensors   adapters (nnx.LoRAParam), optimizer state, RNG streams, flattened by path
        trainer_state.json        step, data position, anything JSON the loop adds (config, metrics)
        adapter/                  optional: a PEFT adapter written by the caller's `write_adapter`
    run_dir/latest                the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place only when complete, and `latest`
is replaced atomically afterwards, so an interruption at any moment leaves the previous checkpoint
intact and readable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora.fileio import atomic_directory

_STATE_FILE = "train_state.safetensors"
_META_FILE = "trainer_state.json"
_KEY_SUFFIX = "#key_data"  # a typed PRNG key is stored as its raw key data under this suffix


def _trainable_state(model: nnx.Module, optimizer: nnx.Optimizer, wrt) -> dict[str, nnx.State]:
    # Only what training changes: the frozen base is reloaded from its own checkpoint.
    return {
        "model": nnx.state(model, nnx.Any(wrt, nnx.RngState)),
        "optimizer": nnx.state(optimizer),
    }


def _flatten(parts: dict[str, nnx.State]) -> dict[str, np.ndarray]:
    flat = {}
    for part, state in parts.items():
        for path, var in nnx.to_flat_state(state):
            key = "/".join([part, *map(str, path)])
            value = var.get_value()
            if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
                flat[key + _KEY_SUFFIX] = np.asarray(jax.random.key_data(value))
            else:
                flat[key] = np.asarray(value)
    return flat


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    trainer_state: dict | None = None,
    write_adapter: Callable[[Path], None] | None = None,
    keep: int | None = None,
    wrt=nnx.LoRAParam,
) -> Path:
    """Write checkpoint-{step} atomically and point `latest` at it; keep the newest `keep` checkpoints.
    wrt: the trained variables to store (adapters by default), besides optimizer state and RNG streams."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:06d}"
    # Re-saving a step (after a resume) replaces it whole: nothing of the old one is kept.
    with atomic_directory(final, keep=lambda name: False) as tmp:
        save_file(_flatten(_trainable_state(model, optimizer, wrt)), str(tmp / _STATE_FILE))
        meta = {"step": int(step), **(trainer_state or {})}
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1))
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        _fsync_tree(tmp)
    _write_atomic(run_dir / "latest", final.name)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:  # the newest by step may be an older run's; never prune what was just written
                shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in step order (temporary, half-written directories are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `latest`, or the newest complete one if `latest` is missing."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if (path / _META_FILE).is_file():
            return path
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, *, model: nnx.Module, optimizer: nnx.Optimizer, wrt=nnx.LoRAParam) -> dict:
    """Restore adapters, optimizer state and RNG streams in place; return the trainer_state dict.

    The model and optimizer must have the structure the checkpoint was written from: every key must be
    present with the same shape and dtype, and no key may be left over.
    """
    path = Path(path)
    state_file, meta_file = path / _STATE_FILE, path / _META_FILE
    for f in (state_file, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {f.name} is missing")
    try:
        stored = load_file(str(state_file))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"checkpoint file {state_file} is unreadable (truncated or corrupt?): {e}") from e
    parts = _trainable_state(model, optimizer, wrt)
    expected = _flatten(parts)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise ValueError(
            f"checkpoint {state_file} does not fit this model/optimizer: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    for key, want in expected.items():
        got = stored[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"checkpoint {state_file}: {key} has shape {got.shape} dtype {got.dtype}, "
                f"this model expects shape {want.shape} dtype {want.dtype}"
            )
    for part, state in parts.items():
        for p, var in nnx.to_flat_state(state):
            key = "/".join([part, *map(str, p)])
            if key + _KEY_SUFFIX in stored:
                var.set_value(jax.random.wrap_key_data(jnp.asarray(stored[key + _KEY_SUFFIX])))
            else:
                var.set_value(jnp.asarray(stored[key]))
        target = model if part == "model" else optimizer
        nnx.update(target, state)
    return json.loads(meta_file.read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
