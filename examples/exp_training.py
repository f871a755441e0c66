"""Seed experiments that train adapters on the demo's addition task: rank, alpha/r scaling, target modules.

Every run is the demo's QLoRA recipe on the NF4 + DQ base with one setting changed; the sentences under
each table are computed from the measured numbers, so they say what this run showed.
"""

from __future__ import annotations

import math

import jaxlora
from examples.exp_lab import Lab, Result, Run, fmt_loss, pct, pyplot, save

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _curves(ax, runs: dict[str, Run], title: str, log: bool = False) -> None:
    for label, run in runs.items():
        if run.curve:
            ax.plot(*zip(*run.curve), label=label, lw=1)
    ax.set(xlabel="step", ylabel="train loss (cross-entropy)", title=title, yscale="log" if log else "linear")
    ax.legend()
    ax.grid(alpha=0.3)


def rank(lab: Lab, ranks=(4, 8, 16, 32, 64)) -> Result:
    """Seed 000's first exercise on a real model: r = 4..64 with alpha = 2r."""
    runs = {r: lab.run(f"rank_r{r}", jaxlora.LoraConfig(r=r, lora_alpha=2 * r)) for r in ranks}
    rows = [[r, 2 * r, f"{run.trainable:,}", f"{100 * run.trainable / run.total:.2f}%", fmt_loss(run),
             pct(run.accuracy["addition"]), f"{run.tokens_per_s:,.0f}"] for r, run in runs.items()]
    acc = {r: run.accuracy["addition"] for r, run in runs.items()}
    losses = {r: run.loss for r, run in runs.items()}
    lo, hi = min(ranks), max(ranks)
    best = max(ranks, key=lambda r: (acc[r], -r))  # the smallest rank among the most accurate
    if len(set(acc.values())) == 1:
        accuracy = f"Held-out accuracy is {pct(acc[lo])} at every rank"
    else:
        accuracy = (f"Held-out accuracy goes {', '.join(f'{pct(acc[r])} (r={r})' for r in ranks)}: best at "
                    f"r={best}, and r={lo} reaches {acc[lo] / acc[best]:.0%} of that")
    notes = (
        f"Trainable parameters grow linearly with r ({runs[lo].trainable:,} at r={lo}, "
        f"{runs[hi].trainable:,} at r={hi}: r x sum(in+out) over the adapted layers). {accuracy}. "
        f"Final train loss is {losses[lo]:.4f} at r={lo} and {losses[hi]:.4f} at r={hi} (lowest "
        f"{min(losses.values()):.4f} at r={min(losses, key=losses.get)}); throughput goes from "
        f"{runs[lo].tokens_per_s:,.0f} to {runs[hi].tokens_per_s:,.0f} tokens/s (median step; noisy on a "
        "shared CPU)."
    )
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _curves(a, {f"r={r}": run for r, run in runs.items()}, "train loss, alpha = 2r", log=True)
    b.plot(list(ranks), [100 * acc[r] for r in ranks], "o-")
    b.set(xscale="log", xlabel="rank r", ylabel="held-out accuracy (%)", ylim=(0, 100), title="addition accuracy")
    b.set_xticks(list(ranks), [str(r) for r in ranks])
    b.minorticks_off()
    b.grid(alpha=0.3)
    return Result(name="rank", title="Rank: r = 4 ... 64 with alpha = 2r (seed 000)",
                  header=["r", "alpha", "trainable params", "% of all", "final train loss", "held-out accuracy",
                          "tokens/s (median step)"],
                  rows=rows, notes=notes, plot=save(fig, lab.settings.out / "rank.png"),
                  data={str(r): run.to_json() for r, run in runs.items()}, settings=lab.settings.to_json())


