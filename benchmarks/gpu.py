"""Every GPU figure in one command: ``timeout 540 python -m benchmarks.gpu`` (<= 8 minutes on one H200).

    python -m benchmarks.gpu [--dry-run] [--only exactness,bandwidth,bnb_quant,train] [--budget-s 480]
                             [--out benchmarks/results]

Sections, each in its own process (so jax and torch never share the GPU's memory, and a crash or a
timeout loses that section only; the report records its error):

1. exactness: the compiled kernels vs the jnp path, forward and input gradient (bit-exact on the
   identity; within the float32 reordering bound on random inputs);
2. bandwidth: kernel GB/s at decode shapes (batch 1-16, 4096x4096, 11008x4096, 4096x11008) vs the jnp
   path and a device-to-device copy, and a small tile sweep;
3. bnb_quant: bitsandbytes' CUDA quantize_4bit bytes vs jaxlora's (bnb_backend="cuda" on a GPU);
4. train: QLoRA tokens/s and peak device memory, jaxlora vs PEFT + bitsandbytes (PEFT LoRA over bf16 when
   bitsandbytes is absent), same checkpoint and batches, on a 1B-class and a 7B-shaped 2-layer llama;
   the 7B-shaped step's real peak device memory beside XLA's compiled memory_analysis.

The report (JSON + markdown, ``<date>_<hardware>_gpu``) is rewritten after every section, so a run
killed by its timeout still leaves what it finished. ``--dry-run``: tiny shapes on CPU, a minute at
most, to test this script without a GPU (tests/benchmarks/test_gpu.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import machine

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("exactness", "bandwidth", "bnb_quant", "train")  # the cheap ones first
GiB = 2**30

# Model shapes: a 1B-class llama (TinyLlama-1.1B's) and two layers of Llama-2-7B; vocabularies kept at
# 32000 so both sides' logits cost the same. Random weights, bf16, built from a config: no download.
MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b-shaped-2-layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
TINY_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)


def specs(dry_run: bool) -> dict:
    """What each section runs: full sizes on a GPU, tiny ones for --dry-run."""
    if dry_run:
        return dict(
            exactness=dict(identity_shape=[32, 128], shapes=[[32, 128]], rows=[2]),
            bandwidth=dict(shapes=[[32, 128]], batches=[1], unroll=2, repeats=1, copy_bytes=2**16, jnp_batches=[1],
                           tile_sweep=[[16, 64]], sweep_shapes=["32x128"], sweep_batches=[1]),
            train={"tiny": dict(model=TINY_MODEL, batch=2, seq=32, steps=1, repeats=1, gen_batch=1, prompt_len=8,
                                new_tokens=2, memory_analysis=True)},
            bnb_quant=dict(cases=[[[64, 128], "nf4", True], [[33, 65], "nf4", True], [[64, 128], "fp4", False]]),
        )
    decode = [[4096, 4096], [11008, 4096], [4096, 11008]]
    return dict(
        exactness=dict(identity_shape=[256, 1024], shapes=decode, rows=[1, 512]),
        bandwidth=dict(shapes=decode, batches=[1, 2, 4, 8, 16], unroll=32, repeats=5, copy_bytes=GiB,
                       jnp_batches=[1, 16], tile_sweep=[[16, 256], [16, 512], [32, 512], [64, 256]],
                       sweep_shapes=["4096x4096"], sweep_batches=[1, 16]),
        train={
            "1b": dict(model=MODELS["1b"], batch=4, seq=512, steps=5, repeats=2, gen_batch=1, prompt_len=32,
                       new_tokens=16, memory_analysis=False),
            "7b-shaped-2-layers": dict(model=MODELS["7b-shaped-2-layers"], batch=4, seq=512, steps=5, repeats=2,
                                       gen_batch=1, prompt_len=32, new_tokens=16, memory_analysis=True),
        },
        bnb_quant=dict(cases=[[[4096, 4096], "nf4", True], [[4096, 4096], "fp4", True],
                              [[1001, 999], "nf4", True], [[4096, 4096], "nf4", False]]),
    )


# Per-section time limits (s) on a GPU; a section also never runs past the overall budget.
LIMITS = {"exactness": 60, "bandwidth": 90, "bnb_quant": 45, "train": 280}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: test the script without a GPU")
    ap.add_argument("--only", type=_sections, default=SECTIONS,
                    help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting work after this many seconds")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap.parse_args(argv)


def _sections(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad or value!r}; choose from {','.join(SECTIONS)}")
    return names


def log(msg: str) -> None:
    print(f"[benchmarks.gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(dry_run: bool) -> dict:
    """The children's environment: --dry-run keeps them on the CPU even on a GPU machine."""
    env = dict(os.environ)
    if dry_run:
        env |= {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    return env


def run_process(module: str, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs ``python -m module *args``; its @@RESULT json, or {"error": ...} (exit code, timeout, stderr)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=max(timeout, 1.0), env=env)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"timed out after {timeout:.0f} s: {tail}", "wall_s": time.perf_counter() - t0}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": f"rc {proc.returncode}: {proc.stderr[-2000:]}", "wall_s": time.perf_counter() - t0}
    return json.loads(line[len("@@RESULT "):]) | {"wall_s": time.perf_counter() - t0}


