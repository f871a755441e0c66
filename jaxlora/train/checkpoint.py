"""Training checkpoints on orbax-checkpoint: adapter weights, optimizer state, RNG streams, step and data
position, written by all processes together and committed atomically.

Layout (one orbax checkpoint per step; names as transformers' Trainer uses them)::

    run_dir/checkpoint-000120/
        state/           adapters (nnx.LoRAParam), optimizer state, RNG key data: sharded arrays (OCDBT),
                         each process writing the shards it holds
        trainer_state/   JSON: step, data position, whatever the loop adds (the run's config)
        adapter/         optional: a PEFT adapter written once, by process 0, via `write_adapter`

The newest checkpoint is the committed one with the highest step: there is no separate pointer that a
kill between the commit and its update could leave behind.

What orbax adds to the hand-written version it replaced: arrays are saved shard by shard from the
devices that hold them (no process ever needs the whole array, so arrays sharded across processes
save at all), the processes commit together behind barriers (orbax writes under a temporary name and
renames once every process has finished), and a restore reads each array straight into the sharding the
current model asks for, so a checkpoint written on 2 processes x 2 devices resumes on 1 device, or on
another mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxlora.train.distributed import barrier, host_local, is_primary

_STATE, _META, _ADAPTER = "state", "trainer_state", "adapter"
_KEY_SUFFIX = "#key_data"  # a typed PRNG key is stored as its raw key data under this suffix
_NAME = re.compile(r"checkpoint-(\d+)")
# What killed saves leave behind: orbax's temporary step directories, and the ".name.tmp-*" /
# ".name.old-*" directories of jaxlora's own atomic writes.
_LEFTOVER = re.compile(r"checkpoint-\d+\.orbax-checkpoint-tmp.*|\..+\.(tmp|old)-.*")


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but was written from another model or optimizer structure."""


class _AdapterHandler(ocp.CheckpointHandler):
    """An orbax item that is a PEFT adapter directory, written by process 0 alone; never restored
    (training state comes from `state/`; the adapter is there for `eval` / `generate --adapter`)."""

    def save(self, directory, args: AdapterSave):
        if is_primary():
            args.write(Path(directory))

    def restore(self, directory, args=None):
        return Path(directory)


@ocp.args.register_with_handler(_AdapterHandler, for_save=True)
@dataclasses.dataclass
class AdapterSave(ocp.args.CheckpointArgs):
    write: Callable[[Path], None]


@ocp.args.register_with_handler(_AdapterHandler, for_restore=True)
@dataclasses.dataclass
class AdapterRestore(ocp.args.CheckpointArgs):
    pass


def _checkpointer() -> ocp.Checkpointer:
    # Handlers named per item, so that a fresh process can read a checkpoint's metadata.
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler(), _ADAPTER: _AdapterHandler()}
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def _trainable(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, nnx.State]:
    # Only what training changes (the optimizer's `wrt` variables and the RNG streams): the frozen base is
    # reloaded from its own checkpoint. Taken from the state trees generically, so stacked (scanned)
    # layers are stored as the stacked arrays they are.
    return {"model": nnx.state(model, nnx.Any(optimizer.wrt, nnx.RngState)), "optimizer": nnx.state(optimizer)}


