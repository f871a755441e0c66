"""Peak RSS per layer added: what one more decoder layer costs each side's training peak.

Between two sizes of `benchmarks.run` that differ only in depth (7b-l2 and 7b-l4), (RSS(deep) - RSS(shallow))
/ (layers added) cancels what does not grow with depth (libraries, embeddings, lm_head, logits, one layer's
recomputed activations, the compiler), leaving what scales to a 32-layer model. `expected_layer_bytes` is
the floor a QLoRA layer cannot go below, to compare with.
"""

from __future__ import annotations

import json

MiB = 2**20


def layer_linears(model: dict) -> list[tuple[int, int]]:
    """(in, out) of a llama decoder layer's seven linears, from the size's transformers config fields."""
    h, i = model["hidden_size"], model["intermediate_size"]
    d = h // model["num_attention_heads"]
    q, kv = model["num_attention_heads"] * d, model["num_key_value_heads"] * d
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def expected_layer_bytes(model: dict, *, batch: int, seq: int, r: int, act_itemsize: int) -> dict[str, float]:
    """The floor of one layer's share of a QLoRA training step with gradient checkpointing, in bytes:
    NF4 codes (half a byte a weight) + double-quant statistics (a uint8 absmax per 64 weights, an fp32
    absmax per 256 of those); LoRA A and B in fp32 with their gradient and AdamW's two moments; the
    layer's input, the one activation full remat keeps (batch, seq, hidden) in the compute dtype."""
    linears = layer_linears(model)
    weights = sum(a * b for a, b in linears)
    adapters = sum(r * (a + b) for a, b in linears)
    return dict(nf4_dq=weights / 2 + weights / 64 + weights / 64 / 256 * 4, lora_adam=adapters * 4 * 4,
                saved_input=batch * seq * model["hidden_size"] * act_itemsize, linear_params=weights,
                lora_params=adapters)


def depth_pairs(sizes: dict) -> list[tuple[int, dict, int, dict]]:
    """(layers, result, layers, result) of the shallowest and deepest size of every group of sizes that
    differ only in num_hidden_layers (same other shapes, batch, seq, remat and r)."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for res in sizes.values():
        sp = res["spec"]
        others = {k: v for k, v in sp["model"].items() if k != "num_hidden_layers"}
        key = json.dumps([others, sp["batch"], sp["seq"], sp["remat"], sp["r"]], sort_keys=True)
        groups.setdefault(key, []).append((sp["model"]["num_hidden_layers"], res))
    pairs = []
    for group in groups.values():
        group.sort(key=lambda g: g[0])
        (l0, r0), (l1, r1) = group[0], group[-1]
        if l1 > l0:
            pairs.append((l0, r0, l1, r1))
    return pairs


def per_layer_section(results: dict) -> list[str]:
    """Markdown: per depth pair and dtype, each side's train peak RSS at both depths, per layer added and the
    ratio, tokens/s, and the expected floor; [] when no two sizes differ only in depth."""
    lines = []
    for l0, r0, l1, r1 in depth_pairs(results["sizes"]):
        sp = r0["spec"]
        for dtype in r0["train"]:
            pair0, pair1 = r0["train"][dtype], r1["train"].get(dtype)
            if pair1 is None or any("error" in p[s] for p in (pair0, pair1) for s in ("jax", "torch")):
                continue
            rows = [f"## Peak RSS per layer added ({dtype}): {l0} vs {l1} layers, batch {sp['batch']} x seq "
                    f"{sp['seq']}, remat {sp['remat']}", "",
                    "| metric | jaxlora | PyTorch | jaxlora / PyTorch |", "|---|---:|---:|---:|"]

            def row(name, f, fmt="{:.0f}"):
                a, b = f("jax"), f("torch")
                rows.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {a / b if b else float('nan'):.2f} |")

            for key, what in (("train_peak_rss", "train peak RSS"), ("train_timed_peak_rss", "timed step peak RSS")):
                row(f"{what}, {l0} layers MiB", lambda s, k=key: pair0[s][k] / MiB)
                row(f"{what}, {l1} layers MiB", lambda s, k=key: pair1[s][k] / MiB)
                row(f"**{what} per layer added MiB**", lambda s, k=key: (pair1[s][k] - pair0[s][k]) / (l1 - l0) / MiB)
            row(f"train tokens/s, {l0} layers", lambda s: pair0[s]["train_tokens_per_s"], "{:.1f}")
            row(f"train tokens/s, {l1} layers", lambda s: pair1[s]["train_tokens_per_s"], "{:.1f}")
            e = expected_layer_bytes(sp["model"], batch=sp["batch"], seq=sp["seq"], r=sp["r"],
                                     act_itemsize=2 if dtype == "bfloat16" else 4)
            floor = e["nf4_dq"] + e["lora_adam"] + (e["saved_input"] if sp["remat"] else 0)
            rows += ["", f"Expected floor per layer: {floor / MiB:.0f} MiB = NF4 + double quant of "
                     f"{e['linear_params'] / 1e6:.0f}M linear weights {e['nf4_dq'] / MiB:.0f} MiB + LoRA "
                     f"{e['lora_params'] / 1e6:.2f}M params in fp32 with gradient and AdamW moments "
                     f"{e['lora_adam'] / MiB:.0f} MiB" + (f" + the saved layer input {e['saved_input'] / MiB:.0f} MiB"
                                                          if sp["remat"] else "") + ".", ""]
            lines += rows
    return lines
