"""Several processes, one run: starting JAX's distributed runtime from the environment, and the few
places where only one process may touch a file.

    JAXLORA_COORDINATOR_ADDRESS   host:port of process 0 (any free port), the same for every process
    JAXLORA_NUM_PROCESSES         how many processes take part
    JAXLORA_PROCESS_ID            this process's index, 0 .. NUM_PROCESSES-1

With none of them set nothing is started (one process; on TPU pods and SLURM, JAX's own auto-detection
is used by calling `jax.distributed.initialize()` yourself). Every process runs the same command on the
same files: the data pipeline is deterministic, so each one builds the same global batch and hands its
own devices their rows; checkpoints are written by all processes together (each its own shards) and
everything else (metrics, the lock, the PEFT adapter) by process 0 alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

ENV = ("JAXLORA_COORDINATOR_ADDRESS", "JAXLORA_NUM_PROCESSES", "JAXLORA_PROCESS_ID")


def initialize_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Start `jax.distributed` from the JAXLORA_* variables; False (nothing done) when none is set."""
    given = {k: environ[k] for k in ENV if environ.get(k)}
    if not given:
        return False
    if len(given) != len(ENV):
        missing = [k for k in ENV if k not in given]
        raise ValueError(f"multi-process training needs all of {list(ENV)}; {missing} not set")
    try:
        count, index = int(given[ENV[1]]), int(given[ENV[2]])
    except ValueError:
        raise ValueError(f"{ENV[1]}={given[ENV[1]]!r} and {ENV[2]}={given[ENV[2]]!r} must be integers") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{ENV[2]}={index} must lie in 0..{count - 1} ({ENV[1]}={count})")
    # CPU devices have no collectives across processes unless one is chosen (gloo ships with jaxlib);
    # the setting is ignored by GPU and TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=given[ENV[0]], num_processes=count, process_id=index)
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has arrived here (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_agree(flag: bool) -> bool:
    """True when `flag` is True on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))


@contextlib.contextmanager
def host_local(model: nnx.Module, wrt=nnx.LoRAParam) -> Iterator[None]:
    """Within the block, `wrt`'s variables hold whole host-local copies, so code that turns them into
    numpy (a PEFT writer) works when they are sharded across processes; restored on exit. A collective:
    every process must enter it."""
    if jax.process_count() == 1:
        yield
        return
    state = nnx.state(model, wrt)
    original = jax.tree.map(lambda x: x, state)
    nnx.update(model, jax.tree.map(lambda x: jax.numpy.asarray(x), multihost_utils.process_allgather(state, tiled=True)))
    try:
        yield
    finally:
        nnx.update(model, original)
