"""Offline data for the demo and the seed experiments: a pretraining corpus and skills it lacks.

The pretraining corpus teaches a tiny model what numbers and short sentences look like — counting
(also in steps of 2..9), copying, comparing magnitudes in words — but never shows the `a+b=` question.
Skip-counting gives the base a latent ability; the fine-tuning tasks ask for a skill the base lacks as
a behaviour, answering the question (seed 003: even small ranks learn narrow domains such as arithmetic):

  addition     {"prompt": "27+8=", "completion": "35"}
  subtraction  {"prompt": "27-8=", "completion": "19"}   (a second task, for combining adapters)

Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_NAMES = ["ada", "bo", "cy", "di", "ed", "flo", "gus", "hal"]
_THINGS = ["apples", "stones", "books", "coins", "birds", "cups"]
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits_in_words(n: int) -> str:
    return " ".join(_WORDS[int(d)] for d in str(n))


def corpus_line(rng: random.Random) -> str:
    """One line of the pretraining corpus: number-literate text with no arithmetic in it."""
    kind = rng.randrange(5)
    a = rng.randrange(100)
    if kind == 0:
        step = rng.choice([1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        return f"count by {step} from {a}: " + " ".join(str(a + step * i) for i in range(rng.randrange(4, 9)))
    if kind == 1:
        return f"copy {a}: {a}"
    if kind == 2:
        b = rng.randrange(100)
        rel = "more" if a > b else "less" if a < b else "as many"
        return f"{rng.choice(_NAMES)} has {a} {rng.choice(_THINGS)}, {rel} than {b}."
    if kind == 3:
        return f"{a} is said {_digits_in_words(a)}."
    return f"{rng.choice(_NAMES)} sees {a} {rng.choice(_THINGS)}."


def pretraining_corpus(n: int, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": corpus_line(rng)} for _ in range(n)]


def arithmetic(op: str, *, seed: int, max_a: int = 99, max_b: int = 9) -> list[dict]:
    """Every problem `a op b` with a ≤ max_a, b ≤ max_b (and b ≤ a for subtraction), shuffled."""
    if op not in ("+", "-"):
        raise ValueError(f"op={op!r}; choose '+' or '-'")
    rows = []
    for a in range(max_a + 1):
        for b in range(max_b + 1):
            if op == "-" and b > a:
                continue
            rows.append({"prompt": f"{a}{op}{b}=", "completion": str(a + b if op == "+" else a - b)})
    random.Random(seed).shuffle(rows)
    return rows


def split(rows: list[dict], n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out eval): the eval problems never appear in training."""
    return rows[n_eval:], rows[:n_eval]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
