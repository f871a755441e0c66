"""Tokenizers: the small protocol the data pipeline and generation need, a built-in byte tokenizer for
offline tiny models, and a wrapper around `transformers.AutoTokenizer`.

`encode` never adds special tokens: the data pipeline decides where bos/eos go (see
`jaxlora.train.records`). Special-token strings that appear in the text (a chat template's
`<|eot_id|>`, the byte tokenizer's `<|eos|>`) are parsed as their single ids, as Hugging Face does.
`decode` drops special tokens.

    >>> tok = load_tokenizer("byte")
    >>> tok.encode("hi<|eos|>")
    [104, 105, 257]
    >>> tok.decode([256, 104, 105, 257])
    'hi'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

# Written next to a checkpoint by `ByteTokenizer.save`, read back by `load_tokenizer`. Its own name so
# that it can never be mistaken for a Hugging Face `tokenizer.json`.
BYTE_TOKENIZER_FILE = "jaxlora_tokenizer.json"

Message = dict[str, str]  # {"role": ..., "content": ...}


@runtime_checkable
class Tokenizer(Protocol):
    """What jaxlora asks of a tokenizer."""

    bos_token_id: int | None  # None where the tokenizer has no bos (Qwen); then none is added
    eos_token_id: int | None
    pad_token_id: int  # never None: padded positions are masked, so any valid id will do
    vocab_size: int  # ids are in [0, vocab_size)

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the [start, end) character span of `text` it came from."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str: ...

    def save(self, directory: str) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then `<|bos|>`=256, `<|eos|>`=257, `<|pad|>`=258 (vocab_size 259).

    Chat template (plain text; only `<|eos|>` is a special token): each message renders as
    `<|{role}|>\\n{content}` followed by `<|eos|>` for an assistant message and by `\\n` otherwise;
    the generation prompt is `<|assistant|>\\n`. An assistant turn therefore ends in eos, which is
    both what training puts in the loss and what generation stops on.

        >>> ByteTokenizer().apply_chat_template(
        ...     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        '<|user|>\\nhi\\n<|assistant|>\\nyo<|eos|>'
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259
    _specials = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}
    _special_re = re.compile("|".join(re.escape(s) for s in _specials))

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for m in [*self._special_re.finditer(text), None]:
            end = m.start() if m else len(text)
            for i in range(pos, end):  # every byte of a character points at that character
                b = text[i].encode("utf-8")
                ids.extend(b)
                offsets.extend([(i, i + 1)] * len(b))
            if m:
                ids.append(self._specials[m.group()])
                offsets.append((m.start(), m.end()))
                pos = m.end()
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"token id {int(i)} is outside the byte vocabulary [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        parts = [
            f"<|{m['role']}|>\n{m['content']}" + ("<|eos|>" if m["role"] == "assistant" else "\n") for m in messages
        ]
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def save(self, directory: str) -> None:
        """Write the tokenizer's identity so that `load_tokenizer(directory)` returns it again."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"type": "byte", "vocab_size": self.vocab_size, "version": 1}, f)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `transformers` tokenizer seen through the `Tokenizer` protocol (needs a fast tokenizer for
    `encode_with_offsets`, which the chat and prompt/completion masks use)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.eos_token_id = hf_tokenizer.eos_token_id
        # Many causal-LM tokenizers have no pad token; padded positions never reach the loss or
        # attention, so eos (or 0) is as good as any.
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.vocab_size = len(hf_tokenizer)  # `hf.vocab_size` leaves out added tokens

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        try:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:
            raise ValueError(f"{type(self.hf).__name__} gives no character offsets; use a fast tokenizer") from e
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        if not self.hf.chat_template:
            raise ValueError(f"tokenizer {self.hf.name_or_path!r} has no chat_template")
        return self.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def save(self, directory: str) -> None:
        self.hf.save_pretrained(directory)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.hf.name_or_path!r})"


# Files from which transformers' AutoTokenizer can build a tokenizer (fast, sentencepiece, BPE, WordPiece).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HOW = "pass a tokenizer directory, a hub id, or 'byte' for jaxlora's built-in byte tokenizer"


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a tokenizer `load_tokenizer` can read without a network."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in (BYTE_TOKENIZER_FILE, *HF_TOKENIZER_FILES))


def load_tokenizer(path_or_name: str) -> Tokenizer:
    """`"byte"` or a directory written by `ByteTokenizer.save` gives the `ByteTokenizer`; anything
    else goes to `transformers.AutoTokenizer.from_pretrained` (a local directory, or a hub id when
    online). A directory without tokenizer files, or a path that does not exist, raises
    FileNotFoundError saying so (not the missing-sentencepiece error transformers would give)."""
    if path_or_name == "byte":
        return ByteTokenizer()
    path = str(path_or_name)
    marker = os.path.join(path, BYTE_TOKENIZER_FILE)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                kind = json.load(f).get("type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{marker}: not a JSON object with a 'type' ({e})") from None
        if kind != "byte":
            raise ValueError(f"{marker}: unknown tokenizer type {kind!r}, expected 'byte'")
        return ByteTokenizer()
    if os.path.isdir(path) and not has_tokenizer_files(path):
        raise FileNotFoundError(f"{path} holds no tokenizer ({', '.join(HF_TOKENIZER_FILES)} or "
                                f"{BYTE_TOKENIZER_FILE}); {_HOW}")
    if not os.path.isdir(path) and (os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"tokenizer {path}: no such directory; {_HOW}")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"loading tokenizer {path!r} needs `transformers` (pip install transformers); "
                          "or use 'byte' for the built-in byte tokenizer") from e
    try:
        hf = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # offline, unknown hub id, a broken tokenizer.json: transformers raises many kinds
        raise ValueError(f"tokenizer {path!r} could not be loaded ({type(e).__name__}: {e}); {_HOW}") from e
    return HFTokenizer(hf)