def build_checkpoints(models: dict, directory: Path, timeout: float, env: dict | None = None) -> dict:
    """One bf16 llama checkpoint per model (torch_ref, random weights), in a child process."""
    code = ("import json, sys, torch; from torch_ref import hf_ref; spec = json.loads(sys.argv[1]); "
            "print('@@RESULT ' + json.dumps({n: str(hf_ref.save_tiny_model('llama', d, seed=0, dtype=torch.bfloat16, "
            "max_position_embeddings=2048, **spec['models'][n])) for n, d in spec['dirs'].items()}))")
    dirs = {name: str(directory / name) for name in models}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps({"models": models, "dirs": dirs})],
                              capture_output=True, text=True, cwd=ROOT, timeout=max(timeout, 1.0), env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"building the checkpoints timed out after {timeout:.0f} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": f"building the checkpoints failed (rc {proc.returncode}): {proc.stderr[-2000:]}"}
    return {"dirs": json.loads(line[len("@@RESULT "):]), "wall_s": time.perf_counter() - t0}


def train_section(spec: dict, deadline: float, tmp: Path, env: dict) -> dict:
    """Both sides per model, jaxlora first; each side a `benchmarks._workers` process."""
    built = build_checkpoints({n: s["model"] for n, s in spec.items()}, tmp, _left(deadline, 120), env)
    if "error" in built:
        return built
    out = {}
    for name, s in spec.items():
        side_spec = dict(model_dir=built["dirs"][name], vocab=s["model"]["vocab_size"], r=16, alpha=32, seed=0,
                         remat=False, dtype="bfloat16", cpus=None, torch_quant="auto",
                         **{k: v for k, v in s.items() if k != "model"})
        out[name] = {"spec": {k: v for k, v in side_spec.items() if k != "model_dir"} | {"model": s["model"]}}
        for side in ("jax", "torch"):
            log(f"train {name}: {side} side")
            out[name][side] = run_process("benchmarks._workers", [side, json.dumps(side_spec)], _left(deadline, 150), env)
            log(f"train {name}: {side} side {'failed' if 'error' in out[name][side] else 'done'} "
                f"in {out[name][side].get('wall_s', 0):.0f} s")
    return out


def _left(deadline: float, cap: float) -> float:
    return max(min(cap, deadline - time.monotonic()), 1.0)


