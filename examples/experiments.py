"""The seed experiments (project issue 6): rank, alpha/r scaling, memory, target modules, combining adapters.

    python -m examples.experiments [--only rank alpha ...] [--out runs/experiments] [--steps 300]

Each experiment prints a markdown table with a few sentences computed from its numbers and draws a plot
(``<out>/<name>.png``); all tables go to ``<out>/experiments.md`` and the numbers to
``<out>/experiments.json``. Results of experiments not run this time are kept from the previous files,
so the experiments can be run one at a time. The base is the demo's tiny pretrained model, reused from
``--base-out`` (``runs/demo``) when the demo has already saved it with the same recipe.

  rank     r = 4..64, alpha = 2r: trainable params, final loss, held-out accuracy, tokens/s  (seed 000)
  alpha    r = 16 with alpha 1 / 32 / 512 at one learning rate: loss curves                  (seed 000)
  memory   bf16 / 8-bit / NF4 / NF4 + DQ: demo base measured, Llama-2 from shapes            (seed 000)
  targets  attention-only vs all-linear adapters                                              (seed 003)
  combine  "add" + "sub" adapters and add_weighted_adapter (linear, svd)                      (seed 003)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from examples import common
from examples.exp_combine import combine
from examples.exp_lab import Lab, Settings
from examples.exp_memory import memory
from examples.exp_training import alpha, rank, targets

EXPERIMENTS = {"rank": rank, "alpha": alpha, "memory": memory, "targets": targets, "combine": combine}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run these experiments (default: all)")
    p.add_argument("--out", default="runs/experiments", help="tables, plots, runs")
    p.add_argument("--base-out", default="runs/demo", help="where the demo's base is saved (pretrained if absent)")
    p.add_argument("--pretrain-steps", type=int, default=common.BaseRecipe.steps,
                   help="base pretraining steps (the demo's default reuses its base)")
    p.add_argument("--steps", type=int, default=300, help="QLoRA steps per run")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=16)
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems per task")
    return p.parse_args(argv)


def main(argv=None, *, recipe: common.BaseRecipe | None = None) -> dict:
    """Run the chosen experiments; returns {name: Result}. `recipe` overrides the base (tests use a tiny one)."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = common.pretrain_base(Path(args.base_out), recipe or common.BaseRecipe(steps=args.pretrain_steps))
    lab = Lab(Settings(out=out, base_dir=base_dir, steps=args.steps, learning_rate=args.learning_rate,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, eval_size=args.eval_size))
    results = {}
    for name in args.only or EXPERIMENTS:
        print(f"--- experiment {name}", file=sys.stderr)
        results[name] = EXPERIMENTS[name](lab)
        print(results[name].markdown(), flush=True)
    write(out, results)
    return results


def write(out: Path, results: dict) -> None:
    """Merge into experiments.json / .md: this run's results replace earlier ones of the same name."""
    path = out / "experiments.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    for name, r in results.items():
        saved[name] = {"title": r.title, "header": r.header, "rows": r.rows, "notes": r.notes, "plot": r.plot,
                       "markdown": r.markdown(), "settings": r.settings, "data": r.data}
    path.write_text(json.dumps(saved, indent=1, default=str))
    order = [n for n in EXPERIMENTS if n in saved]
    (out / "experiments.md").write_text("# Seed experiments\n\n" + "\n".join(saved[n]["markdown"] for n in order))
    print(f"wrote {out / 'experiments.md'} and {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
