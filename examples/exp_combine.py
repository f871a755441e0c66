"""Seed 003's "combining LoRA weights": an addition and a subtraction adapter on one quantized base, then
`add_weighted_adapter` (linear and svd), each scored on both tasks' held-out problems."""

from __future__ import annotations

import numpy as np
from flax import nnx

import jaxlora
from examples.exp_lab import Lab, Result, curve_of, pct, pyplot, save
from jaxlora.targets import lora_layers

# (adapter name, weights for (add, sub), combination_type, svd_rank); svd_rank None = the larger input rank
COMBINATIONS = (
    ("linear 1.0/1.0", (1.0, 1.0), "linear", None),
    ("linear 0.5/0.5", (0.5, 0.5), "linear", None),
    ("svd 1.0/1.0, rank r", (1.0, 1.0), "svd", None),
    ("svd 1.0/1.0, rank 2r", (1.0, 1.0), "svd", "2r"),
    ("svd 0.5/0.5, rank 2r", (0.5, 0.5), "svd", "2r"),
)


def _adapter_values(model, name: str) -> list[np.ndarray]:
    """Adapter `name`'s weights in every layer (paths end in ``adapters/<name>/lora_a``)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    values = [np.asarray(v.get_value()) for path, v in flat if path[-3:-1] == ("adapters", name)]
    if not values:
        raise ValueError(f"no weights of adapter {name!r} found")
    return values


def _distance(model, name: str, weights) -> float:
    """Mean over layers of |dW_name - (w_add dW_add + w_sub dW_sub)| / |that sum| (Frobenius norms)."""
    errors = []
    for layer in lora_layers(model).values():
        a = layer.adapters
        target = sum(w * np.asarray(a[n].delta_weight()) for n, w in zip(("add", "sub"), weights, strict=True))
        errors.append(np.linalg.norm(np.asarray(a[name].delta_weight()) - target) / np.linalg.norm(target))
    return float(np.mean(errors))


def _train(lab: Lab, model, name: str, op: str) -> dict:
    out = lab.settings.out / "runs" / f"combine_{name}"
    summary, diverged_at = lab.finetune(model, op, out)
    return {"loss": summary["loss"] if summary else None, "diverged_at": diverged_at, "curve": curve_of(out)}


def combine(lab: Lab, r: int = 16, combinations=COMBINATIONS) -> Result:
    config = jaxlora.LoraConfig(r=r, lora_alpha=2 * r)
    model = lab.base()
    ops = ("+", "-")
    scores = {"base (no adapter)": lab.accuracy(model, ops)}
    model = jaxlora.get_peft_model(model, config, rngs=nnx.Rngs(0), adapter_name="add")
    trained = {"add": _train(lab, model, "add", "+")}
    jaxlora.add_adapter(model, "sub", config, rngs=nnx.Rngs(1))
    jaxlora.set_adapter(model, "sub")
    # The optimizer holds every LoRAParam; "add" gets zero gradients while "sub" trains (and no weight
    # decay), so Adam must leave it exactly as it was -- checked, not assumed.
    add_before = _adapter_values(model, "add")
    trained["sub"] = _train(lab, model, "sub", "-")
    unchanged = all(np.array_equal(a, b) for a, b in zip(add_before, _adapter_values(model, "add"), strict=True))
    for name in ("add", "sub"):
        jaxlora.set_adapter(model, name)
        scores[f'"{name}" adapter alone'] = lab.accuracy(model, ops)
    shape = {}  # combination -> (rank, distance from the weighted sum of the two updates)
    for name, weights, kind, svd_rank in combinations:
        jaxlora.add_weighted_adapter(model, ["add", "sub"], list(weights), name, combination_type=kind,
                                     svd_rank=2 * r if svd_rank == "2r" else None)
        jaxlora.set_adapter(model, name)
        scores[name] = lab.accuracy(model, ops)
        shape[name] = (model.peft_config[name].r, _distance(model, name, weights))

    def cells(k: str) -> list:  # rank and distance; the base has no adapter, the specialists are exact
        if k in shape:
            return [shape[k][0], f"{shape[k][1]:.3f}"]
        return ["-", "-"] if k == "base (no adapter)" else [r, "-"]

    rows = [[k, *cells(k), pct(v["addition"]), pct(v["subtraction"]), pct((v["addition"] + v["subtraction"]) / 2)]
            for k, v in scores.items()]
    base, add, sub = scores["base (no adapter)"], scores['"add" adapter alone'], scores['"sub" adapter alone']
    combos = {k: scores[k] for k, *_ in combinations}
    mean = {k: (v["addition"] + v["subtraction"]) / 2 for k, v in combos.items()}
    best = max(mean, key=mean.get)

    def share(task: str, specialist: dict) -> str:
        return f" ({combos[best][task] / specialist[task]:.0%} of the specialist)" if specialist[task] else ""

    kept = min(combos[best]["addition"] / max(add["addition"], 1e-9),
               combos[best]["subtraction"] / max(sub["subtraction"], 1e-9))
    verdict = (f"so one combined adapter keeps most of both skills ({kept:.0%} or more of each)" if kept >= 0.8 else
               "no combination keeps both skills")
    by_kind = {kind: [shape[k][1] for k, _, c, _ in combinations if c == kind] for kind in ("linear", "svd")}
    spread = {kind: f"{min(d):.3f}" if max(d) - min(d) < 5e-4 else f"{min(d):.3f}-{max(d):.3f}"
              for kind, d in by_kind.items() if d}
    exact = [k for k in combos if shape[k][1] < 1e-3]
    worst_skill = min(add["addition"], sub["subtraction"])
    cause = (" Even the exact sums lose both skills, so the two updates themselves interfere, however they are "
             "combined." if exact and max(mean[k] for k in exact) < 0.5 * worst_skill else "")
    notes = (
        f'"add" scores {pct(add["addition"])} on addition and "sub" {pct(sub["subtraction"])} on subtraction '
        f'(the base: {pct(base["addition"])} and {pct(base["subtraction"])}); on the other task they score '
        f'{pct(add["subtraction"])} and {pct(sub["addition"])}. The best combination by mean accuracy, {best}, '
        f'reaches {pct(combos[best]["addition"])} on addition{share("addition", add)} and '
        f'{pct(combos[best]["subtraction"])} on subtraction{share("subtraction", sub)}: {verdict}. '
        f"Measured against the weighted sum of the two updates, "
        + ", ".join(f"{kind} combinations lie {d} away" for kind, d in spread.items())
        + " (relative Frobenius distance; PEFT's linear sums the A's and the B's separately, so cross terms "
        "appear, and svd at rank 2r is the sum exactly)." + cause
        + ("" if unchanged else ' Warning: training "sub" changed the "add" adapter\'s weights.')
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(scores))
    for i, task in enumerate(("addition", "subtraction")):
        ax.bar(x + (i - 0.5) * 0.4, [100 * v[task] for v in scores.values()], 0.4, label=task)
    ax.set_xticks(x, list(scores), rotation=25, ha="right")
    ax.set(ylabel="held-out accuracy (%)", ylim=(0, 100),
           title="one quantized base, two adapters and their combinations")
    ax.legend()
    return Result(name="combine", title=f"Combine: addition + subtraction adapters (r={r}, seed 003)",
                  header=["adapter", "rank", "distance from w_add dW_add + w_sub dW_sub", "addition accuracy",
                          "subtraction accuracy", "mean"],
                  rows=rows, notes=notes, plot=save(fig, lab.settings.out / "combine.png"),
                  data={"accuracy": scores, "rank_and_distance": shape, "training": trained,
                        "add_unchanged_by_sub_training": unchanged},
                  settings=lab.settings.to_json())
