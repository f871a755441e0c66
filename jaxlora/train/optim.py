"""Optimizer and learning-rate schedule for adapter training, with transformers' `TrainingArguments` names.

Only `nnx.LoRAParam` variables are handed to the optimizer (`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`),
so weight decay, clipping and moments touch adapters alone, as in PEFT training.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import optax

OPTIMS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Field names follow transformers' `TrainingArguments`, defaults follow QLoRA practice."""

    optim: Literal["adamw", "adam", "sgd"] = "adamw"  # seed 003: AdamW is the sensible default
    learning_rate: float = 2e-4  # QLoRA paper's rate for small models
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    max_steps: int = 1000  # the schedule decays to 0 at this step (cosine / linear)
    weight_decay: float = 0.0  # decoupled (AdamW-style) for adamw; L2 added to grads for adam / sgd
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.9  # sgd only
    max_grad_norm: float | None = 1.0  # global-norm clipping, as torch.nn.utils.clip_grad_norm_; None: off
    gradient_accumulation_steps: int = 1  # micro-batches averaged per optimizer update

    def __post_init__(self):
        if self.optim not in OPTIMS:
            raise ValueError(f"optim={self.optim!r} is not supported; choose one of {OPTIMS}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is not supported; choose one of {SCHEDULES}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps!r} must be >= 1")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be in [0, max_steps={self.max_steps}]")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be > 0 or None")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps!r} must be >= 1"
            )


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
