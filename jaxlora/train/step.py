"""The jitted train and eval steps around an injectable loss; the causal-LM loss is the default.

A batch is a dict of numpy or jax arrays, all (batch, seq):
  input_ids       int32  token ids
  attention_mask  int32  1 for real tokens, 0 for padding
  loss_mask       bool   aligned to targets: loss_mask[b, t] says whether token t is predicted with loss
and, for packed rows only, `positions` and `segment_ids` (see jaxlora.train.batching), which are passed
on to the model; for a mixed-adapter batch (evaluation only) `adapter_rows` (`jaxlora.adapter_rows`).

A loss is `loss_fn(model, batch) -> (loss, aux)`: a scalar to minimize and a dict of scalars returned
with the step's metrics. An aux `tokens` entry weights the loss when evaluation combines batches (a
plain mean over batches without it). The step gets gradients for the optimizer's own `wrt` variables
only (`nnx.LoRAParam` for LoRA): the optimizer is the one place that choice is made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlora.train.loss import causal_lm_loss, chunked_causal_lm_loss

__all__ = ["LossFn", "TrainStep", "causal_lm_loss", "chunked_causal_lm_loss", "donating_train_step", "eval_step",
           "lm_loss", "offload_optimizer_state", "train_step"]

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict[str, Any]]]


def lm_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The default loss: mean next-token cross-entropy over `loss_mask`'s targets, and their count."""
    extra = {k: batch[k] for k in ("positions", "segment_ids", "adapter_rows") if batch.get(k) is not None}
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):  # the llama family: chunked head + loss
        rows = extra.get("adapter_rows")
        h, _ = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        graphdef, state = nnx.split(model)
        head = lambda state, h: nnx.merge(graphdef, state).logits(h, rows)  # noqa: E731
        loss, n = chunked_causal_lm_loss(head, state, h, batch["input_ids"], batch["loss_mask"])
    else:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        loss, n = causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
    return loss, {"tokens": n}


class TrainStep:
    """One optimizer update (or one accumulated micro-step under `optax.MultiSteps`), compiled, in place on
    the model and optimizer: ``step(model, optimizer, batch, *, loss_fn=lm_loss, offload_optimizer=False)``.
    It is skipped when the loss or the gradient norm is not finite (the result's `finite` is then False).
    Returns `loss`, `grad_norm`, `finite` and the loss's aux entries.

    The trained variables are `optimizer.wrt`: adapters (`nnx.LoRAParam`) for LoRA training, `nnx.Param`
    for full training of a dense model (the demo pretrains its base that way). `loss_fn` is a static
    argument: pass the same function object every step, or each call compiles anew.

    The compiled program takes (trained, optimizer state, frozen) and returns only the first two and the
    frozen variables it changed (dropout's RNG counts): the frozen base goes in and never comes out. A jitted
    function returns a new buffer for every output, an input returned unchanged too (jax does not forward
    it), so a step over the whole model (``nnx.jit`` returns every variable of its graph arguments) copied
    the entire quantized base each step, held twice at the step's peak (+3.5 GiB at Llama-2-7B) unless
    donated. `train_step` donates nothing; `donating_train_step`, the Trainer's, donates the trained state and
    the optimizer state, so XLA writes the new adapters and AdamW moments into the old buffers (0.47 GiB at
    Llama-2-7B; `jaxlora.plan` assumes it) and arrays taken from them before a step are deleted by it.

    offload_optimizer: the optimizer state lives in host memory between steps (see
    `offload_optimizer_state`); it is copied to the device for the update and back after it.
    """

    def __init__(self, *, donate: bool):
        self._compiled = jax.jit(_compiled_step, static_argnames=("graphdef", "loss_fn", "offload_optimizer"),
                                 donate_argnames=("trained", "opt_state") if donate else ())

    def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, *, loss_fn: LossFn = lm_loss,
                 offload_optimizer: bool = False) -> dict:
        return self.bind(model, optimizer)(batch, loss_fn=loss_fn, offload_optimizer=offload_optimizer)

    def bind(self, model: nnx.Module, optimizer: nnx.Optimizer) -> Callable[..., dict]:
        """``step(batch, *, loss_fn=lm_loss, offload_optimizer=False)`` for this model and optimizer, their graph
        walked once (a walk is ~40% of a small model's CPU step): the split states hold the model's own
        variables, so each call reads their current values and writes the new ones back into them. The
        model's structure must not change between calls (a variable replaced is not seen)."""
        graphdef, trained, opt_state, frozen = split_state(model, optimizer)
        targets = {name: dict(nnx.to_flat_state(state)) for name, state in
                   (("trained", trained), ("opt_state", opt_state), ("frozen", frozen))}

        def step(batch: dict, *, loss_fn: LossFn = lm_loss, offload_optimizer: bool = False) -> dict:
            new_trained, new_opt, changed, metrics = self._compiled(
                graphdef, trained, opt_state, frozen, batch, loss_fn=loss_fn, offload_optimizer=offload_optimizer)
            for name, new in (("trained", new_trained), ("opt_state", new_opt), ("frozen", changed)):
                for path, value in nnx.to_flat_state(new):
                    targets[name][path].set_value(value.get_value())
            return metrics

        return step

    def lower(self, model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, *, loss_fn: LossFn = lm_loss,
              offload_optimizer: bool = False, platform: str | None = None):
        """The compiled program for these arguments, lowered (``jax.stages.Lowered``; `platform` e.g. "cuda",
        default this machine's backend). They may be abstract (``nnx.eval_shape``, a batch of
        ``jax.ShapeDtypeStruct``): nothing runs (`jaxlora.plan`)."""
        graphdef, trained, opt_state, frozen = split_state(model, optimizer)
        traced = self._compiled.trace(graphdef, trained, opt_state, frozen, batch, loss_fn=loss_fn,
                                      offload_optimizer=offload_optimizer)
        return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def split_state(model: nnx.Module, optimizer: nnx.Optimizer):
    """(graphdef, trained, optimizer state, frozen): what the compiled step takes."""
    return nnx.split((model, optimizer), optimizer.wrt, nnx.OptState, ...)