def _flatten(parts: dict[str, nnx.State]) -> dict[str, jax.Array]:
    flat = {}
    for part, state in parts.items():
        for path, var in nnx.to_flat_state(state):
            key, value = ".".join([part, *map(str, path)]), var.get_value()
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                flat[key + _KEY_SUFFIX] = jax.random.key_data(value)
            else:
                flat[key] = value
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
) -> Path:
    """Write checkpoint-{step} atomically; keep the newest `keep` checkpoints.

    Every process must call it (a collective). It stores the trained variables (`optimizer.wrt`),
    the optimizer state and the RNG streams."""
    run_dir = Path(run_dir).absolute()
    final = run_dir / f"checkpoint-{step:06d}"
    if final.exists():
        raise FileExistsError(f"{final} exists already; set it aside before saving step {step} again")
    arrays = _flatten(_trainable(model, optimizer))  # taken before host_local swaps values in
    items = {_STATE: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave({"step": int(step), **(trainer_state or {})})}
    if write_adapter is not None:
        items[_ADAPTER] = AdapterSave(write_adapter)
    # The PEFT writer turns adapters into numpy, which arrays sharded across processes do not allow.
    # Every adapter whole, not only what trains: a writer may save the inactive adapters too.
    gathered = nnx.Any(optimizer.wrt, nnx.LoRAParam)
    with host_local(model, gathered) if write_adapter is not None else contextlib.nullcontext(), _checkpointer() as ckpt:
        ckpt.save(final, args=ocp.args.Composite(**items))
    if keep is not None and is_primary():
        prune_checkpoints(run_dir, keep, protect=final)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, *, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints by step; `protect` (the one just written, whose
    step may be lower than an older run's) is never deleted."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if protect is None or old.name != Path(protect).name:
            shutil.rmtree(old)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints in step order (temporary, half-written directories are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The committed checkpoint with the highest step."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories of saves that were killed; returns what was removed.
    Call it only while holding the run's lock (another run's save in progress looks the same)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    gone = [p for p in run_dir.iterdir() if _LEFTOVER.fullmatch(p.name)]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return gone


def set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint out of the way: kept for inspection, never resumed from or pruned."""
    n, aside = 1, path.with_name(f"{path.name}.{why}")
    while aside.exists():
        n, aside = n + 1, path.with_name(f"{path.name}.{why}-{n}")
    os.rename(path, aside)
    return aside


def load_checkpoint(path: str | os.PathLike, *, model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
    """Restore adapters, optimizer state and RNG streams in place; return the trainer_state dict.

    Arrays are read into the shardings the model and optimizer have now (any mesh, any process count).
    They must have the structure the checkpoint was written from: every key present with the same
    shape and dtype, none left over. A damaged checkpoint raises a ValueError naming the file."""
    path = Path(path).absolute()
    for item in (_STATE, _META):
        if not (path / item).is_dir():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {item}/ is missing")
    meta_file = path / _META / "metadata"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {meta_file} is unreadable (truncated or corrupt?): {e}") from None
    parts = _trainable(model, optimizer)
    expected = _flatten(parts)
    try:
        with _checkpointer() as ckpt:
            stored = ckpt.metadata(path).item_metadata[_STATE].tree
    except Exception as e:  # orbax and tensorstore raise their own error types for damaged files
        raise ValueError(f"checkpoint {path / _STATE} is unreadable (truncated or corrupt?): {_short(e)}") from e
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit this model/optimizer: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    for key, want in expected.items():
        got = stored[key]
        if tuple(got.shape) != want.shape or got.dtype != want.dtype:
            raise CheckpointMismatchError(
                f"checkpoint {path}: {key} has shape {tuple(got.shape)} dtype {got.dtype}, "
                f"this model expects shape {want.shape} dtype {want.dtype}"
            )
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in expected.items()}
    try:
        with _checkpointer() as ckpt:
            restored = ckpt.restore(path, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))[_STATE]
    except Exception as e:  # tensorstore's message names the damaged file
        raise ValueError(f"checkpoint {path / _STATE} is unreadable (truncated or corrupt?): {_short(e)}") from e
    for part, state in parts.items():
        for p, var in nnx.to_flat_state(state):
            key = ".".join([part, *map(str, p)])
            if key + _KEY_SUFFIX in restored:
                impl = jax.random.key_impl(var.get_value())
                var.set_value(jax.random.wrap_key_data(restored[key + _KEY_SUFFIX], impl=impl))
            else:
                var.set_value(restored[key])
    return meta


def restore_newest(run_dir: str | os.PathLike, *, model, optimizer) -> tuple[Path, dict]:
    """Load the newest checkpoint that reads back whole; each damaged newer one is reported (a warning
    naming the file) and set aside as `checkpoint-N.unreadable`. Every process must call it."""
    while (path := latest_checkpoint(run_dir)) is not None:
        try:
            return path, load_checkpoint(path, model=model, optimizer=optimizer)
        except CheckpointMismatchError:
            raise  # the run changed, not the file: an older checkpoint would not fit either
        except (ValueError, FileNotFoundError) as e:
            if is_primary():
                aside = set_aside(path, "unreadable")
                warnings.warn(f"{e}; moved it to {aside.name} and trying the previous checkpoint", stacklevel=2)
            # Every process must see the rename before looking for the next one.
            barrier(f"jaxlora set aside {path.name}")
    raise FileNotFoundError(f"cannot resume: no readable checkpoint in {run_dir}")


def _short(e: Exception) -> str:
    return str(e).split(" [tensorstore_spec=")[0]  # the spec that follows is a page of JSON
