"""QLoRA training the PyTorch way, for the training parity test: transformers' causal-LM loss with labels,
torch AdamW, transformers' cosine schedule with warm-up, ``clip_grad_norm_`` -- the loop a Trainer runs,
written out so every step's loss, gradient norm and learning rate can be read.

    peft_model = peft_ref.random_adapter(hf_ref.load_4bit_model(path), r=8, lora_alpha=16)
    history = train(peft_model, batches, TrainingArguments(max_steps=20))
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

IGNORE_INDEX = -100  # transformers' ForCausalLMLoss ignore_index


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingArguments:
    """The optimizer fields of transformers' TrainingArguments (jaxlora's OptimizerConfig takes the same names)."""

    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.01  # torch AdamW: decoupled, p *= 1 - lr * wd before the Adam step
    warmup_steps: int = 2
    max_steps: int = 20
    max_grad_norm: float = 1.0


def labels_from_loss_mask(input_ids: np.ndarray, loss_mask: np.ndarray) -> torch.Tensor:
    """transformers labels: the token where it is a target, -100 elsewhere. `loss_mask` is aligned to the
    targets (jaxlora's convention), and transformers shifts labels itself, so no shift here."""
    return torch.from_numpy(np.where(loss_mask, input_ids, IGNORE_INDEX).astype(np.int64))


def train(model: torch.nn.Module, batches: list[dict], cfg: TrainingArguments) -> dict[str, list[float]]:
    """`cfg.max_steps` optimizer steps over `batches` (cycled), each a dict of numpy ``input_ids``,
    ``attention_mask`` and ``loss_mask``. The loss is the model's own with ``labels``: without
    ``num_items_in_batch`` transformers takes the mean over the non-ignored targets of the batch, which is
    jaxlora's `causal_lm_loss` (a Trainer passes ``num_items_in_batch``; with one micro-batch per step it
    is the same count). Only parameters with ``requires_grad`` (PEFT leaves just the
    adapters) are optimized. Returns per-step ``loss`` (before the update), ``grad_norm`` (before
    clipping) and ``lr`` (the rate the update used)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    model.train()
    history = {"loss": [], "grad_norm": [], "lr": []}
    for step in range(cfg.max_steps):
        batch = batches[step % len(batches)]
        out = model(input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
                    attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
                    labels=labels_from_loss_mask(batch["input_ids"], batch["loss_mask"]))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        history["loss"].append(out.loss.item())
        history["grad_norm"].append(norm.item())
    model.eval()
    return history
