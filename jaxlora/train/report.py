"""Where a run's metrics go: metrics.jsonl (always), TensorBoard, Weights & Biases, and the progress line.

The trainer's logging hook (jaxlora.train.hooks.Log) calls `Reporter.log(step, metrics)` with a train
step's metrics (they hold "loss") or an evaluation's ({"eval_loss": ...}); each backend is a
`MetricsWriter`. `read_metrics` reads metrics.jsonl back, `plot_metrics` draws it. `report_to` takes the
values of transformers' `TrainingArguments.report_to`: "none", "tensorboard", "wandb", or a list.

Tags follow transformers' callbacks: `train/loss`, `train/learning_rate`, `train/grad_norm`,
`train/tokens_per_s`, `eval/loss`, `system/host_peak_rss_mb`, `system/device_memory_mb`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TextIO

import jax

REPORT_TO = ("none", "tensorboard", "wandb")
TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "eval_loss": "eval/loss",
    "rss_mb": "system/host_peak_rss_mb",
    "device_mb": "system/device_memory_mb",
    "device_peak_mb": "system/device_peak_memory_mb",
}


def tag(key: str) -> str:
    return TAGS.get(key, f"train/{key}")


def parse_report_to(value: str | Sequence[str]) -> tuple[str, ...]:
    """The backends asked for, "none" removed; an unknown name is an error that lists the valid ones."""
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to: unknown {unknown}; valid: {list(REPORT_TO)} (or a list of them)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to={list(names)}: 'none' cannot be combined with a backend")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def device_memory_mb() -> dict[str, float]:
    """Device memory in use and its peak (MiB, the fullest local device); empty where the backend keeps
    no statistics (the CPU backend)."""
    stats = [s for s in (d.memory_stats() for d in jax.local_devices()) if s]
    if not stats:
        return {}
    return {
        "device_mb": max(s.get("bytes_in_use", 0) for s in stats) / 2**20,
        "device_peak_mb": max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**20,
    }


class MetricsWriter(Protocol):
    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """One JSON object per call, `{"step": step, **metrics}`, appended to `path`."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars in `logdir` through tensorboardX (no TensorFlow needed), flushed on every write so a killed
    run loses nothing. A resumed run hides what the interrupted run logged after its checkpoint, as
    metrics.jsonl is truncated: TensorBoard purges events from `purge_step` on."""

    def __init__(self, logdir: Path, *, start_step: int = 0, config: dict | None = None):
        try:
            from tensorboardX import SummaryWriter  # the [report] extra
        except ImportError:
            raise ValueError("report_to='tensorboard' needs tensorboardX: pip install 'jaxlora[report]'") from None
        if start_step == 0 and logdir.is_dir():  # a fresh run: an earlier run's curves would mix with ours
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()
        # Event files are named by the second they were opened: a resume in the same second as the run
        # it continues must not overwrite that run's file.
        self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None,
                                    filename_suffix=f".resume-{start_step}" if start_step else "")
        if config and start_step == 0:
            self.writer.add_text("run_config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """A Weights & Biases run in `output_dir/wandb`. Offline unless WANDB_MODE says otherwise or
    WANDB_API_KEY is set (sync an offline run later with `wandb sync`); project from WANDB_PROJECT.
    The run id is kept in `output_dir/wandb_run_id`, so a resumed training run continues its W&B run."""

    def __init__(self, output_dir: Path, *, start_step: int = 0, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise ValueError("report_to='wandb' needs wandb: pip install wandb") from None
        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jaxlora"), name=output_dir.name, id=run_id,
                              resume="allow", dir=str(output_dir), mode=mode, config=config or {})

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({tag(k): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Progress:
    """Step, loss, eval loss, tokens/s, memory and ETA: one line redrawn in place on a terminal, whole
    lines about `lines` times per run (and after each evaluation) when the stream is a file or a pipe."""

    def __init__(self, total: int, *, stream: TextIO | None = None, lines: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.stream, self.clock = total, stream or sys.stderr, clock
        self.tty = self.stream.isatty()
        self.every = max(1, total // lines)
        self.first: tuple[int, float] | None = None  # (step, time) of the first step seen: compile excluded
        self.eval_loss: float | None = None
        self.drawn = False

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if "loss" not in metrics:
            self.eval_loss = metrics.get("eval_loss")
            if not self.tty and self.eval_loss is not None:
                self._emit(f"step {step}/{self.total}  eval loss {self.eval_loss:.4f}")
            return
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        done, t0 = step - self.first[0], self.first[1]
        eta = _duration((now - t0) / done * (self.total - step)) if done else "?"
        mem = (f"dev {metrics['device_mb']:,.0f} MiB" if "device_mb" in metrics
               else f"rss {metrics['rss_mb']:,.0f} MiB" if "rss_mb" in metrics else "")
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        if self.eval_loss is not None:
            parts.append(f"eval {self.eval_loss:.4f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
        line = "  ".join(parts + [mem] * bool(mem) + [f"ETA {eta}"])
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")  # \x1b[K clears what a longer line left
            self.stream.flush()
            self.drawn = True
        elif done == 0 or step == self.total or step % self.every == 0:
            self._emit(line)

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Reporter:
    """Sends each step's metrics to every writer (train metrics every `log_every` steps and at the last
    step, evaluations always) and to the progress display (every step)."""

    def __init__(self, writers: Sequence[MetricsWriter], *, total: int, log_every: int = 1,
                 progress: Progress | None = None):
        self.writers, self.total, self.log_every, self.progress = list(writers), total, log_every, progress

    @classmethod
    def create(cls, report_to: str | Sequence[str], output_dir: Path, *, total: int, log_every: int = 1,
               start_step: int = 0, progress: bool = True, config: dict | None = None,
               write: bool = True) -> Reporter:
        """metrics.jsonl in `output_dir` plus the `report_to` backends; `start_step` > 0 on resume.
        write=False (every process of a multi-process run but the first): progress only, no files."""
        writers: list[MetricsWriter] = [JsonlWriter(output_dir / "metrics.jsonl")] if write else []
        for name in parse_report_to(report_to) if write else ():
            if name == "tensorboard":
                writers.append(TensorBoardWriter(output_dir / "tensorboard", start_step=start_step, config=config))
            else:
                writers.append(WandbWriter(output_dir, start_step=start_step, config=config))
        return cls(writers, total=total, log_every=log_every, progress=Progress(total) if progress else None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "step"}
        if "loss" not in metrics or step % self.log_every == 0 or step == self.total:
            for w in self.writers:
                w.write(step, metrics)
        if self.progress is not None:
            self.progress.write(step, metrics)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.progress is not None:
            self.progress.close()


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


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (a resumed run drops what the interrupted run logged after its
    checkpoint), replacing the file atomically: a kill while rewriting must not lose the curve."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)


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