def _compiled_step(graphdef, trained, opt_state, frozen, batch, *, loss_fn: LossFn, offload_optimizer: bool):
    """The step on split state: the new trained state, optimizer state, the frozen variables the step
    changed, and the metrics."""
    inputs = _leaves(frozen)  # before merge, which reuses the variables
    model, optimizer = nnx.merge(graphdef, trained, opt_state, frozen)
    metrics = _update(model, optimizer, batch, loss_fn, offload_optimizer)
    _, trained, opt_state, after = split_state(model, optimizer)
    return trained, opt_state, _changed(after, inputs), metrics


def _leaves(state: nnx.State) -> dict:
    """path -> the arrays (tracers) a state's variable holds now."""
    return {path: jax.tree.leaves(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _changed(state: nnx.State, inputs: dict) -> nnx.State:
    """The variables of `state` holding other arrays than they did (`inputs`, from `_leaves`), by identity of
    the traced values: an untouched variable is never an output."""
    flat = nnx.to_flat_state(state)
    # A train step's paths start with 0 (the model) or 1 (the optimizer): the user's names are what follows.
    created = [".".join(map(str, path[1:] if isinstance(path[0], int) else path)) for path, _ in flat
               if path not in inputs]
    if created:
        raise ValueError(f"the step created variables {created[:3]} (e.g. with Module.sow): a compiled step keeps "
                         "the model's structure fixed; remove them inside the loss (nnx.pop) or do not create "
                         "them while training")

    def moved(path, v) -> bool:
        now, before = jax.tree.leaves(v.get_value()), inputs[path]
        return len(now) != len(before) or any(a is not b for a, b in zip(now, before))

    return nnx.from_flat_state([(path, v) for path, v in flat if moved(path, v)])


train_step = TrainStep(donate=False)
donating_train_step = TrainStep(donate=True)


def _update(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, loss_fn: LossFn, offload_optimizer: bool):
    wrt = optimizer.wrt
    # DiffState(0, wrt): gradients exist for the trained variables only; the frozen base never gets one.
    grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch), argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, aux), grads = grad_fn(model)
    # optax mixes its int32 step count with floats (bias correction, schedules): keep the user's strict
    # promotion mode for the model, but let optax's own arithmetic promote as it was written to.
    grad_norm = optax.tree.norm(grads)  # the global L2 norm (optax.global_norm is deprecated)
    if offload_optimizer:
        _move_optimizer_state(optimizer, jax.memory.Space.Device)
    # A non-finite loss or gradient must not reach the weights: the update is computed and then
    # discarded (optax.apply_if_finite's semantics, without the extra state it would add), so the model
    # and optimizer stay exactly as they were before this step and the caller can stop on `finite`.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    before = jax.tree.map(lambda x: x, nnx.state((model, optimizer), nnx.Any(wrt, nnx.OptState)))
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)
    after = nnx.state((model, optimizer), nnx.Any(wrt, nnx.OptState))
    nnx.update((model, optimizer), jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before))
    if offload_optimizer:
        _move_optimizer_state(optimizer, jax.memory.Space.Host)
    return {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}


def eval_step(model: nnx.Module, batch: dict, *, loss_fn: LossFn = lm_loss) -> dict:
    """The loss times its weight (aux `tokens`, else 1) and that weight, so batches of different fill
    combine exactly; plus the loss's other aux entries. Compiled; the model is an input only (not copied)."""
    graphdef, state = nnx.split(model)
    changed, metrics = _eval(graphdef, state, batch, loss_fn=loss_fn)
    nnx.update(model, changed)
    return metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn"))
def _eval(graphdef, state, batch, *, loss_fn: LossFn):
    inputs = _leaves(state)
    model = nnx.merge(graphdef, state)
    loss, aux = loss_fn(model, batch)
    weight = aux.get("tokens", jnp.ones((), jnp.float32))
    return _changed(nnx.state(model), inputs), {**aux, "loss_sum": loss * weight, "tokens": weight}


def offload_optimizer_state(optimizer: nnx.Optimizer) -> None:
    """Keep the optimizer state (Adam's two moments: 2x the adapter size in fp32) in pinned host memory.

    JAX's answer to QLoRA's paged optimizers: device memory then holds only the weights and the step's
    activations, at the price of a host<->device copy of the state every step (PCIe-bound on a GPU;
    a copy within RAM on the CPU backend). Use with `train_step(..., offload_optimizer=True)`.
    """

    def to_host(x):
        if not isinstance(x, jax.Array):
            return x
        return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))

    nnx.update(optimizer, jax.tree.map(to_host, nnx.state(optimizer, nnx.OptState)))


def _move_optimizer_state(optimizer: nnx.Optimizer, space) -> None:
    state = nnx.state(optimizer, nnx.OptState)
    nnx.update(optimizer, jax.tree.map(lambda x: jax.device_put(x, space), state))
