"""What a training run does around its steps, one hook each: logging, evaluation, checkpoints, the stop on
a non-finite loss, the loss plot, a caller's callback.

The step loop (`jaxlora.train.loop.Trainer`) calls every hook, in the order given, at three points:
`after_micro_step(state, result)` with each `train_step` result, `after_step(state, metrics, final)` once
per optimizer step (a hook may add to `metrics`: later hooks and the summary see it), and
`at_end(state, summary)` after the last step (a hook may add to `summary`). Order matters where files
do: the metrics line of a step is written before its checkpoint, so a resumed run never misses a step.
The step donates the trained variables and the optimizer state: an adapter or optimizer array a hook takes
from `state` is deleted by the next step (copy it to the host to keep it); the frozen base is not donated.

A checkpoint is good when training can continue from it. The step that computes a non-finite loss or
gradient does not apply its update (see `train_step`), so what is in memory is never corrupted; but the
weights that produced that loss are the previous step's, so a checkpoint of exactly those weights is not
good either: it is set aside (`checkpoint-N.nonfinite`). Older checkpoints are pruned only once the
newest one has been validated by a finite step, so `save_total_limit` never deletes the last good one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flax import nnx

from jaxlora.train.checkpoint import latest_checkpoint, prune_checkpoints, set_aside
from jaxlora.train.distributed import barrier, is_primary
from jaxlora.train.report import Reporter, plot_metrics, truncate_metrics
from jaxlora.train.state import TrainState

METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """A step's loss or gradient norm was NaN or Inf; its update was not applied and the run stopped.
    The message names the last good checkpoint."""


class Hook:
    """A no-op at every point; a hook overrides the points it acts at."""

    def after_micro_step(self, state: TrainState, result: dict) -> None:
        pass

    def after_step(self, state: TrainState, metrics: dict, final: bool) -> None:
        pass

    def at_end(self, state: TrainState, summary: dict) -> None:
        pass


class Log(Hook):
    """Each step's metrics to metrics.jsonl, the `report_to` backends and the progress line (process 0
    alone writes files; every process shows its progress)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    @classmethod
    def open(cls, run_dir: Path, *, report_to, total: int, log_every: int, start_step: int, progress: bool,
             config: dict | None = None) -> Log:
        """A fresh run (`start_step` 0) starts a new metrics.jsonl; a resumed one drops what the
        interrupted run logged after its checkpoint."""
        metrics = run_dir / METRICS
        if is_primary():
            if start_step:
                truncate_metrics(metrics, start_step)
            elif metrics.exists():
                metrics.unlink()
        return cls(Reporter.create(report_to, run_dir, total=total, log_every=log_every, start_step=start_step,
                                   progress=progress, config=config, write=is_primary()))

    def log(self, step: int, metrics: dict) -> None:
        self.reporter.log(step, metrics)

    def after_step(self, state, metrics, final):
        self.log(state.step, metrics)

    def at_end(self, state, summary):
        self.reporter.close()


class Evaluate(Hook):
    """`evaluate(model) -> loss` every `every` steps (0: never) and after the last, as `eval_loss` in the
    step's metrics and its own log line."""

    def __init__(self, evaluate: Callable[[nnx.Module], float], *, every: int, log: Log | None = None):
        self.evaluate, self.every, self.logger = evaluate, every, log

    def after_step(self, state, metrics, final):
        if final or (self.every and state.step % self.every == 0):
            metrics["eval_loss"] = loss = self.evaluate(state.model)
            if self.logger is not None:
                self.logger.log(state.step, {"eval_loss": loss})


class Checkpoint(Hook):
    """checkpoint-N every `every` steps (0: only after the last) and after the last, keeping the newest
    `keep` (None: all) once a finite step has shown the newest to be good; the summary's `checkpoint`."""

    def __init__(self, run_dir: Path, *, every: int, keep: int | None, run_info: dict | None = None,
                 write_adapter: Callable[[nnx.Module, Path], None] | None = None):
        self.run_dir, self.every, self.keep = run_dir, every, keep
        self.run_info, self.write_adapter = run_info, write_adapter
        self.last = latest_checkpoint(run_dir)  # a resumed run's, until this run saves
        self.unproven: Path | None = None  # saved, and no finite step after it yet

    def after_step(self, state, metrics, final):
        if self.unproven is not None and self.keep is not None and is_primary():
            prune_checkpoints(self.run_dir, self.keep, protect=self.unproven)  # a finite step proved it good
        self.unproven = None
        if final or (self.every and state.step % self.every == 0):
            self.last = self.unproven = state.save(self.run_dir, run_info=self.run_info,
                                                   write_adapter=self.write_adapter)
            if final and self.keep is not None and is_primary():
                prune_checkpoints(self.run_dir, self.keep, protect=self.last)  # no next step to prove it

    def after_non_finite(self) -> str:
        """Set aside the checkpoint of the weights that gave a non-finite loss; name the last good one.
        Every process must call it (a collective)."""
        what = ""
        if self.unproven is not None and is_primary():
            # Saved right before this step, so it holds the very weights whose loss is not finite.
            aside = set_aside(self.unproven, "nonfinite")
            what += f"; {self.unproven.name} holds the weights that produced it and was set aside as {aside.name}"
        barrier("jaxlora non-finite")  # every process's message names the checkpoint left after the rename
        good = latest_checkpoint(self.run_dir)
        if good is None:
            return what + "; no good checkpoint was written, so there is nothing to resume from"
        return what + f"; the last good checkpoint is {good}: resume from it (e.g. with a lower learning rate)"

    def at_end(self, state, summary):
        summary["checkpoint"] = str(self.last) if self.last else None


class NonFiniteStop(Hook):
    """Stop on the first micro-step whose loss or gradient norm is not finite (its update was not applied),
    raising NonFiniteLossError; `checkpoints` sets aside the checkpoint that holds those weights."""

    def __init__(self, checkpoints: Checkpoint | None = None):
        self.checkpoints = checkpoints

    def after_micro_step(self, state, result):
        if bool(result["finite"]):
            return
        what = (f"loss {float(result['loss'])}, gradient norm {float(result['grad_norm'])} at step {state.step + 1}: "
                "the update was not applied and training stopped")
        if self.checkpoints is not None:
            what += self.checkpoints.after_non_finite()
        raise NonFiniteLossError(what)


class Plot(Hook):
    """loss.png from metrics.jsonl after the last step (process 0; needs matplotlib): the summary's
    `loss_plot`, None without matplotlib."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def at_end(self, state, summary):
        plot = plot_metrics(self.run_dir / METRICS, self.run_dir / "loss.png") if is_primary() else None
        summary["loss_plot"] = str(plot) if plot else None


class OnStep(Hook):
    """`fn(metrics)` after every step, once the other hooks have logged, evaluated and checkpointed it."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def after_step(self, state, metrics, final):
        self.fn(metrics)