def run(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    plan = specs(args.dry_run)
    info = machine()
    report = {"date": info["date"], "dry_run": args.dry_run, "machine": info, "sections": {}, "plan": plan}
    log(f"{'dry run, ' if args.dry_run else ''}sections {','.join(args.only)}; budget {args.budget_s:.0f} s")
    report["paths"] = write_report(report, args.out)
    env = child_env(args.dry_run)
    with tempfile.TemporaryDirectory(prefix="jaxlora-gpu-bench-") as tmp:
        for name in args.only:
            left = args.budget_s - (time.monotonic() - start)
            if left < 5:
                report["sections"][name] = {"error": f"not run: the {args.budget_s:.0f} s budget was spent"}
                continue
            limit = min(left, LIMITS[name] if not args.dry_run else left)
            log(f"section {name} (limit {limit:.0f} s)")
            t0 = time.monotonic()
            try:
                if name == "train":
                    result = train_section(plan["train"], time.monotonic() + limit, Path(tmp), env)
                else:
                    result = run_process("benchmarks._gpu_sections", [name, json.dumps(plan[name])], limit, env)
            except Exception as e:  # a bug of this script: recorded, the next section still runs
                result = {"error": f"{type(e).__name__}: {e}"}
            report["sections"][name] = result
            log(f"section {name}: {'ERROR ' + result['error'][:300] if 'error' in result else 'ok'} "
                f"({time.monotonic() - t0:.0f} s)")
            write_report(report, args.out)
    report["wall_s"] = time.monotonic() - start
    write_report(report, args.out)
    log(f"done in {report['wall_s']:.0f} s: {report['paths']['json']} and .md")
    return report


# --- the report -----------------------------------------------------------------------------------


def hardware(report: dict) -> str:
    """A file-name tag: the accelerator a section saw (e.g. 'nvidia-h200'), else the CPU."""
    for section in report["sections"].values():
        for value in _walk(section):
            if isinstance(value, dict) and value.get("platform") == "gpu" and value.get("device_kind"):
                return _slug(value["device_kind"])
    return _slug(f"{report['machine'].get('cpu') or 'cpu'}-cpu")


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def write_report(report: dict, out: Path) -> dict:
    """Writes <out>/<date>_<hardware>_gpu[-dry-run].{json,md}; returns the two paths."""
    stem = f"{report['date'][:10]}_{hardware(report)}_gpu{'-dry-run' if report['dry_run'] else ''}"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{stem}.json"), "md": str(out / f"{stem}.md")}
    report["paths"] = paths
    Path(paths["json"]).write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(paths["md"]).write_text(markdown(report))
    return paths


def _fmt(v, spec="{:.3g}") -> str:
    return "" if v is None else spec.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# jaxlora GPU benchmark{' (DRY RUN: tiny shapes on CPU, figures meaningless)' if report['dry_run'] else ''}",
             f"- date {report['date']}; host {m.get('cpu')}, {m.get('cpus')} cpus, RAM {m.get('ram')}",
             f"- command: `python -m benchmarks.gpu{' --dry-run' if report['dry_run'] else ''}`; wall "
             f"{_fmt(report.get('wall_s'), '{:.0f}')} s", ""]
    s = report["sections"]
    for name in SECTIONS:
        if name not in s:
            continue
        sec = s[name]
        lines.append(f"## {name}")
        if "error" in sec:
            lines += [f"ERROR: `{sec['error'][:1500]}`", ""]
            continue
        if sec.get("skipped"):
            lines += [f"skipped: {sec['skipped']}", ""]
            continue
        if "device" in sec:
            d = sec["device"]
            lines.append(f"device: {d.get('device_kind')} ({d.get('platform')}), jax {d.get('jax')}")
        lines += _SECTION_TABLES[name](sec) + [""]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def _exactness(sec: dict) -> list[str]:
    out = [f"all within bounds: **{sec.get('all_within_bounds')}**"]
    ident = [r for r in sec["rows"] if "forward_exact" in r]
    rand = [r for r in sec["rows"] if "forward_exact" not in r]
    out += _table(["identity case", "forward bit-exact", "input grad bit-exact", "mismatches fwd / grad"],
                  [[r["case"], r["forward_exact"], r["input_grad_exact"],
                    f"{r['forward_mismatches']} / {r['input_grad_mismatches']}"] for r in ident])
    out += [""] + _table(["random case", "fwd max abs err", "fwd err / bound", "grad max abs err", "grad err / bound"],
                         [[r["case"], r["forward_max_abs_err"], r["forward_max_err_over_bound"],
                           r["input_grad_max_abs_err"], r["input_grad_max_err_over_bound"]] for r in rand])
    return out


