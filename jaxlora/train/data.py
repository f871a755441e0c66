"""The training data pipeline: records -> tokenized examples -> deterministic, resumable fixed-shape batches.

    config = DataConfig(path="train.jsonl", max_seq_len=512, batch_size=8)   # or .parquet, a hub id, ...
    data = load_data(config, tokenizer)
    for batch, state in train_batches(data.train, config, pad_token_id=tokenizer.pad_token_id):
        ...  # train on batch; checkpoint state.to_dict() with the weights
    # resume: train_batches(..., start=DataState.from_dict(saved)) yields the batches that followed.

Sources (JSONL, parquet, csv, arrow, saved datasets, hub ids): `jaxlora.train.sources`. Record formats,
masks and bos/eos: `jaxlora.train.records`. Token storage and its cache: `jaxlora.train.token_cache`.
Padding and packing: `jaxlora.train.batching`. The order of examples is a function of (seed, epoch) and
the examples alone, so every source, streamed or not, cached or not, yields the same batches.
Host-side numpy only; the train step moves batches to devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxlora.checks import number
from jaxlora.tokenizer import Tokenizer
from jaxlora.train import sources
from jaxlora.train.batching import Batch, make_batch, plan_rows
from jaxlora.train.records import FORMATS, OVERLONG, Example, Format, Overlong, encode_records
from jaxlora.train.token_cache import (
    TokenStore,
    build_store,
    cache_entry,
    example_lengths,
    open_store,
    tokenizer_fingerprint,
)

# Separate random streams per purpose, so the eval split never moves with the epoch shuffles.
_SHUFFLE, _SPLIT = 0, 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str  # .jsonl / .json / .parquet / .arrow / .csv file or directory, a save_to_disk directory, or a hub id
    max_seq_len: int  # tokens per row; at most what the model allows (its max_position_embeddings)
    batch_size: int  # rows per batch
    format: Format = "auto"  # "text" | "prompt_completion" | "chat"; "auto" detects from the first record
    packing: bool = False  # lay several whole examples in a row (see batching.py for segment_ids)
    eval_path: str | None = None  # a separate eval JSONL; excludes eval_fraction
    eval_fraction: float = 0.0  # else hold out this fraction of the training examples, chosen by seed
    seed: int = 0  # drives the eval split and every epoch's shuffle
    overlong: Overlong = "error"  # an example over max_seq_len: "error", "truncate" (keep the head), "drop"
    split: str = "train"  # the split of `path` to train on
    eval_split: str | None = None  # an eval split of eval_path (or of path); excludes eval_fraction
    config_name: str | None = None  # a hub dataset's configuration (load_dataset's `name`)
    text_column: str = "text"  # the column (or JSONL key) holding each format's fields
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    streaming: bool = False  # read rows one at a time, for sources larger than RAM (needs cache_dir)
    cache_dir: str | None = None  # keep tokenized examples here, memory-mapped and reused; None: in RAM

    def __post_init__(self):
        number("max_seq_len", self.max_seq_len, integer=True, ge=1)
        number("batch_size", self.batch_size, integer=True, ge=1)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
        number("eval_fraction", self.eval_fraction, ge=0, lt=1)
        number("seed", self.seed, integer=True, ge=0)  # numpy's default_rng takes no negative seed
        if (self.eval_path is not None or self.eval_split is not None) and self.eval_fraction > 0:
            raise ValueError("give eval_path / eval_split or eval_fraction, not both")
        if self.streaming and self.cache_dir is None:
            raise ValueError("streaming=True needs cache_dir: streamed examples are tokenized to files there, not to RAM")

    @property
    def columns(self) -> dict[str, str]:
        """{record key: column name} (see jaxlora.train.sources)."""
        return {"text": self.text_column, "prompt": self.prompt_column, "completion": self.completion_column,
                "messages": self.messages_column}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataState:
    """Where the training stream stands: `index` batches of epoch `epoch` have been consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict) -> DataState:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


class Data(NamedTuple):
    train: TokenStore
    eval: TokenStore  # empty when no eval_path, eval_split or eval_fraction is set
    dropped: int  # examples dropped by the overlong policy (or left without any target)


