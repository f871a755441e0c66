"""Side-by-side benchmark: jaxlora vs transformers + bitsandbytes + PEFT on the same model and data.

    python -m benchmarks.run [--size tiny[,h512,h1024,small,7b-l2,7b-l4] | all] [--dtype bfloat16|float32|both]
                             [--steps N] [--repeats R] [--[no-]remat] [--no-quant] [--cpus 0] [--out runs/bench]

Per size: builds a llama checkpoint from a transformers config (no network), then runs each side in its
own process (benchmarks/_workers.py), so that each peak RSS is that side's alone, and (not at 7B) a second
jaxlora process that loads and trains again (no generation) with the persistent compilation cache the first
one filled. Sizes that differ only in depth (7b-l2, 7b-l4) also give each side's peak RSS per layer added.
Prints a summary (tokens/s, ratio, fraction of this CPU's measured one-core f32 matmul peak that
each side reaches), a table per size (tokens/s, peak host RSS, generation, compile times), and
bench_quant's 4096x4096 quantize / dequantize throughput. Results go to
<out>/<date>_<hardware>_<sizes>.{json,md}. How to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.per_layer import per_layer_section

# Model shapes: every linear in-features is a multiple of the blocksize 64, so bitsandbytes' AVX512
# dequantize bug (spec bnb-4bit.md, "Known bnb bug") cannot touch the PyTorch side.
SIZES = {
    "tiny": dict(model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=2048),
                 batch=4, seq=128, gen_batch=1, prompt_len=32, new_tokens=32),
    # Wider, same depth and tokens per step, so that the ratio's trend with width is visible (issue 16).
    "h512": dict(model=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=8192),
                 batch=4, seq=128, gen_batch=1, prompt_len=32, new_tokens=32),
    "h1024": dict(model=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                             num_key_value_heads=8, vocab_size=8192),
                  batch=4, seq=128, gen_batch=1, prompt_len=32, new_tokens=32),
    "small": dict(model=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=8192),
                  batch=8, seq=256, gen_batch=4, prompt_len=64, new_tokens=64),
}
# Llama-2-7B's layers, 2 and 4 of them, one sequence of 2048 (issue 10): (RSS(7b-l4) - RSS(7b-l2)) / 2 is what
# each layer adds to a side's training peak, the figure that scales to 32 layers. A CPU step here takes minutes:
# gradient checkpointing on (as a 7B is trained), one warm-up and one timed step, no generation, no 2nd process;
# a bf16 checkpoint (2.2 GB at 4 layers), which both sides load the same way.
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096)
AT_7B = dict(batch=1, seq=2048, gen_batch=1, prompt_len=0, new_tokens=0, remat=True, steps=1, repeats=1, warmup=1,
             second_process=False, checkpoint_dtype="bfloat16")
SIZES |= {f"7b-l{n}": dict(model=LLAMA2_7B | dict(num_hidden_layers=n), **AT_7B) for n in (2, 4)}
# What a size does not say: the harness's defaults; --steps, --repeats, --[no-]remat override every size's.
RUN_DEFAULTS = dict(remat=False, steps=4, repeats=3, warmup=2, second_process=True, checkpoint_dtype="float32")
GOALS = {"train_speed": 1.5, "train_rss": 0.7}  # CPU goals: >= 1.5x PyTorch tokens/s at <= 0.7x its peak RSS
MiB = 2**20


def machine() -> dict:
    def first(path, key):
        try:
            with open(path) as f:
                return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith(key))
        except (OSError, StopIteration):
            return None

    return dict(
        cpu=first("/proc/cpuinfo", "model name") or platform.processor(), cpus=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)), ram=first("/proc/meminfo", "MemTotal"),
        load_average=[round(x, 2) for x in os.getloadavg()], python=platform.python_version(),
        platform=platform.platform(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), date=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def save_model(size: dict, directory: Path, checkpoint_dtype: str) -> dict:
    """Writes the size's checkpoint in a child process; {"model_dir", "save_s", "checkpoint_bytes"} or {"error"}."""
    cfg = dict(max_position_embeddings=1024) | size["model"]
    for n in (cfg["hidden_size"], cfg["intermediate_size"]):
        assert n % 64 == 0, "linear in-features must be multiples of 64 (bnb AVX512 dequantize bug)"
    return run_side("save", dict(directory=str(directory), seed=0, checkpoint_dtype=checkpoint_dtype, model=cfg))


