"""What every seed experiment shares: the settings, one QLoRA run on the quantized base, results, plots.

A `Lab` loads the base saved by `common.pretrain_base`, trains adapters with `common.finetune` and scores
them with `common.accuracy`; it remembers each run by (LoraConfig, task), so the r=16, alpha=32,
all-linear run that the rank, alpha and targets experiments share is trained once per invocation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
from pathlib import Path

from flax import nnx

import jaxlora
from examples import common, tasks
from jaxlora.targets import find_targets
from jaxlora.train.loop import NonFiniteLossError, read_metrics

TASK_NAMES = {"+": "addition", "-": "subtraction"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    out: Path  # where runs, plots and experiments.md go
    base_dir: Path  # the saved tiny base (common.pretrain_base)
    steps: int = 300  # QLoRA steps per run (the demo's)
    learning_rate: float = 3e-3  # the demo's; the alpha experiment keeps it fixed on purpose
    batch_size: int = 64
    max_seq_len: int = 16
    eval_size: int = 200  # held-out problems per task

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(kw_only=True)
class Result:
    """One experiment: a markdown table, its interpretation, a plot, and the raw numbers for JSON."""

    name: str
    title: str
    header: list[str]
    rows: list[list]  # formatted cells
    notes: str  # 2-3 sentences written from the numbers
    plot: str | None
    data: dict
    settings: dict

    def markdown(self) -> str:
        s = self.settings
        setup = (f"_{s['steps']} QLoRA steps, lr {s['learning_rate']:g}, batch {s['batch_size']}, "
                 f"{s['eval_size']} held-out problems per task, base {s['base_dir']}_\n\n" if "steps" in s else "")
        plot = f"\n\n![{self.name}]({Path(self.plot).name})" if self.plot else ""
        return (f"## {self.title}\n\n{setup}{common.markdown_table(self.header, self.rows)}\n\n"
                f"{self.notes}{plot}\n")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """What one adapter training produced."""

    trainable: int
    total: int
    expected_trainable: int  # r * sum(in + out) over the targeted layers, from the layer shapes
    loss: float  # final train loss (NaN when diverged)
    diverged_at: int | None  # the step whose loss was not finite
    tokens_per_s: float  # median over steps after the first (compilation excluded)
    curve: list[tuple[int, float]]  # (step, train loss)
    accuracy: dict[str, float]  # task name -> held-out exact-match accuracy

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "loss": None if math.isnan(self.loss) else self.loss}


class Lab:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._runs: dict[tuple, Run] = {}

    def base(self, quantization: jaxlora.QuantConfig | None = None):
        """The saved base, loaded quantized (NF4 + double quantization by default, as the demo)."""
        quantization = quantization or jaxlora.QuantConfig(quant_type="nf4", double_quant=True,
                                                           compute_dtype=common.compute_dtype())
        return jaxlora.from_pretrained(str(self.settings.base_dir), quantization=quantization)

    def task(self, op: str) -> tuple[list[dict], list[dict]]:
        """(train, held-out) problems; the demo's addition split for "+"."""
        return tasks.split(tasks.arithmetic(op, seed=1), self.settings.eval_size)

    def finetune(self, model, op: str, out: Path) -> tuple[dict | None, int | None]:
        """Train the active adapter of `model` on task `op`; (summary, None) or (None, step) if it diverged."""
        s = self.settings
        try:
            return common.finetune(model, self.task(op)[0], out, steps=s.steps, learning_rate=s.learning_rate,
                                   batch_size=s.batch_size, max_seq_len=s.max_seq_len), None
        except NonFiniteLossError:  # the loop logs every step, so the bad step follows the last line
            return None, len(curve_of(out)) + 1

    def accuracy(self, model, ops=("+",)) -> dict[str, float]:
        return {TASK_NAMES[op]: common.accuracy(model, self.task(op)[1]) for op in ops}

    def run(self, tag: str, config: jaxlora.LoraConfig, op: str = "+") -> Run:
        """A fresh quantized base + adapter `config`, trained on task `op` and scored on its held-out set."""
        key = (config, op)
        if key in self._runs:
            print(f"{tag}: same run as before, reused", file=sys.stderr)
            return self._runs[key]
        model = self.base()
        expected = sum(t.r * (t.module.in_features + t.module.out_features) for t in find_targets(model, config))
        model = jaxlora.get_peft_model(model, config, rngs=nnx.Rngs(0))
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the tables
            trainable, total = jaxlora.print_trainable_parameters(model)
        out = self.settings.out / "runs" / tag
        summary, diverged_at = self.finetune(model, op, out)
        curve = curve_of(out)
        run = Run(trainable=trainable, total=total, expected_trainable=expected,
                  loss=summary["loss"] if summary else math.nan, diverged_at=diverged_at,
                  tokens_per_s=steady_tokens_per_s(out),
                  curve=curve, accuracy=self.accuracy(model, (op,)))
        self._runs[key] = run
        return run


def curve_of(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def steady_tokens_per_s(out: Path) -> float:
    """Median tokens/s over the steps after the first: the loop's mean includes the first step's
    compilation, which dominates short runs."""
    rates = [r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else math.nan


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return str(path)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_loss(run: Run) -> str:
    return f"diverged (step {run.diverged_at})" if run.diverged_at else f"{run.loss:.4f}"
