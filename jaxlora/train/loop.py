"""The training loop: steps, logging, evaluation, checkpoints, resume, and a stop on a non-finite loss.

It knows the model only as `model(input_ids, attention_mask=...) -> logits` with adapters held as
`nnx.LoRAParam`, and file formats only through the `write_adapter` callback it is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jaxlora.generate import inference_view
from jaxlora.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from jaxlora.train.data import Data, DataConfig, DataState, eval_batches, train_batches
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
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.log_every == 0:
            raise ValueError("log_every=0 must be >= 1")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit={self.save_total_limit} must be >= 1 or None")
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
    """Training produced a NaN or Inf loss; nothing was saved after the last good checkpoint."""


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
    wrt: the variables trained — adapters by default; `nnx.Param` trains a dense model in full (the
    demo pretrains its tiny base this way).
    """
    out = Path(train_cfg.output_dir)
    check_output_dir(out, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    mesh = None
    if jax.device_count() > 1:
        mesh = make_mesh(data=train_cfg.mesh_data, fsdp=train_cfg.mesh_fsdp)
        shard_model(model, mesh)
    optimizer = nnx.Optimizer(model, make_optimizer(optim_cfg), wrt=wrt)
    if train_cfg.offload_optimizer:
        offload_optimizer_state(optimizer)
    schedule = make_schedule(optim_cfg)
    save_adapter = None if write_adapter is None else (lambda path: write_adapter(model, path))

    step, data_state = 0, DataState()
    metrics_file = out / "metrics.jsonl"
    if resume:
        ckpt = latest_checkpoint(out)
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, wrt=wrt)
        step, data_state = meta["step"], DataState.from_dict(meta["data"])
        _truncate_log(metrics_file, step)  # drop what the interrupted run logged after its checkpoint
    elif metrics_file.exists():
        metrics_file.unlink()

    def checkpoint():
        return save_checkpoint(
            out,
            step=step,
            model=model,
            optimizer=optimizer,
            trainer_state={"data": data_state.to_dict(), "run": run_info or {}},
            write_adapter=save_adapter,
            keep=train_cfg.save_total_limit,
            wrt=wrt,
        )

    reporter = Reporter.create(train_cfg.report_to, out, total=optim_cfg.max_steps, log_every=train_cfg.log_every,
                               start_step=step, progress=train_cfg.progress, config=run_info)
    accum = optim_cfg.gradient_accumulation_steps
    stream = train_batches(data.train, data_cfg, pad_token_id=pad_token_id, start=data_state)
    # cached_partial walks the model graph once instead of on every call (~20% of a small step on CPU).
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    model.train()
    last_ckpt, t_run, tokens_run, last = latest_checkpoint(out), time.perf_counter(), 0, {}
    while step < optim_cfg.max_steps:
        t0, losses, tokens = time.perf_counter(), [], 0
        for _ in range(accum):
            batch, data_state = next(stream)
            tokens += int(np.sum(batch.attention_mask))
            res = step_fn(
                _device_batch(batch, mesh, data_cfg.packing), offload_optimizer=train_cfg.offload_optimizer, wrt=wrt
            )
            losses.append(float(res["loss"]))
        step += 1
        loss = float(np.mean(losses))
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
            raise NonFiniteLossError(
                f"loss became {loss} at step {step}; training stopped and nothing was saved after it: {where}"
            )
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
            last_ckpt = checkpoint()
        if on_step is not None:
            on_step(last)
    reporter.close()
    elapsed = time.perf_counter() - t_run
    plot = plot_metrics(metrics_file, out / "loss.png")
    return {
        **last,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "loss_plot": str(plot) if plot else None,
        "mean_tokens_per_s": tokens_run / max(elapsed, 1e-9),
    }


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _rss_mb() -> float:
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
