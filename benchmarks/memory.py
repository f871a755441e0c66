"""Compiled memory of one QLoRA train step at real model shapes, planned on paper (nothing is allocated).

    python -m benchmarks.memory                          # every shape x seq 512, 2048, 8192, remat full and nested (~20 min)
    python -m benchmarks.memory --shapes llama2-7b --seqs 2048 --remat full,none
    python -m benchmarks.memory --out benchmarks/results  # where committed results live

For each named shape: NF4 + double quantization (QLoRA's recipe, lm_head kept bf16 as transformers does),
bf16 compute, LoRA r=16 alpha=32 on all linear layers, AdamW on the adapters, batch 1. The model,
adapters and optimizer are built under `nnx.eval_shape` (`jaxlora.plan`), the real `train_step` is
compiled by XLA for the CPU backend, and ``memory_analysis()`` gives argument + temp bytes. The floor
beside it: quantized weights + bf16 embeddings/head/norms + adapters + Adam state + one bf16 layer input
per layer (what "full" remat keeps). A depth row compiles 2 and 32 layers of Llama-2-7B: the scanned
model's compile time does not grow with depth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax

from jaxlora.models.config import LlamaConfig
from jaxlora.plan import GiB, StepPlan, plan_step

SHAPES = {  # the architectures of the public checkpoints' config.json
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "mistral-7b": LlamaConfig(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              sliding_window=4096, max_position_embeddings=32768),
    "llama2-13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama2-70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}
SEQS = (512, 2048, 8192)
# The goals (GiB of argument + temp, CPU-compiled).
GOALS = {("llama2-7b", 2048): 5.0, ("llama3-8b", 8192): 12.0, ("llama2-70b", 2048): 44.0}


def row(shape: str, seq: int, remat: str, plan: StepPlan) -> dict:
    return dict(shape=shape, seq=seq, remat=remat, argument_gib=plan.argument / GiB, temp_gib=plan.temp / GiB,
                total_gib=plan.total / GiB, floor_gib=plan.floor / GiB, frozen_gib=plan.frozen / GiB,
                trained_gib=plan.trained / GiB, activations_gib=plan.activations / GiB,
                unaliased_output_gib=plan.output / GiB, tflops=plan.flops / 1e12, compile_s=plan.compile_s,
                goal_gib=GOALS.get((shape, seq)))


def markdown(rows: list[dict], depth: list[dict], info: dict) -> str:
    lines = [f"# Compiled memory of one QLoRA train step ({info['date']}, {info['cpu']}, jax {info['jax']})", "",
             "NF4 + double quant, bf16 compute, LoRA r=16 all-linear, AdamW, batch 1; XLA CPU backend.", "",
             "| shape | seq | remat | argument | temp | **argument + temp** | floor | goal | compile |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        goal = "" if r["goal_gib"] is None else (
            f"≤ {r['goal_gib']:.0f} {'met' if r['total_gib'] <= r['goal_gib'] else 'missed'}")
        lines.append(f"| {r['shape']} | {r['seq']} | {r['remat']} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | "
                     f"**{r['total_gib']:.2f}** | {r['floor_gib']:.2f} | {goal} | {r['compile_s']:.0f} s |")
    if depth:
        lines += ["", "Depth (Llama-2-7B shapes, seq 2048): compile time and temp against the number of layers.", "",
                  "| layers | argument | temp | compile |", "|---:|---:|---:|---:|"]
        lines += [f"| {d['layers']} | {d['argument_gib']:.2f} | {d['temp_gib']:.2f} | {d['compile_s']:.1f} s |"
                  for d in depth]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--seqs", default=",".join(map(str, SEQS)), help="comma-separated sequence lengths")
    p.add_argument("--remat", default="full,nested",
                   help="comma-separated policies: none, full, dots, offload, nested")
    p.add_argument("--no-depth", action="store_true", help="skip the 2-vs-32-layer compile-time row")
    p.add_argument("--out", default="runs/bench", help="directory for the JSON and markdown results")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    seqs = [int(s) for s in args.seqs.split(",")]
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), load_average=os.getloadavg(), jax=jax.__version__,
                backend=jax.default_backend())
    rows = []
    for shape in shapes:
        for seq in seqs:
            for remat in args.remat.split(","):
                t0 = time.perf_counter()
                rows.append(row(shape, seq, remat, plan_step(SHAPES[shape], seq=seq, remat=remat)))
                r = rows[-1]
                print(f"{shape:11s} seq {seq:5d} {remat:7s} argument {r['argument_gib']:6.2f}  temp "
                      f"{r['temp_gib']:6.2f}  total {r['total_gib']:6.2f} GiB  (floor {r['floor_gib']:.2f}; "
                      f"compile {r['compile_s']:.0f} s, {time.perf_counter() - t0:.0f} s)", flush=True)
    depth = []
    if not args.no_depth:
        import dataclasses

        for layers in (2, 32):
            config = dataclasses.replace(SHAPES["llama2-7b"], num_hidden_layers=layers)
            d = row("llama2-7b", 2048, "full", plan_step(config, seq=2048))
            depth.append(dict(layers=layers, **d))
            print(f"depth {layers:2d} layers: temp {d['temp_gib']:.2f} GiB, compile {d['compile_s']:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{info['date'][:10]}_memory"
    stem.with_suffix(".json").write_text(json.dumps(dict(info=info, rows=rows, depth=depth), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, depth, info))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
