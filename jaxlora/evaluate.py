"""Evaluation: the loss over a data set (`eval_loss`) and exact-match task accuracy by generation
(`completion_accuracy`). Both run an eval-mode view of the model (dropout off; the model keeps its mode).

Both take PEFT's ``adapter_names``: one adapter name per example (``"__base__"`` for the base model), so
one pass scores several adapters side by side (`jaxlora.adapter_rows`); the names are an array inside the
compiled program, so another combination of names compiles nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora import adapter_rows
from jaxlora.generate import generate, inference_view
from jaxlora.mixed import BASE
from jaxlora.tokenizer import Tokenizer
from jaxlora.train.data import DataConfig, eval_batches
from jaxlora.train.sharding import device_batch
from jaxlora.train.step import LossFn, eval_step, lm_loss


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as training sees them before the completion (bos first, as records.py adds it)."""
    ids = tokenizer.encode(prompt)
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def eval_loss(
    model: nnx.Module,
    examples,  # the tokenized examples (`load_data(...).eval`, or `.train`)
    data_cfg: DataConfig,
    *,
    pad_token_id: int,
    mesh=None,  # a jaxlora.train.sharding mesh: the batch is split over its devices
    loss_fn: LossFn = lm_loss,
    adapter_names: Sequence[str] | None = None,  # one per example, "__base__" for the base model
) -> float:
    """Mean loss over one pass of `examples` in file order, weighted by each batch's aux `tokens` (the
    default loss's target count: the token-weighted mean)."""
    view = inference_view(model)
    names = _names_per_example(adapter_names, len(examples))
    if names is not None and data_cfg.packing:
        raise ValueError("adapter_names needs data_cfg.packing=False: a packed row holds several examples, an "
                         "adapter is chosen per row")
    total, count = 0.0, 0.0
    for start, batch in zip(range(0, len(examples), data_cfg.batch_size),
                            eval_batches(examples, data_cfg, pad_token_id=pad_token_id)):
        arrays = device_batch(batch, mesh, data_cfg.packing)
        if names is not None:  # without packing, row i of a batch is example start + i
            arrays["adapter_rows"] = adapter_rows(view, _fill(names[start : start + data_cfg.batch_size],
                                                              data_cfg.batch_size))
        out = eval_step(view, arrays, loss_fn=loss_fn)
        total += float(out["loss_sum"])
        count += float(out["tokens"])
    return total / max(count, 1.0)


def completion_accuracy(
    model: nnx.Module,
    tokenizer: Tokenizer,
    records: Sequence[dict],  # {"prompt", "completion"} records
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    adapter_names: Sequence[str] | None = None,  # one per record, "__base__" for the base model
) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy completions (up to eos, whitespace-stripped) and the completions.

    Prompts of a batch are left-padded to one length; batches are padded to `batch_size` rows so that
    every batch compiles to the same program.
    """
    if not records:
        raise ValueError("completion_accuracy needs at least one record")
    names = _names_per_example(adapter_names, len(records))
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(r["completion"])) for r in records) + 1
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        mask[len(chunk) :, -1] = 1  # filler rows: one visible token, so attention is well defined
        out = generate(
            model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
            adapter_names=None if names is None else _fill(names[start : start + batch_size], batch_size),
        )
        for row in np.asarray(out)[: len(chunk), width:]:
            tokens = [int(t) for t in row]
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode([t for t in tokens if t != pad]))
    hits = sum(o.strip() == r["completion"].strip() for o, r in zip(outputs, records))
    return hits / len(records), outputs


def _names_per_example(adapter_names: Sequence[str] | None, n: int) -> list[str] | None:
    if adapter_names is None:
        return None
    if isinstance(adapter_names, str):
        raise ValueError(f"adapter_names={adapter_names!r} must be a list of names, one per example")
    if len(adapter_names) != n:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for {n} examples; give one per example")
    return list(adapter_names)


def _fill(names: list[str], rows: int) -> list[str]:
    # Filler rows of a batch's last topped-up part run the base: they carry no loss and no output.
    return names + [BASE] * (rows - len(names))
