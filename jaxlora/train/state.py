"""What training changes: the model, its optimizer, the step count and the data position, with one owner.

`TrainState.create` is the one place that decides which variables train (`wrt`): it is the optimizer's
own filter, and the train step and the checkpoints read `optimizer.wrt`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from jaxlora.train.checkpoint import restore_newest, save_checkpoint
from jaxlora.train.data import DataState
from jaxlora.train.optim import OptimizerConfig, make_optimizer
from jaxlora.train.sharding import shard_model
from jaxlora.train.step import offload_optimizer_state


class TrainState:
    """The model (trained in place), its `nnx.Optimizer`, the optimizer steps taken and where the training
    stream stands. A checkpoint stores exactly this (the `wrt` variables, optimizer state, RNG streams,
    step, data position); `restore` puts it back."""

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, *, step: int = 0, data: DataState = DataState(),
                 offloaded: bool = False, follows_model: bool = False):
        self.model, self.optimizer = model, optimizer
        self.step, self.data = step, data
        self.offloaded = offloaded  # the optimizer state is in host memory between steps
        # The optimizer's wrt is the model's `trainable` as it was at create: a set_adapter since is an error.
        self.follows_model = follows_model

    @classmethod
    def create(cls, model: nnx.Module, optim_cfg: OptimizerConfig, *, wrt=None, mesh: Mesh | None = None,
               offload_optimizer: bool = False) -> TrainState:
        """A fresh state training `wrt`, placed on `mesh` when given; `offload_optimizer` keeps the optimizer
        state in host memory. Default: the model's ``trainable`` filter -- a `jaxlora.PeftModel`'s active
        adapter, as PEFT trains it -- or every ``nnx.LoRAParam`` of a model without one; ``nnx.Param``
        trains a dense model in full."""
        follows_model = wrt is None and hasattr(model, "trainable")
        if wrt is None:
            wrt = model.trainable if follows_model else nnx.LoRAParam
        if mesh is not None:
            shard_model(model, mesh)
        optimizer = nnx.Optimizer(model, make_optimizer(optim_cfg), wrt=wrt)
        if mesh is not None:  # its moments follow the adapters' sharding; its step count is replicated
            shard_model(optimizer, mesh)
        if offload_optimizer:
            offload_optimizer_state(optimizer)
        return cls(model, optimizer, offloaded=offload_optimizer, follows_model=follows_model)

    @property
    def wrt(self):
        return self.optimizer.wrt

    def save(self, run_dir: Path, *, run_info: dict | None = None,
             write_adapter: Callable[[nnx.Module, Path], None] | None = None) -> Path:
        """Write checkpoint-{step} (a collective); `write_adapter(model, path)` adds the PEFT files."""
        return save_checkpoint(
            run_dir, step=self.step, model=self.model, optimizer=self.optimizer,
            trainer_state={"data": self.data.to_dict(), "run": run_info or {}},
            write_adapter=None if write_adapter is None else (lambda path: write_adapter(self.model, path)),
        )

    def restore(self, run_dir: Path) -> Path:
        """Load the newest readable checkpoint of `run_dir` into this state; return its path."""
        path, meta = restore_newest(run_dir, model=self.model, optimizer=self.optimizer)
        self.step, self.data = meta["step"], DataState.from_dict(meta["data"])
        return path