def settings(size: dict, args) -> dict:
    """The run settings of one size: the command line's where given, else the size's, else RUN_DEFAULTS."""
    given = {k: getattr(args, k) for k in ("remat", "steps", "repeats") if getattr(args, k) is not None}
    return {k: size.get(k, v) for k, v in RUN_DEFAULTS.items()} | given


def run_side(side: str, spec: dict) -> dict:
    """Runs one side in a fresh process; its result, or {"error": ...} with the tail of its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks._workers", side, json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": f"{side} side failed (rc {proc.returncode}): " + proc.stderr[-2000:]}
    load = os.getloadavg()[0]  # the 1-minute average: about this side's run, on a shared machine
    print(f"  {side:<5} side done in {time.perf_counter() - t0:.0f} s (load {load:.2f})", file=sys.stderr)
    return json.loads(line[len("@@RESULT "):]) | {"wall_s": time.perf_counter() - t0, "load_1min": load}


def table(results: dict) -> list[str]:
    """Markdown rows: metric | jaxlora | PyTorch | jaxlora / PyTorch."""
    rows = ["| metric | jaxlora | PyTorch | jaxlora / PyTorch |", "|---|---:|---:|---:|"]

    def row(name, a, b, fmt="{:.1f}", goal=None):
        if a is None or b is None:
            return
        ratio = a / b if b else float("nan")
        mark = "" if goal is None else (" (goal met)" if goal(ratio) else " (goal missed)")
        rows.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}{mark} |")

    for dtype, pair in results["train"].items():
        j, t = pair["jax"], pair["torch"]
        if "error" in j or "error" in t:
            rows.append(f"| {dtype}: error | {j.get('error', 'ok')[:200]} | {t.get('error', 'ok')[:200]} | |")
            continue
        row(f"{dtype} train tokens/s (higher is better)", j["train_tokens_per_s"], t["train_tokens_per_s"],
            goal=lambda r: r >= GOALS["train_speed"])
        row(f"{dtype} train peak RSS MiB (lower is better)", j["train_peak_rss"] / MiB, t["train_peak_rss"] / MiB,
            "{:.0f}", goal=lambda r: r <= GOALS["train_rss"])
        row(f"{dtype} train peak RSS, timed steps only (after compile) MiB", j["train_timed_peak_rss"] / MiB,
            t["train_timed_peak_rss"] / MiB, "{:.0f}")
        row(f"{dtype} train peak RSS above imports MiB", (j["train_peak_rss"] - j["rss_after_import"]) / MiB,
            (t["train_peak_rss"] - t["rss_after_import"]) / MiB, "{:.0f}")
        row(f"{dtype} RSS after imports MiB", j["rss_after_import"] / MiB, t["rss_after_import"] / MiB, "{:.0f}")
        row(f"{dtype} process peak RSS MiB (load+train+generate)", j["process_peak_rss"] / MiB,
            t["process_peak_rss"] / MiB, "{:.0f}")
        if j["device_peak_bytes"] is not None and t["device_peak_bytes"] is not None:
            row(f"{dtype} device peak MiB", j["device_peak_bytes"] / MiB, t["device_peak_bytes"] / MiB, "{:.0f}")
        row(f"{dtype} first train step s (compile; excluded)", j["train_first_step_s"], t["train_first_step_s"],
            "{:.2f}")
        cached = pair.get("jax_cached", {})
        if "train_first_step_s" in cached:  # a second jaxlora process, against the same PyTorch figures
            row(f"{dtype} 2nd process (compilation cache filled): first train step s", cached["train_first_step_s"],
                t["train_first_step_s"], "{:.2f}")
            row(f"{dtype} 2nd process: train peak RSS MiB", cached["train_peak_rss"] / MiB, t["train_peak_rss"] / MiB,
                "{:.0f}", goal=lambda r: r <= GOALS["train_rss"])
            row(f"{dtype} 2nd process: train tokens/s", cached["train_tokens_per_s"], t["train_tokens_per_s"],
                goal=lambda r: r >= GOALS["train_speed"])
        row(f"{dtype} first-step loss (same model: should agree)", j["first_loss"], t["first_loss"], "{:.4f}")
        row(f"{dtype} generate tokens/s (higher is better)", j["gen_tokens_per_s"], t["gen_tokens_per_s"])
        row(f"{dtype} first generate call s (compile; excluded)", j["gen_first_call_s"], t["gen_first_call_s"],
            "{:.2f}")
    for dtype, pair in results["train"].items():
        j = pair["jax"]
        if "train_dispatch_s_per_step" in j:
            step = results["spec"]["batch"] * results["spec"]["seq"] / j["train_tokens_per_s"]
            rows.append(f"| {dtype} jaxlora Python time per step (of a {step * 1e3:.0f} ms step) | "
                        f"{j['train_dispatch_s_per_step'] * 1e3:.1f} ms | | |")
    quant = results.get("quant") or {}
    if "error" in quant:
        rows.append(f"| quant: error | {quant['error'][:200]} | | |")
    for name, ours, theirs in quant.get("rows", []):
        n2 = results["spec"]["quant_n"] ** 2 / 1e6
        row(f"{name} Mparams/s (vs bitsandbytes)", n2 / ours, n2 / theirs, "{:.0f}")
    return rows


def peak_rows(results: dict) -> list[str]:
    """The summary: per size and dtype, tokens/s of both sides, their ratio, the step's FLOPs and the
    fraction of the measured one-core f32 matmul peak each side reaches (both sides do the same matmuls,
    so the jaxlora program's count stands for both)."""
    peak = (results.get("peak") or {}).get("peak_flops")
    rows = ["| size | dtype | jaxlora tok/s | PyTorch tok/s | jaxlora / PyTorch | step GFLOP (dots) | "
            "jaxlora % of peak | PyTorch % of peak |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, res in results["sizes"].items():
        tokens = res["spec"]["batch"] * res["spec"]["seq"]
        for dtype, pair in res["train"].items():
            j, t = pair["jax"], pair["torch"]
            if "error" in j or "error" in t:
                rows.append(f"| {size} | {dtype} | error | error | | | | |")
                continue
            flops = j.get("step_flops")
            frac = (lambda tps: f"{100 * flops * tps / tokens / peak:.1f}") if flops and peak else (lambda tps: "")
            gflop = f"{flops / 1e9:.1f}" if flops else ""
            a, b = j["train_tokens_per_s"], t["train_tokens_per_s"]
            rows.append(f"| {size} | {dtype} | {a:.0f} | {b:.0f} | {a / b:.2f} | {gflop} | {frac(a)} | {frac(b)} |")
    return rows


def run_size(name: str, args, tmp: Path) -> dict:
    size = SIZES[name]
    run = settings(size, args)
    print(f"# {name}: {size['model']}, batch {size['batch']} x seq {size['seq']}, {run}; "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    checkpoint = save_model(size, tmp / name, run["checkpoint_dtype"])
    if "error" in checkpoint:
        raise RuntimeError(f"{name}: writing the checkpoint failed: {checkpoint['error']}")
    spec = dict(model_dir=checkpoint["model_dir"], vocab=size["model"]["vocab_size"], r=16, alpha=32, seed=0,
                quant_n=args.quant_n, cpus=args.cpus, **{k: run[k] for k in ("steps", "repeats", "remat", "warmup")},
                **{k: size[k] for k in ("batch", "seq", "gen_batch", "prompt_len", "new_tokens")})
    result = {"spec": {k: v for k, v in spec.items() if k != "model_dir"} | {"model": size["model"]}, "train": {},
              "checkpoint": {k: v for k, v in checkpoint.items() if k != "model_dir"}
              | {"dtype": run["checkpoint_dtype"]}}
    dtypes = ("bfloat16", "float32") if args.dtype == "both" else (args.dtype,)
    for dtype in dtypes:
        # A fresh compilation cache per size and dtype: the first jaxlora process compiles (and fills it),
        # the second loads its programs from it; the difference is what the cache saves a second run.
        cache = dict(compilation_cache=str(tmp / f"xla-cache-{name}-{dtype}"))
        pair = {side: run_side(side, spec | {"dtype": dtype} | cache) for side in ("jax", "torch")}
        if run["second_process"]:
            pair["jax_cached"] = run_side("jax", spec | {"dtype": dtype, "train_only": True} | cache)
        result["train"][dtype] = pair
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", type=lambda v: sorted(SIZES) if v == "all" else v.split(","),
                    help=f"comma-separated sizes of {sorted(SIZES)}, or all (default tiny: ~3 min on 2 cores)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "both"), default="both",
                    help="compute dtype of both sides (QLoRA uses bfloat16)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"train steps per timed repeat (default {RUN_DEFAULTS['steps']}; 1 at 7B)")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed repeats; the median is reported (default {RUN_DEFAULTS['repeats']}; 1 at 7B)")
    ap.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                    help="gradient checkpointing on both sides (default: off, on at 7B)")
    ap.add_argument("--no-quant", action="store_true", help="skip the 4096x4096 quantize / dequantize rows")
    ap.add_argument("--quant-n", type=int, default=4096)
    ap.add_argument("--cpus", type=lambda v: [int(c) for c in v.split(",")], default=None,
                    help="pin both sides to these CPU ids, e.g. 0 or 0,1 (default: all usable CPUs)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"),
                    help="where the .json and .md results go (default: runs/bench, git-ignored; the README's "
                         "figures are the files committed under benchmarks/results)")
    args = ap.parse_args()
    unknown = [n for n in args.size if n not in SIZES]
    if unknown:
        ap.error(f"--size {','.join(unknown)}: not a size; valid: {', '.join(sorted(SIZES))} or all")

    info = machine()
    print(f"# sizes {args.size}; {info['cpu']}, {info['cpus_usable']} cpus usable, load {info['load_average']}",
          file=sys.stderr)
    results = {"machine": info, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="jaxlora-bench-") as tmp:
        for name in args.size:
            results["sizes"][name] = run_size(name, args, Path(tmp))
    base = {"quant_n": args.quant_n, "repeats": args.repeats or RUN_DEFAULTS["repeats"], "cpus": args.cpus}
    results["peak"] = run_side("peak", base)
    if not args.no_quant:
        results["quant"] = run_side("quant", base)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    first = next(iter(results["sizes"].values()))
    pair = next(iter(first["train"].values()))
    backends = [pair[s].get("backend", "?") for s in ("jax", "torch")]
    loads = [pair_side["load_1min"] for res in results["sizes"].values() for p in res["train"].values()
             for pair_side in p.values() if "load_1min" in pair_side]
    peak = results["peak"]

    header = [f"# jaxlora vs PyTorch, sizes {', '.join(args.size)}, {info['date']}",
              f"- machine: {info['cpu']}, {info['cpus_usable']} cpus usable of {info['cpus']}, RAM {info['ram']}; "
              f"load average {info['load_average']} at start, {info['load_average_end']} at end"
              + (f", 1-min load at the end of each side {min(loads):.2f}-{max(loads):.2f}" if loads else ""),
              f"- jaxlora: {backends[0]}; PyTorch: {backends[1]}; CPUs pinned: {args.cpus or 'no'}",
              f"- CPU peak (stated, measured): {peak.get('peak_flops', 0) / 1e9:.0f} GFLOP/s = the faster of a "
              f"{peak.get('n')}^3 f32 matmul in jax and in torch on one core ({peak.get('detail')})",
              f"- NF4 + double quant, blocksize 64; LoRA r=16, alpha=32, all-linear; AdamW lr 2e-4, clip 1.0; "
              f"train: medians of the timed repeats after the warm-up steps (per size, below); generate: greedy",
              f"- quantize/dequantize: {args.quant_n}x{args.quant_n} bf16 (benchmarks/bench_quant.py), "
              f"medians of {base['repeats']}", "", *peak_rows(results), "", *per_layer_section(results)]
    devices = {pair[s]["device"] for s in ("jax", "torch") if "device" in pair[s]}
    if len(devices) > 1:  # e.g. a CUDA jaxlib beside a CPU-only torch: the ratios would mean nothing
        header.insert(1, f"- WARNING: the sides ran on different devices {sorted(devices)}; ratios are not comparable")
    body = []
    for name, res in results["sizes"].items():
        m, sp = res["spec"]["model"], res["spec"]
        gen = (f"generate batch {sp['gen_batch']}, prompt {sp['prompt_len']}, {sp['new_tokens']} new tokens"
               if sp["new_tokens"] else "no generation")
        ck = res["checkpoint"]
        body += [f"## {name}: llama {m}, train batch {sp['batch']} x seq {sp['seq']}, remat {sp['remat']}, "
                 f"{sp['warmup']} warm-up + {sp['repeats']} x {sp['steps']} timed steps; {gen}; checkpoint "
                 f"{ck['dtype']} {ck['checkpoint_bytes'] / 1e9:.2f} GB, written in {ck['save_s']:.0f} s", "",
                 *table(res | {"quant": results.get("quant") if name == args.size[-1] else None}), ""]
    text = "\n".join(header + body)
    print(text)
    ncpu = len(args.cpus) if args.cpus else info["cpus_usable"]
    gpu = "gpu" if " on gpu" in backends[0] or " on cuda" in backends[1] else "cpu"
    hw = re.sub(r"[^a-z0-9]+", "-", f"{info['cpu']}-{ncpu}c-{gpu}".lower()).strip("-")
    stem = f"{info['date'][:10]}_{hw}_{'+'.join(args.size)}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
