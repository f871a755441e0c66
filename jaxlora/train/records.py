"""Records -> tokenized examples with a loss mask.

A record is a dict in one of three formats (detected per source from the first record; a source that
mixes them is rejected). JSONL holds one per line; `jaxlora.train.sources` reads tables (parquet, csv,
arrow, Hugging Face datasets) into the same dicts, renaming mapped columns to these keys:

- `{"text": str}`: loss on every token.
- `{"prompt": str, "completion": str}`: loss on the completion only. The two are joined with no
  separator, so put any space or newline you want into the strings.
- `{"messages": [{"role": str, "content": str}, ...]}`: rendered by the tokenizer's chat template;
  loss on the assistant turns only (content plus whatever the template closes the turn with, e.g.
  `<|eot_id|>`), so the model learns to stop.

Every record becomes a text plus character spans that carry the loss. The text is tokenized in one
piece and a token is in the loss when its last character lies in a span, so the ids are exactly what
tokenizing the whole conversation gives. For chat, assistant turn `i` spans from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i + 1])`; a
template whose renders are not prefixes of one another (one that rewrites earlier turns) is rejected.

bos/eos: bos is prepended unless the tokenizer has none or the template already rendered it. eos is
appended (and in the loss) for `text` and `prompt`/`completion`; for chat the template closes turns.

Alignment: `loss_mask[t]` says whether token `t` is a *target*, i.e. whether the prediction of token
`t` from tokens `< t` is in the loss. `loss_mask[0]` is always False. The causal-LM loss uses
`logits[:, :-1]` against `input_ids[:, 1:]` weighted by `loss_mask[:, 1:]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

import numpy as np

from jaxlora.tokenizer import Tokenizer

Format = Literal["auto", "text", "prompt_completion", "chat"]
Overlong = Literal["error", "truncate", "drop"]
FORMATS = ("auto", "text", "prompt_completion", "chat")
OVERLONG = ("error", "truncate", "drop")
_KEYS = {"text": {"text"}, "prompt_completion": {"prompt", "completion"}, "chat": {"messages"}}


class Example(NamedTuple):
    input_ids: np.ndarray  # (n,) int32
    loss_mask: np.ndarray  # (n,) bool, aligned to targets: mask[t] <=> token t is predicted with loss


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, record) for every non-blank line; bad JSON names the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def record_format(record: dict, where: str) -> str:
    """The format whose keys the record has exactly."""
    keys = set(record)
    for name, want in _KEYS.items():
        if keys == want:
            return name
    for name, want in _KEYS.items():
        if keys & want:
            missing, unknown = sorted(want - keys), sorted(keys - want)
            what = [f"missing keys {missing}"] * bool(missing) + [f"unknown keys {unknown}"] * bool(unknown)
            raise ValueError(f"{where}: {name!r} record with {' and '.join(what)}")
    raise ValueError(f"{where}: unknown keys {sorted(keys)}; expected one of {[sorted(k) for k in _KEYS.values()]}")


def _str_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_text(messages: object, tokenizer: Tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"{where}: messages[{j}] must have exactly the keys 'role' and 'content'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ValueError(f"{where}: messages[{j}] 'role' and 'content' must be strings")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to train on")

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
        except Exception as e:  # a Jinja template raises whatever it likes (e.g. role alternation)
            raise ValueError(f"{where}: chat template failed: {e}") from e

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(end) and end.startswith(start)):
            raise ValueError(f"{where}: the chat template does not render message prefixes as text prefixes")
        spans.append((len(start), len(end)))
    return text, spans


def encode_record(record: dict, fmt: str, tokenizer: Tokenizer, where: str) -> Example:
    """Tokenize one record of a known format; `where` ("file:line") prefixes every error."""
    if fmt == "text":
        text = _str_field(record, "text", where)
        spans = [(0, len(text))]
    elif fmt == "prompt_completion":
        prompt = _str_field(record, "prompt", where)
        text = prompt + _str_field(record, "completion", where)
        spans = [(len(prompt), len(text))]
    else:
        text, spans = _chat_text(record["messages"], tokenizer, where)
    if fmt != "chat" and spans[0][0] == spans[0][1]:
        raise ValueError(f"{where}: empty {'text' if fmt == 'text' else 'completion'}")

    ids, offsets = tokenizer.encode_with_offsets(text)
    # A token belongs to the span holding its last character: one that straddles the prompt/completion
    # boundary predicts completion text, so it carries loss.
    last = np.array([e - 1 if e > s else s for s, e in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        mask |= (last >= s) & (last < e)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if fmt != "chat" and eos is not None:
        ids, mask = [*ids, eos], np.append(mask, True)
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos, *ids], np.insert(mask, 0, False)
    mask[0] = False  # nothing predicts the first token
    return Example(np.asarray(ids, dtype=np.int32), mask)


def encode_records(
    records: Iterable[tuple[str, dict]], tokenizer: Tokenizer, *, format: Format, max_seq_len: int, overlong: Overlong
) -> Iterator[Example | None]:
    """Tokenize `(where, record)` pairs in order; None stands for a record dropped by the overlong policy
    (or left without a target after truncation). `where` ("file:line", "source row i") prefixes errors."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    fmt, first = None if format == "auto" else format, None
    for where, record in records:
        got = record_format(record, where)
        if fmt is None:
            fmt, first = got, where
        elif got != fmt:
            origin = f"detected at {first}" if first else "requested"
            raise ValueError(f"{where}: {got!r} record in a {fmt!r} file ({origin}); formats cannot be mixed")
        ex = encode_record(record, fmt, tokenizer, where)
        n = len(ex.input_ids)
        if n > max_seq_len:
            if overlong == "error":
                raise ValueError(
                    f"{where}: {n} tokens exceed max_seq_len={max_seq_len} "
                    "(set overlong='truncate' or 'drop' to allow this)"
                )
            if overlong == "drop":
                yield None
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.loss_mask[:max_seq_len])
        # Truncation can cut every target away; a one-token text has none to begin with.
        yield ex if ex.loss_mask.any() else None
