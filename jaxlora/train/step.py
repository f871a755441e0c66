"""The causal-LM loss and the jitted train / eval steps. Only `nnx.LoRAParam` variables receive gradients.

A batch is a dict of numpy or jax arrays, all (batch, seq):
  input_ids       int32  token ids
  attention_mask  int32  1 for real tokens, 0 for padding
  loss_mask       bool   aligned to targets: loss_mask[b, t] says whether token t is predicted with loss
and, for packed rows only, `positions` and `segment_ids` (see jaxlora.train.batching), which are passed
on to the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlora.train.loss import causal_lm_loss, chunked_causal_lm_loss

__all__ = ["causal_lm_loss", "chunked_causal_lm_loss", "eval_step", "offload_optimizer_state", "train_step"]


def _forward_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    packing = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):  # the llama family: chunked head + loss
        h, _ = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"], **packing)
        graphdef, state = nnx.split(model)
        head = lambda state, h: nnx.merge(graphdef, state).logits(h)  # noqa: E731
        return chunked_causal_lm_loss(head, state, h, batch["input_ids"], batch["loss_mask"])
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **packing)
    return causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])


@functools.partial(nnx.jit, static_argnames=("offload_optimizer", "wrt"))
def train_step(
    model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, *, offload_optimizer: bool = False, wrt=nnx.LoRAParam
) -> dict:
    """One optimizer update (or one accumulated micro-step under `optax.MultiSteps`), skipped when the
    loss or the gradient norm is not finite (the result's `finite` is then False).

    wrt: which variables get gradients — adapters (`nnx.LoRAParam`) for LoRA training; `nnx.Param`
    for full training of a dense model (the demo pretrains its base that way). It must match the
    optimizer's own `wrt`.

    offload_optimizer: the optimizer state lives in host memory between steps (see
    `offload_optimizer_state`); it is copied to the device for the update and back after it.
    """

    def loss_fn(m):
        loss, n = _forward_loss(m, batch)
        return loss, n

    # DiffState(0, LoRAParam): gradients exist for adapters only; the frozen base never gets one.
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, n), grads = grad_fn(model)
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
    return {"loss": loss, "tokens": n, "grad_norm": grad_norm, "finite": finite}


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> dict:
    """Summed loss and target count, so eval batches of different fill combine exactly."""
    loss, n = _forward_loss(model, batch)
    return {"loss_sum": loss * n, "tokens": n}
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