def _bandwidth(sec: dict) -> list[str]:
    return [f"device-to-device copy: {sec['copy_gb_s']:.4g} GB/s (read + write of {sec['copy_bytes'] / 2**20:.4g} MiB)"] + _table(
        ["shape (out x in)", "batch", "path", "µs / call", "GB/s", "of copy"],
        [[r["shape"], r["batch"], r["path"], r.get("us"), r.get("gb_s"), r.get("fraction_of_copy", r.get("error"))]
         for r in sec["rows"]])


def _train(sec: dict) -> list[str]:
    out = []
    for name, res in sec.items():
        if name in ("wall_s",):
            continue
        j, t = res.get("jax", {}), res.get("torch", {})
        sp = res.get("spec", {})
        out.append(f"### {name}: llama {sp.get('model')}, batch {sp.get('batch')} x seq {sp.get('seq')}, "
                   f"NF4 + DQ, LoRA r=16 all-linear, AdamW, bf16")
        if "error" in j or "error" in t:
            out += [f"- jaxlora: `{j.get('error', 'ok')[:800]}`", f"- PyTorch: `{t.get('error', 'ok')[:800]}`"]
        torch_name = "PEFT + bitsandbytes" if t.get("quantized", True) else "PEFT LoRA over bf16 (bitsandbytes absent)"
        rows = [["train tokens/s", j.get("train_tokens_per_s"), t.get("train_tokens_per_s")],
                ["device peak GiB (load + train)", _gib(j.get("train_device_peak_bytes")), _gib(t.get("device_peak_bytes"))],
                ["first step s (compile)", j.get("train_first_step_s"), t.get("train_first_step_s")],
                ["first-step loss", j.get("first_loss"), t.get("first_loss")],
                ["generate tokens/s", j.get("gen_tokens_per_s"), t.get("gen_tokens_per_s")],
                ["jaxlora kernels on", j.get("use_kernel"), ""]]
        for r in rows:
            r.append(r[1] / r[2] if isinstance(r[1], (int, float)) and isinstance(r[2], (int, float)) and r[2]
                     and not isinstance(r[1], bool) else "")
        out += _table(["metric", "jaxlora", torch_name, "ratio"], rows)
        if j.get("compiled_temp_size") is not None:
            total = sum(j.get(f"compiled_{k}") or 0 for k in ("argument_size", "output_size", "temp_size")) - (
                j.get("compiled_alias_size") or 0)
            g = {k: _fmt(_gib(j.get(f"compiled_{k}_size"))) for k in ("argument", "output", "alias", "temp")}
            out += ["", f"compiled memory_analysis of the step: arguments {g['argument']} GiB, outputs {g['output']} "
                    f"GiB, aliased {g['alias']} GiB, temp {g['temp']} GiB: total {_fmt(_gib(total))} GiB vs real peak "
                    f"{_fmt(_gib(j.get('train_device_peak_bytes')))} GiB (memory_stats peak_bytes_in_use)"]
        out.append("")
    return out


def _gib(v):
    return None if v is None else v / GiB


def _bnb_quant(sec: dict) -> list[str]:
    keys = ["codes", "absmax", "nested_absmax", "offset"]
    return [f"bitsandbytes {sec.get('bitsandbytes')}"] + _table(
        ["case", "bnb device", "jaxlora bnb_backend"] + [f"{k} identical (differing)" for k in keys],
        [[r["case"], r["bnb_device"], r["jaxlora_bnb_backend"]]
         + [f"{r[k + '_identical']} ({r.get(k + '_differing', '')})" if k + "_identical" in r else "" for k in keys]
         for r in sec["rows"]])


_SECTION_TABLES = {"exactness": _exactness, "bandwidth": _bandwidth, "train": _train, "bnb_quant": _bnb_quant}


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(Path(report["paths"]["md"]).read_text())


if __name__ == "__main__":
    main()
