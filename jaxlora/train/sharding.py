"""Multi-device training on JAX's own engine: a ("data", "fsdp") mesh and one partition rule.

Every array of the model — dense base weights, packed quantized codes and their scales, adapters —
is split along its largest axis that the "fsdp" size divides, or replicated when none does; the batch is
split over both axes. jit then compiles the collectives (GSPMD): weights are all-gathered where a
matmul needs them and gradients reduce-scattered, which is FSDP, with "data" as plain data parallelism.

Multi-host: call `jax.distributed.initialize()` (coordinator address, process count and id from the
cluster, or auto-detected on TPU / SLURM) in every process before building the mesh, or let `jaxlora
train` do it from JAXLORA_* variables (`jaxlora.train.distributed`); `make_mesh` then spans all
processes' devices, and each process feeds the batch rows of its own devices
(`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.models.stack import stacks

AXES = ("data", "fsdp")


def make_mesh(*, data: int = 1, fsdp: int | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh; `fsdp=None` takes all devices that `data` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1:
        raise ValueError(f"data={data} must be >= 1")
    if fsdp is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices")
        fsdp = len(devices) // data
    if fsdp < 1 or data * fsdp > len(devices):
        raise ValueError(f"data={data} x fsdp={fsdp} needs {data * fsdp} devices; {len(devices)} are available")
    grid = np.array(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, AXES)


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
    """Shard the largest axis that `fsdp_size` divides; replicate scalars and indivisible arrays."""
    if fsdp_size == 1 or not shape:
        return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: shape[i])
    return PartitionSpec(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Place every array of `model` (adapters, frozen base, quantized storage, RNG keys) on `mesh`.

    A stacked decoder layer array (`jaxlora.models.stack`) keeps its leading layer axis whole: the scan
    takes one layer per step, and a sharded layer axis would move whole layers between devices."""
    fsdp_size = mesh.shape["fsdp"]
    stacked = [path + ("runs",) for path, _ in stacks(model)]

    def place(x, layered: bool):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            spec = PartitionSpec()
        elif layered:
            spec = PartitionSpec(None, *param_spec(x.shape[1:], fsdp_size))
        else:
            spec = param_spec(x.shape, fsdp_size)
        return _put(x, NamedSharding(mesh, spec))

    for path, var in nnx.to_flat_state(nnx.state(model)):
        layered = any(tuple(path[: len(p)]) == p for p in stacked)
        var.set_value(jax.tree.map(lambda x: place(x, layered), var.get_value()))


def _put(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1 or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    # A process-local array onto a mesh across processes: device_put cannot reach other processes'
    # devices. Every process holds the same array (same seed), so each hands its own devices their shards.
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: host[index])


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Split the leading (batch) axis of every array over all mesh devices."""
    n = math.prod(mesh.shape.values())
    sharding = NamedSharding(mesh, PartitionSpec(AXES))
    out = {}
    for key, value in batch.items():
        if value.shape[0] % n:
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} rows, which the {n} devices of the mesh "
                f"{dict(mesh.shape)} do not divide; use a batch size that is a multiple of {n}"
            )
        # Every process holds the same global batch (the data pipeline is deterministic); each hands its
        # own devices their rows, so this also feeds a mesh that spans several processes.
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value), value.shape)
    return out


def device_batch(batch, mesh: Mesh | None = None, packing: bool = False) -> dict:
    """The step's dict of a `jaxlora.train.batching.Batch`, split over `mesh` when there is one. Packed rows
    (several examples per row) also carry positions and segment_ids: the model must keep them apart."""
    arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask}
    if packing:
        arrays.update(positions=batch.positions, segment_ids=batch.segment_ids)
    return shard_batch(arrays, mesh) if mesh is not None else arrays
