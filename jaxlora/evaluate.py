"""Task accuracy by generation: does the model complete each prompt with exactly the expected text?"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.generate import generate
from jaxlora.tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as training sees them before the completion (bos first, as records.py adds it)."""
    ids = tokenizer.encode(prompt)
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def completion_accuracy(
    model: nnx.Module,
    tokenizer: Tokenizer,
    records: Sequence[dict],  # {"prompt", "completion"} records
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy completions (up to eos, whitespace-stripped) and the completions.

    Prompts of a batch are left-padded to one length; batches are padded to `batch_size` rows so that
    every batch compiles to the same program. `generate` runs an eval-mode view: dropout is off and
    `model` keeps its mode.
    """
    if not records:
        raise ValueError("completion_accuracy needs at least one record")
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
        )
        for row in np.asarray(out)[: len(chunk), width:]:
            tokens = [int(t) for t in row]
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode([t for t in tokens if t != pad]))
    hits = sum(o.strip() == r["completion"].strip() for o, r in zip(outputs, records))
    return hits / len(records), outputs
