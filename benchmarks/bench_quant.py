"""Quantize / dequantize a 4096x4096 bf16 weight: jaxlora (jitted) vs bitsandbytes, same process.

    python -m benchmarks.bench_quant [--n 4096] [--repeats 7]

Medians after one warm-up call; bitsandbytes on its CPU backend, torch on all threads (its default,
unlike the parity tests). Ratio = bitsandbytes time / jaxlora time (> 1: jaxlora is faster).
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch

import bitsandbytes.functional as F
from benchmarks.timing import median_time
from jaxlora.quant import dequantize_4bit, quantize_4bit


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}; {os.cpu_count()} cpus; jax {jax.__version__} on {jax.devices()[0].platform}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    w = jax.random.normal(jax.random.key(0), (args.n, args.n), jnp.float32).astype(jnp.bfloat16) * 0.02
    w_t = torch.from_numpy(np.asarray(w).view(np.uint16).copy()).view(torch.bfloat16)

    rows = []
    for compress in (False, True):
        q = jax.jit(lambda a, c=compress: quantize_4bit(a, compress_statistics=c))
        ours = median_time(lambda: jax.block_until_ready(q(w)), args.repeats)
        theirs = median_time(lambda c=compress: F.quantize_4bit(w_t, quant_type="nf4", compress_statistics=c), args.repeats)
        rows.append((f"quantize nf4{' +double quant' if compress else ''}", ours, theirs))
        qt = q(w)
        packed, qs = F.quantize_4bit(w_t, quant_type="nf4", compress_statistics=compress)
        dq = jax.jit(dequantize_4bit)
        ours = median_time(lambda: jax.block_until_ready(dq(qt)), args.repeats)
        theirs = median_time(lambda: F.dequantize_4bit(packed, qs), args.repeats)
        rows.append((f"dequantize nf4{' +double quant' if compress else ''} -> bf16", ours, theirs))

    print(f"# {args.n}x{args.n} bf16 weight, blocksize 64; {machine()}")
    print(f"| {'operation':<34} | jaxlora ms | bnb ms | ratio |")
    print(f"|{'-' * 36}|-----------:|-------:|------:|")
    for name, ours, theirs in rows:
        print(f"| {name:<34} | {ours * 1e3:10.1f} | {theirs * 1e3:6.1f} | {theirs / ours:5.2f} |")


if __name__ == "__main__":
    main()