def load_data(config: DataConfig, tokenizer: Tokenizer) -> Data:
    """Read, validate and tokenize the training (and eval) data; errors name the file and line (or row)."""
    train, dropped = load_split(config, tokenizer, config.path, config.split)
    evals = TokenStore(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.int64))
    if config.eval_path is not None or config.eval_split is not None:
        evals, dropped_eval = load_split(config, tokenizer, config.eval_path or config.path, config.eval_split or "train")
        dropped += dropped_eval
    elif config.eval_fraction > 0:
        n_eval = max(1, round(config.eval_fraction * len(train)))
        if n_eval >= len(train):
            raise ValueError(
                f"{config.path}: eval_fraction={config.eval_fraction} of {len(train)} examples leaves none to train on"
            )
        held = np.random.default_rng([config.seed, _SPLIT, 0]).permutation(len(train))[:n_eval]
        is_eval = np.zeros(len(train), dtype=bool)
        is_eval[held] = True
        evals, train = train.select(np.flatnonzero(is_eval)), train.select(np.flatnonzero(~is_eval))  # source order
    return Data(train, evals, dropped)


def load_split(config: DataConfig, tokenizer: Tokenizer, path: str, split: str) -> tuple[TokenStore, int]:
    """One split's examples and drop count, from the token cache when it holds them."""
    entry, cached = None, None
    if config.cache_dir is not None:
        entry = cache_entry(config.cache_dir, {
            "source": sources.fingerprint(path, split=split, config_name=config.config_name),
            "format": config.format, "columns": config.columns, "max_seq_len": config.max_seq_len,
            "overlong": config.overlong, "tokenizer": tokenizer_fingerprint(tokenizer),
        })
        cached = open_store(entry)
    if cached is None:
        records = sources.read_records(
            path, split=split, columns=config.columns, format=config.format, streaming=config.streaming,
            config_name=config.config_name,
            hf_cache_dir=None if config.cache_dir is None else str(Path(config.cache_dir) / "datasets"),
        )
        kw = dict(format=config.format, max_seq_len=config.max_seq_len, overlong=config.overlong)
        cached = build_store(encode_records(records, tokenizer, **kw), entry)
    store, dropped = cached
    if not len(store):
        why = f" after dropping {dropped}" if dropped else ""
        raise ValueError(f"{path}: no usable examples{why}")
    return store, dropped


def _epoch_rows(examples: Sequence[Example], config: DataConfig, epoch: int | None) -> list[list[int]]:
    """Row plan of one epoch; `epoch=None` keeps file order (eval)."""
    if epoch is None:
        order = np.arange(len(examples))
    else:
        order = np.random.default_rng([config.seed, _SHUFFLE, epoch]).permutation(len(examples))
    return plan_rows(example_lengths(examples), order, config.max_seq_len, config.packing)


def batches_per_epoch(examples: Sequence[Example], config: DataConfig, epoch: int = 0) -> int:
    """Batches in `epoch` (with packing it can vary a little between epochs, as the shuffle does)."""
    return -(-len(_epoch_rows(examples, config, epoch)) // config.batch_size)


def train_batches(
    examples: Sequence[Example], config: DataConfig, *, pad_token_id: int, start: DataState = DataState()
) -> Iterator[tuple[Batch, DataState]]:
    """Shuffled batches, epoch after epoch, without end. Each comes with the state *after* it: save that
    state with a checkpoint and pass it back as `start` to get exactly the batches that would have
    followed. Each epoch is reshuffled by (seed, epoch); its last batch is topped up with empty rows."""
    if not examples:
        raise ValueError("no training examples")
    if start.epoch < 0 or start.index < 0:
        raise ValueError(f"invalid {start}")
    epoch, first = start.epoch, start.index
    while True:
        rows = _epoch_rows(examples, config, epoch)
        n = -(-len(rows) // config.batch_size)
        if first > n:
            raise ValueError(f"{start} is past the {n} batches of epoch {epoch}")
        for b in range(first, n):
            batch = make_batch(
                rows[b * config.batch_size : (b + 1) * config.batch_size],
                examples,
                batch_size=config.batch_size,
                seq_len=config.max_seq_len,
                pad_token_id=pad_token_id,
            )
            yield batch, (DataState(epoch=epoch, index=b + 1) if b + 1 < n else DataState(epoch=epoch + 1))
        epoch, first = epoch + 1, 0


def eval_batches(examples: Sequence[Example], config: DataConfig, *, pad_token_id: int) -> Iterator[Batch]:
    """One pass in file order (packed if `config.packing`); the last batch is topped up with empty rows."""
    rows = _epoch_rows(examples, config, None)
    for b in range(0, len(rows), config.batch_size):
        yield make_batch(
            rows[b : b + config.batch_size],
            examples,
            batch_size=config.batch_size,
            seq_len=config.max_seq_len,
            pad_token_id=pad_token_id,
        )
