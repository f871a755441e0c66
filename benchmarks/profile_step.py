"""Where the compiled QLoRA train step spends its time: per-op (per-fusion) times from a jax.profiler trace.

    python -m benchmarks.profile_step [--size h1024] [--dtype bfloat16] [--steps 3] [--cpus 0] [--out runs/profile]
    XLA_FLAGS=... python -m benchmarks.profile_step --time 8 --cpus 0   # only step times: min / median of 8

Builds the benchmark's model (benchmarks.run SIZES, NF4 + double quant, LoRA r=16 all-linear, AdamW), takes
two warm-up steps, traces `--steps` steps with ``jax.profiler.trace(create_perfetto_trace=True)`` and sums
the duration of every XLA CPU thunk (one per fusion, dot, copy...) by name. Each name is looked up in the
compiled HLO (``compiled.as_text()``) for its kind (what the fusion computes) and its source (the jax op
in its metadata). Prints markdown: the kinds' totals and the top ops, in ms per step and share of the
step's wall time; writes the table, the raw sums (.json) and the HLO text under --out.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path


def thunk_times(trace_dir: Path) -> dict[str, float]:
    """Sum of the durations (seconds) of each named event of the perfetto trace under `trace_dir`."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    sums: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            sums[e["name"]] += e["dur"] * 1e-6
    return dict(sums)


def hlo_index(hlo: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (kind, source) for the compiled HLO's instructions. kind: the instruction's op,
    or for a fusion the ops of its fused computation that cost (dot, gather, transpose, convert, reduce...)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = head.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    costly = ("dot", "gather", "transpose", "convert", "reduce", "copy", "dynamic-slice", "dynamic-update-slice",
              "scatter", "select", "exponential", "concatenate", "pad", "reduce-window")
    index = {}
    for lines in bodies.values():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .+? ([a-z][\w\-]*)\((.*)$", line)
            if not m:
                continue
            name, op, rest = m.groups()
            src = re.search(r'op_name="([^"]*)"', rest)
            kind = op
            if op == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", rest).group(1)
                ops = {re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = .+? ([a-z][\w\-]*)\(", x).group(1)
                       for x in bodies.get(callee, ()) if re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = .+? [a-z][\w\-]*\(", x)}
                kind = "fusion[" + ",".join(sorted(o for o in ops if o in costly)) + "]"
            index[name] = (kind, src.group(1) if src else "")
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="h1024")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpus", type=lambda v: [int(c) for c in v.split(",")], default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/profile"))
    ap.add_argument("--time", type=int, default=0, metavar="N",
                    help="no trace: print the min and median wall time of N steps (to compare XLA_FLAGS or a change)")
    args = ap.parse_args()
    if args.cpus:  # before jax starts its thread pool
        os.sched_setaffinity(0, args.cpus)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.run import SIZES
    from jaxlora.peft_model import get_peft_model
    from jaxlora.lora_config import LoraConfig
    from jaxlora.models.config import LlamaConfig
    from jaxlora.models.llama import LlamaForCausalLM
    from jaxlora.models.loading import from_pretrained, save_pretrained
    from jaxlora.models.quantize import QuantConfig
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import donating_train_step

    size = SIZES[args.size]
    cd = jnp.dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(max_position_embeddings=1024, **size["model"])
        path = save_pretrained(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), Path(tmp) / "m")
        model = from_pretrained(path, dtype=cd, compute_dtype=cd,
                                quantization=QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=cd))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), rngs=nnx.Rngs(0))
    opt_cfg = OptimizerConfig(learning_rate=2e-4, lr_scheduler_type="constant", max_grad_norm=1.0)
    optimizer = nnx.Optimizer(model, make_optimizer(opt_cfg), wrt=nnx.LoRAParam)
    ids = jax.random.randint(jax.random.key(0), (size["batch"], size["seq"]), 3, cfg.vocab_size, jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones(ids.shape, jnp.int32), "loss_mask": jnp.ones(ids.shape, bool)}
    step = donating_train_step.bind(model, optimizer)  # as jaxlora.train.loop runs it
    for _ in range(2):
        float(step(batch)["loss"])
    if args.time:
        times = []
        for _ in range(args.time):
            t0 = time.perf_counter()
            float(step(batch)["loss"])
            times.append(time.perf_counter() - t0)
        print(json.dumps({"size": args.size, "dtype": args.dtype, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "min_s": min(times), "median_s": sorted(times)[len(times) // 2],
                          "load": os.getloadavg()[0]}))
        return
    hlo = donating_train_step.lower(model, optimizer, batch).compile().as_text()

    out = args.out / f"{args.size}_{args.dtype}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.hlo.txt").write_text(hlo)
    trace = out / "trace"
    t0 = time.perf_counter()
    with jax.profiler.trace(str(trace), create_perfetto_trace=True):
        for _ in range(args.steps):
            float(step(batch)["loss"])
    wall = (time.perf_counter() - t0) / args.steps
    sums = {k: v / args.steps for k, v in thunk_times(trace).items()}
    index = hlo_index(hlo)
    # A while loop's event spans its body's ops, which have their own events: leave the containers out.
    ops = {k: v for k, v in sums.items() if k in index and index[k][0] not in ("while", "conditional", "call")}
    kinds: dict[str, float] = collections.defaultdict(float)
    for k, v in ops.items():
        kinds[index[k][0]] += v
    load = os.getloadavg()
    lines = [f"# profile of the train step: {args.size} {size['model']}, batch {size['batch']} x seq {size['seq']}, "
             f"{args.dtype}, cpus {args.cpus or 'all'}", "",
             f"step wall time {wall * 1e3:.0f} ms (traced, mean of {args.steps}); XLA ops sum to "
             f"{sum(ops.values()) * 1e3:.0f} ms; load average {load[0]:.2f}", "",
             "| kind | ms / step | share of step |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {100 * v / wall:.1f}% |" for k, v in sorted(kinds.items(), key=lambda x: -x[1])[:15]]
    lines += ["", "| op | kind | ms / step | share | source (jax op) |", "|---|---|---:|---:|---|"]
    for k, v in sorted(ops.items(), key=lambda x: -x[1])[: args.top]:
        kind, src = index[k]
        lines.append(f"| {k} | {kind} | {v * 1e3:.1f} | {100 * v / wall:.1f}% | {src[-90:]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "profile.md").write_text(text)
    (out / "profile.json").write_text(json.dumps({"wall_s": wall, "ops_s": ops, "index": {k: index[k] for k in ops},
                                                  "other_events_s": {k: v for k, v in sums.items() if k not in index}},
                                                 indent=1))


if __name__ == "__main__":
    main()
