"""Tokenized examples in three flat arrays, in memory or memory-mapped from a cache directory.

A `TokenStore` is a `Sequence[Example]`: example `i` is `ids[starts[i] : starts[i] + lengths[i]]` and the
same slice of `mask`. Kept in a cache directory, the arrays are raw files read through `np.memmap`, so a
corpus larger than RAM trains from the page cache, and a second run (a resume, another learning rate)
skips tokenization.

A cache entry is named by the SHA-256 of everything that decides its tokens: the source's identity
(paths, sizes and modification times of its files, or a hub id), split, format and column mapping,
max_seq_len and the overlong policy, and the tokenizer (its type and the files `Tokenizer.save` writes).
Entries are written to a temporary directory and renamed into place, so a killed run leaves none half
written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxlora.tokenizer import Tokenizer
from jaxlora.train.records import Example

CACHE_VERSION = 1  # bump when the token layout or the meaning of a key part changes
_FILES = {"ids": np.int32, "mask": np.bool_, "lengths": np.int64}
_FLUSH_TOKENS = 1 << 20  # a streamed build holds at most about this many tokens before writing them out


class TokenStore(Sequence[Example]):
    def __init__(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, starts: np.ndarray | None = None):
        self.ids, self.mask = ids, mask  # (tokens,) int32 / bool
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (examples,)
        self.starts = np.cumsum(self.lengths) - self.lengths if starts is None else starts  # (examples,)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int | slice) -> Example | TokenStore:
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        n = len(self.lengths)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        s, k = int(self.starts[i]), int(self.lengths[i])
        return Example(self.ids[s : s + k], self.mask[s : s + k])

    def __iter__(self) -> Iterator[Example]:
        for s, k in zip(self.starts.tolist(), self.lengths.tolist()):
            yield Example(self.ids[s : s + k], self.mask[s : s + k])

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenStore:
        """The examples at `indices`, in that order, sharing this store's token arrays."""
        idx = np.asarray(indices, dtype=np.int64)
        return TokenStore(self.ids, self.mask, self.lengths[idx], self.starts[idx])


def example_lengths(examples: Sequence[Example]) -> np.ndarray:
    """Token count of every example; a store knows them without touching its tokens."""
    if isinstance(examples, TokenStore):
        return examples.lengths
    return np.array([len(ex.input_ids) for ex in examples], dtype=np.int64)


class _Writer:
    """Appends examples to raw files (or to lists, without a directory), a chunk at a time."""

    def __init__(self, directory: Path | None):
        self.directory, self.files = directory, None
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in _FILES}
        self.buffered = 0
        if directory is not None:
            self.files = {name: open(directory / f"{name}.bin", "wb") for name in _FILES}

    def add(self, ex: Example) -> None:
        self.chunks["ids"].append(np.asarray(ex.input_ids, dtype=np.int32))
        self.chunks["mask"].append(np.asarray(ex.loss_mask, dtype=np.bool_))
        self.chunks["lengths"].append(np.array([len(ex.input_ids)], dtype=np.int64))
        self.buffered += len(ex.input_ids)
        if self.files is not None and self.buffered >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        for name, f in self.files.items():
            if self.chunks[name]:
                f.write(np.concatenate(self.chunks[name]).tobytes())
            self.chunks[name] = []
        self.buffered = 0

    def finish(self) -> dict[str, np.ndarray] | None:
        if self.files is None:
            return {name: np.concatenate(self.chunks[name]) if self.chunks[name] else np.zeros(0, dtype)
                    for name, dtype in _FILES.items()}
        self.flush()
        for f in self.files.values():
            f.close()
        return None


def build_store(examples: Iterable[Example | None], cache: Path | None = None) -> tuple[TokenStore, int]:
    """A store of `examples` (None marks a dropped one) and the number dropped. With `cache` (a
    directory that must not exist yet), the tokens are streamed to files there and the store maps them."""
    tmp = None
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        writer, dropped, n = _Writer(tmp), 0, 0
        for ex in examples:
            if ex is None:
                dropped += 1
            else:
                writer.add(ex)
                n += 1
        arrays = writer.finish()
        if tmp is None:
            return TokenStore(arrays["ids"], arrays["mask"], arrays["lengths"]), dropped
        (tmp / "meta.json").write_text(json.dumps({"examples": n, "dropped": dropped}))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process finished the same entry first: its tokens are the same
            shutil.rmtree(tmp)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(cache)


def open_store(cache: Path) -> tuple[TokenStore, int] | None:
    """The store and drop count of a finished cache entry, or None when there is none."""
    meta_file = cache / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    arrays = {}
    for name, dtype in _FILES.items():
        path = cache / f"{name}.bin"
        # np.memmap cannot map an empty file; an entry without examples has nothing to map.
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    if len(arrays["lengths"]) != meta["examples"] or int(arrays["lengths"].sum()) != len(arrays["ids"]):
        raise ValueError(f"token cache {cache} is inconsistent with its meta.json; delete it to rebuild")
    return TokenStore(arrays["ids"], arrays["mask"], arrays["lengths"]), int(meta["dropped"])


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's type and of the files its `save` writes (vocabulary, merges, special
    tokens, chat template): what decides the ids, whatever kind of tokenizer it is."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size)).encode())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for path in sorted(Path(d).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(d)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_entry(cache_dir: str | Path, parts: dict) -> Path:
    """The entry directory for the key `parts` (JSON values)."""
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "tokens" / key[:32]
