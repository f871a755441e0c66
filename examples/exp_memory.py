"""Seed 000's memory table, redone: base-weight memory of bf16 / 8-bit blockwise / NF4 / NF4 + DQ,
(a) measured on the demo base's QuantizedTensors and (b) for Llama-2 7B/13B/70B from their shapes."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

import jaxlora
from examples import common
from examples.exp_lab import Lab, Result, pyplot, save

# Seed 000's table (GB): parameters x nominal bytes, no quantization constants, everything quantized.
SEED_GB = {
    "FP32": {"7B": 28, "13B": 52, "70B": 280},
    "FP16": {"7B": 14, "13B": 26, "70B": 140},
    "INT8": {"7B": 7, "13B": 13, "70B": 70},
    "INT4": {"7B": 3.5, "13B": 6.5, "70B": 35},
}
# Our format -> the seed's row it corresponds to.
SEED_ROW = {"fp32": "FP32", "bf16": "FP16", "8-bit blockwise": "INT8", "NF4": "INT4", "NF4 + DQ": "INT4"}
# Our format -> how the demo base is loaded to measure it (bf16 is not a quantized format: from shapes).
LOADS = {
    "8-bit blockwise": {"quant_type": "dynamic8", "double_quant": False},
    "NF4": {"quant_type": "nf4", "double_quant": False},
    "NF4 + DQ": {"quant_type": "nf4", "double_quant": True},
}


def _other_params(model) -> int:
    """Parameters outside the quantized linears: embeddings, lm_head (kept dense, as bitsandbytes), norms."""
    return sum(math.prod(x.shape) for x in nnx.to_flat_state(nnx.state(model, nnx.Param)).leaves)


def demo_rows(lab: Lab) -> tuple[list[dict], int, int]:
    """(one row per format, linear weights, other parameters) for the demo base."""
    measured = {}
    for name, kw in LOADS.items():
        model = lab.base(jaxlora.QuantConfig(**kw, compute_dtype=common.compute_dtype()))
        bits, nbytes, linear = common.measured_bits(model)
        measured[name] = (bits, nbytes)
    other = _other_params(model)  # the same in every load
    rows = []
    for name, bits in common.BITS_PER_WEIGHT.items():
        measured_bits, nbytes = measured.get(name, (None, linear * bits / 8))  # bf16: from the shapes
        rows.append({"format": name, "bits": bits, "measured_bits": measured_bits, "linear_bytes": nbytes,
                     "total_bytes": nbytes + 2 * other})
    return rows, linear, other


def llama_rows() -> list[dict]:
    rows = []
    for size, shape in common.LLAMA_SHAPES.items():
        linear, other = common.llama_param_counts(*shape)
        formats = [("fp32", 4 * (linear + other) / 2**30, 32.0)] + common.memory_rows(linear, other)
        for name, gib, bits in formats:
            rows.append({"model": size, "format": name, "params": linear + other, "linear": linear, "other": other,
                         "bits": bits, "gib": gib, "gb": gib * 2**30 / 1e9, "seed_gb": SEED_GB[SEED_ROW[name]][size]})
    return rows


def memory(lab: Lab) -> Result:
    demo, linear, other = demo_rows(lab)
    llama = llama_rows()
    header = ["model", "format", "bits / linear weight", "measured bits / weight", "size", "seed 000 says"]
    rows = [["demo base", d["format"], f"{d['bits']:.3f}",
             "-" if d["measured_bits"] is None else f"{d['measured_bits']:.3f}",
             f"{d['linear_bytes'] / 2**10:,.1f} KiB linear + {2 * other / 2**10:,.1f} KiB other (bf16)", "-"]
            for d in demo]
    rows += [[f"Llama-2 {r['model']}", r["format"], f"{r['bits']:.3f}", "-",
              f"{r['gb']:.2f} GB = {r['gib']:.2f} GiB", f"{r['seed_gb']:g} GB ({SEED_ROW[r['format']]})"]
             for r in llama]
    by = {(r["model"], r["format"]): r for r in llama}
    b7, q7 = by[("7B", "bf16")], by[("7B", "NF4 + DQ")]
    absmax_gb = q7["linear"] * (q7["bits"] - 4) / 8 / 1e9
    dense_gb = 2 * q7["other"] / 1e9
    nf4dq = next(d for d in demo if d["format"] == "NF4 + DQ")
    notes = (
        f"Measured on the demo base, NF4 + DQ stores {nf4dq['measured_bits']:.3f} bits per linear weight "
        f"(4-bit codes + 8-bit absmax per 64 + an fp32 scale per 256 blocks), against "
        f"{common.BITS_PER_WEIGHT['NF4']:.3f} for plain NF4 and {common.BITS_PER_WEIGHT['8-bit blockwise']:.3f} "
        f"for 8-bit; the {other:,} embedding, lm_head and norm parameters ({other / (linear + other):.0%} of "
        f"the base) stay bf16 and are {2 * other / nf4dq['total_bytes']:.0%} of the NF4 + DQ total. "
        f"The seed's figures are nominal (7e9 x bytes): Llama-2 7B really has {b7['params'] / 1e9:.2f}B "
        f"parameters, so bf16 is {b7['gb']:.2f} GB, not 14; at 4 bits our {q7['gb']:.2f} GB vs the seed's 3.5 "
        f"is {q7['linear'] / 2e9:.2f} GB of 4-bit codes for the {q7['linear'] / 1e9:.2f}B linear weights, "
        f"{absmax_gb:.2f} GB of absmax constants (the 0.127 bit/weight that DQ leaves; 0.5 without it) and "
        f"{dense_gb:.2f} GB for embeddings, lm_head and norms kept in bf16. "
        f"GiB (2^30 bytes) read 7% lower than GB (10^9): {q7['gb']:.2f} GB = {q7['gib']:.2f} GiB."
    )
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [d["format"] for d in demo]
    a.bar(names, [d["linear_bytes"] / 2**10 for d in demo], label="linear weights")
    a.bar(names, [2 * other / 2**10] * len(demo), bottom=[d["linear_bytes"] / 2**10 for d in demo],
          label="embeddings, lm_head, norms (bf16)", alpha=0.6)
    a.set(ylabel="KiB", title="demo base (measured on QuantizedTensors)")
    a.legend()
    sizes = list(common.LLAMA_SHAPES)
    formats = ["fp32", *common.BITS_PER_WEIGHT]
    x, w = np.arange(len(formats)), 0.8 / len(sizes)
    for i, size in enumerate(sizes):
        off = (i - (len(sizes) - 1) / 2) * w
        b.bar(x + off, [by[(size, f)]["gb"] for f in formats], w, label=f"{size} from shapes")
        b.plot(x + off, [by[(size, f)]["seed_gb"] for f in formats], "k_", ms=12, mew=2)
    b.plot([], [], "k_", ms=12, mew=2, label="seed 000")
    b.set_xticks(x, formats)
    b.set(yscale="log", ylabel="GB (10^9 bytes)", title="Llama-2 base weights")
    b.legend(fontsize=8)
    return Result(name="memory", title="Memory: base weights in bf16 / 8-bit / NF4 / NF4 + DQ (seed 000)",
                  header=header, rows=rows, notes=notes, plot=save(fig, lab.settings.out / "memory.png"),
                  data={"demo": demo, "demo_linear_weights": linear, "demo_other_params": other, "llama": llama},
                  settings={"base_dir": str(lab.settings.base_dir)})
