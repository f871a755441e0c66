"""The training loop: steps, logging, evaluation, checkpoints, resume, and a stop on a non-finite loss.

It knows the model only as `model(input_ids, attention_mask=...) -> logits` with adapters held as
`nnx.LoRAParam`, and file formats only through the `write_adapter` callback it is given.

A checkpoint is good when training can continue from it. The step that computes a non-finite loss or
gradient does not apply its update (see `train_step`), so what is in memory is never corrupted; but the
weights that produced that loss are the previous step's, so a checkpoint of exactly those weights is not
good either: it is set aside (`checkpoint-N.nonfinite`). Older checkpoints are pruned only once the
newest one has been validated by a finite step, so `save_total_limit` never deletes the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from jaxlora.checks import number
from jaxlora.generate import inference_view
from jaxlora.train import compile_cache
from jaxlora.train.checkpoint import (
    clean_leftovers,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    restore_newest,
    save_checkpoint,
    set_aside,
)
from jaxlora.train.data import Data, DataConfig, DataState, eval_batches, train_batches
from jaxlora.train.distributed import all_agree, barrier, is_primary
from jaxlora.train.lock import RunLock, RunLockedError
from jaxlora.train.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxlora.train.report import Reporter, device_memory_mb, parse_report_to
from jaxlora.train.sharding import make_mesh, shard_batch, shard_model
from jaxlora.train.step import eval_step, offload_optimizer_state, train_step


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


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient norm was NaN or Inf; its update was not applied and the run stopped.
    The message names the last good checkpoint."""


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


def evaluate(model: nnx.Module, examples, data_cfg: DataConfig, *, pad_token_id: int, mesh=None) -> float:
    """Token-weighted mean loss over one pass of `examples`."""
    total, count = 0.0, 0.0
    view = inference_view(model)  # dropout off; `model` keeps its mode
    for batch in eval_batches(examples, data_cfg, pad_token_id=pad_token_id):
        out = eval_step(view, _device_batch(batch, mesh, data_cfg.packing))
        total += float(out["loss_sum"])
        count += float(out["tokens"])
    return total / max(count, 1.0)


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
    wrt=nnx.LoRAParam,
) -> dict:
    """Train `model`'s adapters for `optim_cfg.max_steps` optimizer steps; return a summary dict.

    resume: continue from the newest checkpoint in `train_cfg.output_dir` so that the loss curve is
    the one an uninterrupted run would have drawn (adapters, optimizer state, dropout RNG and data
    position all come from the checkpoint).
    on_step: called with each step's metrics after logging, evaluation and checkpointing.
    write_adapter: `write_adapter(model, path)` fills the (existing, empty) directory `path` of each
    checkpoint with a PEFT adapter; called on process 0 only.
    wrt: the variables trained — adapters by default; `nnx.Param` trains a dense model in full (the
    demo pretrains its tiny base this way).
    """
    # Before the step is compiled: a second run of the same shapes loads it (jaxlora/train/compile_cache.py;
    # JAXLORA_COMPILATION_CACHE=0 turns it off).
    compile_cache.enable_compilation_cache()
    out = Path(train_cfg.output_dir)
    with run_lock(out):
        check_output_dir(out, resume=resume)
        return _train_locked(
            model, data, out, data_cfg=data_cfg, optim_cfg=optim_cfg, train_cfg=train_cfg,
            pad_token_id=pad_token_id, write_adapter=write_adapter, resume=resume, run_info=run_info,
            on_step=on_step, wrt=wrt,
        )


