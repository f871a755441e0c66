"""Optimizer and learning-rate schedule for adapter training, with transformers' `TrainingArguments` names.

Only `nnx.LoRAParam` variables are handed to the optimizer (`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`),
so weight decay, clipping and moments touch adapters alone, as in PEFT training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import optax

from jaxlora.checks import number

OPTIMS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Field names follow transformers' `TrainingArguments`, defaults follow QLoRA practice."""

    optim: Literal["adamw", "adam", "sgd"] = "adamw"  # seed 003: AdamW is the sensible default
    learning_rate: float = 2e-4  # QLoRA paper's rate for small models
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"  # after the warm-up
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    max_steps: int = 1000  # the schedule decays to 0 at this step (cosine / linear)
    weight_decay: float = 0.0  # decoupled (AdamW-style) for adamw; L2 added to grads for adam / sgd
    adam_beta1: float = 0.9  # decay of Adam's first moment, in [0, 1)
    adam_beta2: float = 0.999  # decay of Adam's second moment, in [0, 1)
    adam_epsilon: float = 1e-8  # > 0, added to the root of the second moment
    momentum: float = 0.9  # sgd only, in [0, 1)
    max_grad_norm: float | None = 1.0  # global-norm clipping, as torch.nn.utils.clip_grad_norm_; None: off
    gradient_accumulation_steps: int = 1  # micro-batches averaged per optimizer update

    def __post_init__(self):
        if self.optim not in OPTIMS:
            raise ValueError(f"optim={self.optim!r} is not supported; choose one of {OPTIMS}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is not supported; choose one of {SCHEDULES}"
            )
        number("learning_rate", self.learning_rate, gt=0)
        number("max_steps", self.max_steps, integer=True, ge=1)
        number("warmup_steps", self.warmup_steps, integer=True, ge=0, le=self.max_steps)
        number("weight_decay", self.weight_decay, ge=0)
        # Adam's moment decays must stay below 1 (at 1 the bias correction divides by zero); epsilon > 0
        # keeps the update finite where the second moment is 0.
        number("adam_beta1", self.adam_beta1, ge=0, lt=1)
        number("adam_beta2", self.adam_beta2, ge=0, lt=1)
        number("adam_epsilon", self.adam_epsilon, gt=0)
        number("momentum", self.momentum, ge=0, lt=1)  # >= 1 makes SGD's velocity grow without bound
        number("max_grad_norm", self.max_grad_norm, gt=0, none=True)
        number("gradient_accumulation_steps", self.gradient_accumulation_steps, integer=True, ge=1)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The learning rate at optimizer step k (0-based), equal to transformers' `get_*_schedule_with_warmup`."""
    lr, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.max_steps
    warmup = optax.linear_schedule(0.0, lr, warm) if warm else None
    if cfg.lr_scheduler_type == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total - warm, 1))
    elif cfg.lr_scheduler_type == "linear":
        main = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
    else:
        main = optax.constant_schedule(lr)
    if warmup is None:
        return main
    return optax.join_schedules([warmup, main], [warm])


# One transformation per config: nnx.Optimizer keeps it in its graph definition, where its functions compare
# by identity, so a fresh one per call made every new optimizer retrace and recompile the train step (a
# resumed run, a second `train` in one process). optax transformations hold no state, so sharing is safe.
@functools.cache
def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip → optimizer with schedule, wrapped in `optax.MultiSteps` for gradient accumulation."""
    schedule = make_schedule(cfg)
    if cfg.optim == "adamw":
        opt = optax.adamw(
            schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay
        )
    else:
        core = (
            optax.adam(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon)
            if cfg.optim == "adam"
            else optax.sgd(schedule, momentum=cfg.momentum)
        )
        # torch's Adam / SGD weight_decay adds wd·p to the gradient before the update (coupled L2).
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), core) if cfg.weight_decay else core
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    if cfg.gradient_accumulation_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.gradient_accumulation_steps)
    return opt
