"""The training loop: `Trainer` runs the steps and hands each one to its hooks; `train` wires a run.

`train` is one call for a whole run in an output directory: the run lock, the device mesh, the train
state (`jaxlora.train.state`), resume, and the hooks of `jaxlora.train.hooks` (metrics, evaluation,
checkpoints, the stop on a non-finite loss, the loss plot). `Trainer` itself knows nothing of files:
it draws batches, runs `donating_train_step` with the loss it was given (donating the adapters and
optimizer state), and calls the hooks.

It knows the model only through the loss (by default `jaxlora.train.step.lm_loss`, the causal-LM loss
of `model(input_ids, attention_mask=...) -> logits`) and file formats only through the `write_adapter`
callback it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxlora.checks import number
from jaxlora.evaluate import eval_loss
from jaxlora.train import compile_cache
from jaxlora.train.batching import Batch
from jaxlora.train.checkpoint import clean_leftovers, list_checkpoints
from jaxlora.train.data import Data, DataConfig, DataState, train_batches
from jaxlora.train.distributed import all_agree, is_primary
from jaxlora.train.hooks import Checkpoint, Evaluate, Hook, Log, NonFiniteLossError, NonFiniteStop, OnStep, Plot
from jaxlora.train.lock import RunLock, RunLockedError
from jaxlora.train.optim import OptimizerConfig, make_schedule
from jaxlora.train.report import device_memory_mb, parse_report_to, plot_metrics, read_metrics
from jaxlora.train.sharding import device_batch, make_mesh
from jaxlora.train.state import TrainState
from jaxlora.train.step import LossFn, donating_train_step, lm_loss, train_step

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "check_output_dir", "plot_metrics", "read_metrics",
           "run_lock", "train"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = "runs/jaxlora"  # checkpoints, metrics.jsonl, loss.png, the final adapter
    eval_every: int = 0  # evaluate every N optimizer steps (0: only at the end, if there is eval data)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    save_total_limit: int | None = 3  # keep the newest N checkpoints; None keeps all
    log_every: int = 1  # append a metrics line every N steps
    offload_optimizer: bool = False  # keep optimizer state in host memory between steps
    mesh_data: int = 1  # data-parallel axis of the device mesh
    mesh_fsdp: int | None = None  # FSDP axis; None: all devices that mesh_data leaves
    progress: bool = True  # a one-line progress display on stderr
    report_to: str | tuple[str, ...] = "none"  # also log to "tensorboard" / "wandb" (a list for both); see report.py

    def __post_init__(self):
        number("eval_every", self.eval_every, integer=True, ge=0)
        number("save_every", self.save_every, integer=True, ge=0)
        number("log_every", self.log_every, integer=True, ge=1)
        number("save_total_limit", self.save_total_limit, integer=True, ge=1, none=True)
        number("mesh_data", self.mesh_data, integer=True, ge=1)  # make_mesh checks them against the devices
        number("mesh_fsdp", self.mesh_fsdp, integer=True, ge=1, none=True)
        parse_report_to(self.report_to)


def _step_for(model: nnx.Module, optimizer: nnx.Optimizer):
    """The donating step, unless a donated array (an adapter's, the optimizer state's) is held by another
    variable too (a model built by code of your own that shares a buffer between modules): XLA refuses a
    buffer donated twice, and would delete it under the frozen variable that shares it."""
    donated = jax.tree.leaves(nnx.state((model, optimizer), nnx.Any(optimizer.wrt, nnx.OptState)))
    others = {id(x) for x in jax.tree.leaves(nnx.state((model, optimizer), nnx.Not(nnx.Any(optimizer.wrt,
                                                                                            nnx.OptState))))}
    ids = [id(x) for x in donated]
    return donating_train_step if len(set(ids)) == len(ids) and not others & set(ids) else train_step


class Trainer:
    """The step loop: `accumulation` micro-batches per optimizer step through `train_step(loss_fn)`, each
    result to the hooks' `after_micro_step`, each step's metrics to their `after_step`, in order."""

    def __init__(self, state: TrainState, *, loss_fn: LossFn = lm_loss, hooks: Sequence[Hook] = (),
                 accumulation: int = 1, schedule: Callable[[int], float] | None = None, mesh=None,
                 packing: bool = False):
        self.state, self.loss_fn, self.hooks = state, loss_fn, list(hooks)
        self.accumulation, self.schedule, self.mesh, self.packing = accumulation, schedule, mesh, packing

    def fit(self, batches: Iterator[tuple[Batch, DataState]], max_steps: int) -> dict:
        """Train until `state.step` reaches `max_steps`; return the last step's metrics, the run's
        `mean_tokens_per_s` and what the hooks add at the end. The step is compiled for the model's structure
        as it is now (its active adapter included): a hook that changes it is seen by the next `fit`."""
        state = self.state
        if state.follows_model and state.wrt != state.model.trainable:  # set_adapter since create
            raise ValueError("the model's active adapter changed since its optimizer was built (it trains what "
                             "model.trainable selected then); build a new TrainState, e.g. call train() again")
        # bind walks the model graph once instead of on every call (~40% of a small step on CPU).
        state.model.train()  # before bind: train mode (dropout on) is part of the structure bind captures
        step_fn = _step_for(state.model, state.optimizer).bind(state.model, state.optimizer)
        t_run, tokens_run, metrics = time.perf_counter(), 0, {}
        while state.step < max_steps:
            t0, losses, tokens = time.perf_counter(), [], 0
            for _ in range(self.accumulation):
                batch, state.data = next(batches)
                tokens += int(np.sum(batch.attention_mask))
                result = step_fn(device_batch(batch, self.mesh, self.packing), loss_fn=self.loss_fn,
                                 offload_optimizer=state.offloaded)
                losses.append(float(result["loss"]))
                for hook in self.hooks:
                    hook.after_micro_step(state, result)
            state.step += 1
            dt = time.perf_counter() - t0
            tokens_run += tokens
            metrics = {
                "step": state.step,
                "loss": float(np.mean(losses)),
                **({} if self.schedule is None else {"lr": float(self.schedule(state.step - 1))}),
                "grad_norm": float(result["grad_norm"]),
                "tokens_per_s": tokens / dt,
                "rss_mb": _rss_mb(),
                **device_memory_mb(),
            }
            for hook in self.hooks:
                hook.after_step(state, metrics, state.step == max_steps)
        summary = {**metrics, "mean_tokens_per_s": tokens_run / max(time.perf_counter() - t_run, 1e-9)}
        for hook in self.hooks:
            hook.at_end(state, summary)
        return summary


def train(
    model: nnx.Module,
    data: Data,
    *,
    data_cfg: DataConfig,
    optim_cfg: OptimizerConfig,
    train_cfg: TrainConfig,
    pad_token_id: int,
    write_adapter: Callable[[nnx.Module, Path], None] | None = None,
    resume: bool = False,
    run_info: dict | None = None,
    on_step: Callable[[dict], None] | None = None,
    wrt=None,
    loss_fn: LossFn = lm_loss,
    hooks: Sequence[Hook] = (),
) -> dict:
    """Train `model`'s adapters for `optim_cfg.max_steps` optimizer steps; return a summary dict.

    resume: continue from the newest checkpoint in `train_cfg.output_dir` so that the loss curve is
    the one an uninterrupted run would have drawn (adapters, optimizer state, dropout RNG and data
    position all come from the checkpoint).
    on_step: called with each step's metrics after logging, evaluation and checkpointing.
    write_adapter: `write_adapter(model, path)` fills the (existing, empty) directory `path` of each
    checkpoint with a PEFT adapter; called on process 0 only.
    wrt: the variables trained (an nnx filter). Default: a `jaxlora.PeftModel`'s `trainable` -- its active
    adapter, as PEFT trains it (other adapters are left alone) -- else every `nnx.LoRAParam`; `nnx.Param`
    trains a dense model in full (the demo pretrains its tiny base this way).
    loss_fn: `loss_fn(model, batch) -> (loss, aux)` for training and evaluation (jaxlora.train.step).
    hooks: more `jaxlora.train.hooks.Hook`s, run after the built-in ones.
    """
    # Before the step is compiled: a second run of the same shapes loads it (jaxlora/train/compile_cache.py;
    # JAXLORA_COMPILATION_CACHE=0 turns it off).
    compile_cache.enable_compilation_cache()
    out = Path(train_cfg.output_dir)
    with run_lock(out):
        check_output_dir(out, resume=resume)
        if is_primary():
            for p in clean_leftovers(out):  # temporary directories of saves that were killed
                print(f"removed {p}, left by an interrupted save", file=sys.stderr)
        mesh = make_mesh(data=train_cfg.mesh_data, fsdp=train_cfg.mesh_fsdp) if jax.device_count() > 1 else None
        state = TrainState.create(model, optim_cfg, wrt=wrt, mesh=mesh, offload_optimizer=train_cfg.offload_optimizer)
        if resume:
            state.restore(out)
        log = Log.open(out, report_to=train_cfg.report_to, total=optim_cfg.max_steps, log_every=train_cfg.log_every,
                       start_step=state.step, progress=train_cfg.progress, config=run_info)
        checkpoints = Checkpoint(out, every=train_cfg.save_every, keep=train_cfg.save_total_limit, run_info=run_info,
                                 write_adapter=write_adapter)
        evaluate = lambda m: eval_loss(m, data.eval, data_cfg, pad_token_id=pad_token_id, mesh=mesh, loss_fn=loss_fn)  # noqa: E731
        trainer = Trainer(
            state, loss_fn=loss_fn, accumulation=optim_cfg.gradient_accumulation_steps,
            schedule=make_schedule(optim_cfg), mesh=mesh, packing=data_cfg.packing,
            hooks=[
                NonFiniteStop(checkpoints), log,
                *([Evaluate(evaluate, every=train_cfg.eval_every, log=log)] if data.eval else []),
                checkpoints, Plot(out), *([OnStep(on_step)] if on_step is not None else []), *hooks,
            ],
        )
        stream = train_batches(data.train, data_cfg, pad_token_id=pad_token_id, start=state.data)
        return trainer.fit(stream, optim_cfg.max_steps)


def check_output_dir(output_dir: str | Path, *, resume: bool) -> None:
    """A fresh run must not start over another run's checkpoints (pruning would mix the two)."""
    found = list_checkpoints(output_dir)
    if found and not resume:
        raise ValueError(
            f"output_dir {output_dir} already holds checkpoints ({found[-1].name}); resume that run "
            "(resume=True / --resume), or choose another output_dir"
        )
    if resume and not found:
        raise FileNotFoundError(f"cannot resume: no checkpoint in {output_dir}")


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold the output directory's lock while the block runs: taken by process 0 for all processes of
    the run, and every process raises RunLockedError if another run holds it (a collective)."""
    lock = RunLock(output_dir) if is_primary() else contextlib.nullcontext()
    error = None
    try:
        lock.__enter__()
    except RunLockedError as e:
        error = e
    if not all_agree(error is None):
        if error is None:
            lock.__exit__(None, None, None)
        raise error or RunLockedError(f"output_dir {output_dir} is in use by another run (see process 0's error)")
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _rss_mb() -> float:
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