def _train_locked(
    model, data, out: Path, *, data_cfg, optim_cfg, train_cfg, pad_token_id, write_adapter, resume, run_info, on_step, wrt
) -> dict:
    """`train`'s body, run while this process holds the output directory's lock."""
    if is_primary():
        for p in clean_leftovers(out):  # temporary directories of saves that were killed
            print(f"removed {p}, left by an interrupted save", file=sys.stderr)
    mesh = None
    if jax.device_count() > 1:
        mesh = make_mesh(data=train_cfg.mesh_data, fsdp=train_cfg.mesh_fsdp)
        shard_model(model, mesh)
    optimizer = nnx.Optimizer(model, make_optimizer(optim_cfg), wrt=wrt)
    if mesh is not None:  # its moments follow the adapters' sharding; its step count is replicated
        shard_model(optimizer, mesh)
    if train_cfg.offload_optimizer:
        offload_optimizer_state(optimizer)
    schedule = make_schedule(optim_cfg)
    save_adapter = None if write_adapter is None else (lambda path: write_adapter(model, path))

    step, data_state = 0, DataState()
    metrics_file = out / "metrics.jsonl"
    if resume:
        _, meta = restore_newest(out, model=model, optimizer=optimizer, wrt=wrt)
        step, data_state = meta["step"], DataState.from_dict(meta["data"])
        if is_primary():
            _truncate_log(metrics_file, step)  # drop what the interrupted run logged after its checkpoint
    elif metrics_file.exists() and is_primary():
        metrics_file.unlink()

    def checkpoint():
        return save_checkpoint(
            out,
            step=step,
            model=model,
            optimizer=optimizer,
            trainer_state={"data": data_state.to_dict(), "run": run_info or {}},
            write_adapter=save_adapter,
            wrt=wrt,
        )

    # Process 0 alone writes metrics (every process shows its progress).
    reporter = Reporter.create(train_cfg.report_to, out, total=optim_cfg.max_steps, log_every=train_cfg.log_every,
                               start_step=step, progress=train_cfg.progress, config=run_info, write=is_primary())
    accum = optim_cfg.gradient_accumulation_steps
    stream = train_batches(data.train, data_cfg, pad_token_id=pad_token_id, start=data_state)
    # cached_partial walks the model graph once instead of on every call (~20% of a small step on CPU).
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    model.train()
    keep = train_cfg.save_total_limit
    last_ckpt, unproven, t_run, tokens_run, last = latest_checkpoint(out), None, time.perf_counter(), 0, {}
    while step < optim_cfg.max_steps:
        t0, losses, tokens = time.perf_counter(), [], 0
        for _ in range(accum):
            batch, data_state = next(stream)
            tokens += int(np.sum(batch.attention_mask))
            res = step_fn(
                _device_batch(batch, mesh, data_cfg.packing), offload_optimizer=train_cfg.offload_optimizer, wrt=wrt
            )
            losses.append(float(res["loss"]))
            if not bool(res["finite"]):
                raise NonFiniteLossError(_non_finite(step + 1, float(res["loss"]), float(res["grad_norm"]), unproven, out))
        step += 1
        if unproven is not None and keep is not None and is_primary():
            prune_checkpoints(out, keep, protect=unproven)  # the finite step just proved `unproven` good
        unproven = None
        loss = float(np.mean(losses))
        dt = time.perf_counter() - t0
        tokens_run += tokens
        last = {
            "step": step,
            "loss": loss,
            "lr": float(schedule(step - 1)),
            "grad_norm": float(res["grad_norm"]),
            "tokens_per_s": tokens / dt,
            "rss_mb": _rss_mb(),
            **device_memory_mb(),
        }
        reporter.log(step, last)
        at_end = step == optim_cfg.max_steps
        if data.eval and ((train_cfg.eval_every and step % train_cfg.eval_every == 0) or at_end):
            eval_loss = evaluate(model, data.eval, data_cfg, pad_token_id=pad_token_id, mesh=mesh)
            last["eval_loss"] = eval_loss
            reporter.log(step, {"eval_loss": eval_loss})
        if (train_cfg.save_every and step % train_cfg.save_every == 0) or at_end:
            last_ckpt = unproven = checkpoint()
            if at_end and keep is not None and is_primary():
                prune_checkpoints(out, keep, protect=last_ckpt)  # no next step to prove it: the run's result
        if on_step is not None:
            on_step(last)
    reporter.close()
    elapsed = time.perf_counter() - t_run
    plot = plot_metrics(metrics_file, out / "loss.png") if is_primary() else None
    return {
        **last,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "loss_plot": str(plot) if plot else None,
        "mean_tokens_per_s": tokens_run / max(elapsed, 1e-9),
    }


def _non_finite(step: int, loss: float, grad_norm: float, unproven: Path | None, out: Path) -> str:
    what = f"loss {loss}, gradient norm {grad_norm} at step {step}: the update was not applied and training stopped"
    if unproven is not None and is_primary():
        # Saved right before this step, so it holds the very weights whose loss is not finite.
        aside = set_aside(unproven, "nonfinite")
        what += f"; {unproven.name} holds the weights that produced it and was set aside as {aside.name}"
    barrier("jaxlora non-finite")  # every process's message names the checkpoint left after the rename
    good = latest_checkpoint(out)
    if good is None:
        return what + "; no good checkpoint was written, so there is nothing to resume from"
    return what + f"; the last good checkpoint is {good}: resume from it (e.g. with a lower learning rate)"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (the run was killed while writing it) is dropped
    with a warning, a bad line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise ValueError(f"{path}:{i}: malformed JSON ({e.msg}); only a torn last line is dropped") from None
            warnings.warn(f"{path}:{i}: dropped a torn last line ({line[:40]!r}...)", stacklevel=2)
    return rows


def plot_metrics(metrics_file: Path, png: Path) -> Path | None:
    """Train (and eval) loss against step; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_file)
    train_pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss")
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _device_batch(batch, mesh, packing: bool = False) -> dict:
    arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask}
    if packing:  # several examples per row: the model must keep them apart
        arrays.update(positions=batch.positions, segment_ids=batch.segment_ids)
    return shard_batch(arrays, mesh) if mesh is not None else arrays


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)  # a kill while rewriting must not lose the curve


def _rss_mb() -> float:
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
