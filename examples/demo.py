"""The main job: an offline end-to-end QLoRA demo (`make demo`).

1. Pretrain a tiny byte-level Llama on a generated corpus (counting, copying, comparing — never a sum),
   so the base is a real language model, not noise; save it as a Hugging Face checkpoint.
2. Load it back quantized to NF4 with double quantization (tensor by tensor, bitsandbytes' bytes).
3. Measure its accuracy on held-out additions "a+b=" (a ≤ 99, b ≤ 9: a question the base has never
   seen answered), QLoRA-fine-tune all linear layers on the other additions, and measure again.
4. Report accuracy before/after, base-weight memory (bf16 / 8-bit / NF4 / NF4+DQ, bits per parameter),
   the trainable share, tokens/s; save the PEFT adapter and the loss plot.

With `--model <HF dir or hub id> --data <jsonl>` the same steps 2–4 fine-tune a real checkpoint instead
(accuracy for prompt/completion data, eval loss otherwise); on a GPU the compute dtype becomes bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
from flax import nnx

import jaxlora
from examples import common, tasks
from jaxlora.evaluate import completion_accuracy, eval_loss
from jaxlora.peft_io import save_adapter
from jaxlora.tokenizer import load_tokenizer
from jaxlora.train.data import DataConfig, load_data
from jaxlora.train.records import read_jsonl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="output directory: base, adapter, plots, report (default: runs/demo, or "
                                 "runs/demo-<model name> with --model)")
    p.add_argument("--overwrite", action="store_true", help="replace the report, adapter and fine-tuning run of "
                                                              "an earlier demo in --out (default: refuse)")
    p.add_argument("--model", help="fine-tune this HF model directory / hub id instead of the tiny base")
    p.add_argument("--data", help="JSONL for --model: text, prompt/completion or chat records")
    p.add_argument("--tokenizer", help="with --model: tokenizer directory, hub id or 'byte' (default: the model's)")
    p.add_argument("--steps", type=int, default=300, help="QLoRA fine-tuning steps")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (lora_alpha = 2r)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=16)
    p.add_argument("--eval-size", type=int, default=200,
                   help="held-out rows (at most a fifth of a --data file: the rest is for training)")
    p.add_argument("--pretrain-steps", type=int, default=common.BaseRecipe.steps)
    p.add_argument("--fresh", action="store_true", help="pretrain the base again even if one is saved")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if (args.model is None) != (args.data is None):
        raise SystemExit("demo: --model and --data go together")
    out = Path(args.out or ("runs/demo" if args.model is None else f"runs/demo-{Path(args.model).name}"))
    earlier = [name for name in ("report.json", "adapter", "finetune") if (out / name).exists()]
    if earlier and not args.overwrite:
        raise SystemExit(f"demo: {out} already holds an earlier demo's {', '.join(earlier)}; pass --out DIR for a "
                         "new one, or --overwrite to replace it (make demo ARGS=--overwrite)")
    t_start = time.perf_counter()
    if args.model:  # everything about the data is checked before the (slow) model load
        tok = load_tokenizer(args.tokenizer or args.model)
        base_dir, rows = args.model, [r for _, r in read_jsonl(args.data)]
        n_eval = min(args.eval_size, len(rows) // 5)
        if n_eval < 1:
            raise SystemExit(f"demo: {args.data} has {len(rows)} rows; at least 5 are needed (4 to train on, "
                             "1 held out)")
        if n_eval < args.eval_size:
            print(f"holding out {n_eval} of {len(rows)} rows for evaluation (--eval-size {args.eval_size} would "
                  "leave too few to train on)", file=sys.stderr)
    else:
        out.mkdir(parents=True, exist_ok=True)
        recipe = common.BaseRecipe(steps=args.pretrain_steps)
        base_dir, tok = common.pretrain_base(out, recipe, fresh=args.fresh), common.TOK
        rows, n_eval = tasks.arithmetic("+", seed=1), args.eval_size
    out.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = tasks.split(rows, n_eval)
    scored = all("prompt" in r for r in rows)

    quant = jaxlora.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=common.compute_dtype())
    model = jaxlora.from_pretrained(base_dir, quantization=quant)

    def score() -> dict:
        if scored:
            return {"accuracy": completion_accuracy(model, tok, eval_rows)[0]}
        path = tasks.write_jsonl(eval_rows, out / "eval.jsonl")
        dcfg = DataConfig(path=str(path), max_seq_len=args.max_seq_len, batch_size=args.batch_size, overlong="truncate")
        return {"eval_loss": eval_loss(model, load_data(dcfg, tok).train, dcfg, pad_token_id=tok.pad_token_id or 0)}

    before = score()
    print(f"before fine-tuning: {before}", file=sys.stderr)
    model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=args.r, lora_alpha=2 * args.r), rngs=nnx.Rngs(0))
    trainable, total = jaxlora.print_trainable_parameters(model)
    summary = common.finetune(model, train_rows, out / "finetune", steps=args.steps, learning_rate=args.learning_rate,
                              batch_size=args.batch_size, max_seq_len=args.max_seq_len, tok=tok)
    after = score()
    print(f"after fine-tuning: {after}", file=sys.stderr)
    adapter = save_adapter(model, out / "adapter")
    tok.save(str(adapter))

    bits_nf4_dq, bytes_nf4_dq, linear = common.measured_bits(model)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {jax.default_backend()}, {jax.device_count()} device(s)",
        "base": str(base_dir),
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": 100 * trainable / total,
        "final_train_loss": summary["loss"],
        "tokens_per_s": summary["mean_tokens_per_s"],
        "linear_weights": linear,
        "base_linear_bytes": {name: linear * bits / 8 for name, bits in common.BITS_PER_WEIGHT.items()},
        "measured_nf4_dq_bits_per_weight": bits_nf4_dq,
        "measured_nf4_dq_bytes": bytes_nf4_dq,
        "adapter": str(adapter),
        "loss_plot": summary["loss_plot"],
        "seconds": time.perf_counter() - t_start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report))
    print(render(report))
    return report


def render(r: dict) -> str:
    metric = "accuracy" if "accuracy_before" in r else "eval_loss"
    fmt = (lambda v: f"{100 * v:.1f}%") if metric == "accuracy" else (lambda v: f"{v:.4f}")
    rows = [
        [f"held-out {metric} before QLoRA", fmt(r[f"{metric}_before"])],
        [f"held-out {metric} after QLoRA", fmt(r[f"{metric}_after"])],
        ["trainable parameters", f"{r['trainable_params']:,} of {r['all_params']:,} ({r['trainable_percent']:.2f}%)"],
        ["fine-tuning throughput", f"{r['tokens_per_s']:,.0f} tokens/s"],
        ["final train loss", f"{r['final_train_loss']:.4f}"],
    ]
    rows += [[f"linear weights as {name}", f"{b / 2**10:,.1f} KiB ({8 * b / r['linear_weights']:.3f} bits/param)"]
             for name, b in r["base_linear_bytes"].items()]
    rows.append(["NF4 + DQ measured on the loaded model",
                 f"{r['measured_nf4_dq_bytes'] / 2**10:,.1f} KiB ({r['measured_nf4_dq_bits_per_weight']:.3f} bits/param)"])
    rows.append(["wall time", f"{r['seconds']:.0f} s on {r['machine']}"])
    return common.markdown_table(["", "value"], rows) + f"\n\nadapter: {r['adapter']}  loss plot: {r['loss_plot']}\n"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a bad --model / --data / --tokenizer: one line, not a traceback
        raise SystemExit(f"demo: error: {e}") from None
