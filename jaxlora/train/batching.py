"""Examples -> fixed-shape (batch, seq_len) numpy batches, padded or packed.

Without packing a row holds one example, right-padded. With packing, whole examples are laid end to
end in their given order (next-fit: when the next one does not fit, the row is closed and padded); an
example is never split, so every token of every example appears exactly once.

What the model does with a packed row: token `q` may attend to token `k` only where
`segment_ids[q] == segment_ids[k] != 0` and `k <= q`, and RoPE uses `positions`, which restart at 0
for each example. A model that looks only at `attention_mask` lets packed examples see one another
(and shifts their positions); the loss is still right, because each example's first token has
`loss_mask` False, so no target is predicted across a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxlora.train.records import Example


class Batch(NamedTuple):
    """A NamedTuple, so a JAX pytree; `batch._asdict()` gives the dict that `train.step` takes."""

    input_ids: np.ndarray  # (batch, seq_len) int32; pad_token_id on padding
    loss_mask: np.ndarray  # (batch, seq_len) bool; mask[b, t] <=> input_ids[b, t] is a target with loss
    attention_mask: np.ndarray  # (batch, seq_len) int32; 1 on real tokens, 0 on padding (transformers' convention)
    segment_ids: np.ndarray  # (batch, seq_len) int32; 1, 2, ... per example within a row, 0 on padding
    positions: np.ndarray  # (batch, seq_len) int32; position within the token's own example, 0 on padding


def plan_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int, packing: bool) -> list[list[int]]:
    """Example indices for each row, taking examples in `order`; every length must be <= seq_len."""
    if not packing:
        return [[int(i)] for i in order]
    rows: list[list[int]] = []
    used = seq_len  # forces a new row for the first example
    for i in order:
        n = lengths[i]
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += n
    return rows


def make_batch(
    rows: Sequence[Sequence[int]], examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_token_id: int
) -> Batch:
    """Fill a batch from planned rows; rows beyond `len(rows)` are all padding (no loss, no attention),
    which keeps the last batch of an epoch the same shape as the others."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit in batch_size={batch_size}")
    ids = np.full((batch_size, seq_len), pad_token_id, dtype=np.int32)
    loss = np.zeros((batch_size, seq_len), dtype=bool)
    seg = np.zeros((batch_size, seq_len), dtype=np.int32)
    pos = np.zeros((batch_size, seq_len), dtype=np.int32)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row, start=1):
            ex = examples[i]
            n = len(ex.input_ids)
            if t + n > seq_len:
                raise ValueError(f"row {b} holds {t + n} tokens, more than seq_len={seq_len}")
            ids[b, t : t + n] = ex.input_ids
            loss[b, t : t + n] = ex.loss_mask
            seg[b, t : t + n] = s
            pos[b, t : t + n] = np.arange(n, dtype=np.int32)
            t += n
    return Batch(ids, loss, (seg > 0).astype(np.int32), seg, pos)