def alpha(lab: Lab, r: int = 16, alphas=(1, 32, 512), reference: float | None = None) -> Result:
    """Seed 000's third exercise: alpha/r too low and too high at one learning rate."""
    runs = {a: lab.run(f"alpha_{a}", jaxlora.LoraConfig(r=r, lora_alpha=a)) for a in alphas}

    def spike(run: Run) -> float:  # largest rise of the loss above its running minimum
        best, worst = float("inf"), 0.0
        for _, loss in run.curve:
            best = min(best, loss)
            worst = max(worst, loss - best)
        return worst

    early = max(1, lab.settings.steps // 10)  # how fast each run gets going

    def loss_at(run: Run, step: int) -> float:
        return next((loss for s, loss in run.curve if s == step), math.nan)

    rows = [[a, f"{a / r:g}", f"{loss_at(run, early):.4f}", fmt_loss(run), f"{spike(run):.4f}",
             pct(run.accuracy["addition"])] for a, run in runs.items()]
    ref_a = reference or 2 * r  # the recommended alpha = 2r; else the middle alpha
    ref_a = ref_a if ref_a in runs else sorted(alphas)[len(alphas) // 2]
    ref = runs[ref_a]

    def describe(a: float) -> str:
        run = runs[a]
        head = f"alpha={a:g} (scaling {a / r:g})"
        if run.diverged_at:
            return f"{head} diverged: the loss became non-finite at step {run.diverged_at}"
        return (f"{head} is at loss {loss_at(run, early):.3f} after {early} steps and ends at {run.loss:.4f} "
                f"({run.loss - ref.loss:+.4f}), rises at most {spike(run):.3f} above its running minimum and "
                f"scores {pct(run.accuracy['addition'])}")

    low, high = runs[min(alphas)], runs[max(alphas)]
    slow = (low.diverged_at is None and (loss_at(low, early) > loss_at(ref, early) + 0.1 or low.loss > ref.loss + 0.01
                                         or low.accuracy["addition"] < ref.accuracy["addition"]))
    unstable = high.diverged_at is not None or spike(high) > max(0.1, 3 * spike(ref))
    worse = high.diverged_at is None and high.loss > ref.loss + 0.01
    verdict = ("Too low a scaling learns slowly: W = W0 + (alpha/r) BA shrinks every update, so the same Adam "
               "steps move the model less. " if slow else f"The low scaling kept up with alpha={ref_a:g} here. ")
    if unstable:
        verdict += ("Too high a scaling makes training unstable: Adam's step size is set by the learning rate, not "
                    "by the gradient's scale, so each update of W grows with alpha/r"
                    + (" and the run ends worse." if worse else "."))
    else:
        verdict += "The high scaling ends worse without spikes." if worse else "The high scaling did no visible harm."
    notes = (f"Against alpha={ref_a:g} (loss {loss_at(ref, early):.3f} after {early} steps, final {fmt_loss(ref)}, "
             f"largest rise {spike(ref):.3f}, accuracy {pct(ref.accuracy['addition'])}): {describe(min(alphas))}; "
             f"{describe(max(alphas))}. {verdict}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, {f"alpha={a:g} (scaling {a / r:g})": run for a, run in runs.items()},
            f"r={r}, lr {lab.settings.learning_rate:g}: alpha/r too low and too high")
    for run in runs.values():
        if run.diverged_at and run.curve:
            ax.plot(*run.curve[-1], "x", color="red", ms=10)
    return Result(name="alpha", title=f"Alpha: scaling alpha/r too low and too high (r={r}, seed 000)",
                  header=["alpha", "scaling alpha/r", f"loss at step {early}", "final train loss",
                          "largest rise above running min", "held-out accuracy"],
                  rows=rows, notes=notes, plot=save(fig, lab.settings.out / "alpha.png"),
                  data={str(a): run.to_json() for a, run in runs.items()}, settings=lab.settings.to_json())


def targets(lab: Lab, r: int = 16) -> Result:
    """Seed 003: adapting all linear layers vs attention only, same rank."""
    runs = {
        "attention only (q, k, v, o)": lab.run("targets_attention",
                                               jaxlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTENTION)),
        "all linear (+ gate, up, down)": lab.run("targets_all", jaxlora.LoraConfig(r=r, lora_alpha=2 * r)),
    }
    att, full = runs.values()
    rows = [[k, f"{run.trainable:,}", f"{100 * run.trainable / run.total:.2f}%", fmt_loss(run),
             pct(run.accuracy["addition"]), f"{run.tokens_per_s:,.0f}"] for k, run in runs.items()]
    d_acc = full.accuracy["addition"] - att.accuracy["addition"]
    if d_acc > 0:
        verdict = "all-linear wins, as seed 003 reports"
    elif d_acc < 0:
        verdict = "attention-only wins here, unlike seed 003's finding"
    else:
        lower = "all-linear" if full.loss < att.loss else "attention-only"
        verdict = f"a tie in accuracy; {lower} reaches the lower train loss"
    notes = (
        f"All-linear trains {full.trainable / att.trainable:.2f}x the parameters of attention-only "
        f"({full.trainable:,} vs {att.trainable:,}; seed 003 saw 5x on a 7B model, whose MLP is wider "
        f"relative to attention). Final loss {fmt_loss(full)} vs {fmt_loss(att)}, held-out accuracy "
        f"{pct(full.accuracy['addition'])} vs {pct(att.accuracy['addition'])} "
        f"({100 * d_acc:+.1f} points): {verdict}."
    )
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _curves(a, runs, f"train loss, r={r}, alpha={2 * r}")
    b.bar(["attention only", "all linear"], [100 * run.accuracy["addition"] for run in runs.values()])
    b.set(ylabel="held-out accuracy (%)", ylim=(0, 100), title="addition accuracy")
    return Result(name="targets", title=f"Targets: attention-only vs all-linear adapters (r={r}, seed 003)",
                  header=["target modules", "trainable params", "% of all", "final train loss", "held-out accuracy",
                          "tokens/s (median step)"],
                  rows=rows, notes=notes, plot=save(fig, lab.settings.out / "targets.png"),
                  data={k: run.to_json() for k, run in runs.items()}, settings=lab.settings.to_json())
