"""The data pipeline, with the byte tokenizer so every id and mask bit can be worked out by hand."""

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.batching import make_batch, plan_rows
from jaxlora.train.data import (
    DataConfig,
    DataState,
    batches_per_epoch,
    eval_batches,
    load_data,
    train_batches,
)
from jaxlora.train.records import Example, encode_record

TOK = ByteTokenizer()
BOS, EOS, PAD = 256, 257, 258


def write_jsonl(tmp_path, lines, name="d.jsonl"):
    """Records (dicts) or raw lines (str) -> a JSONL file; returns its path."""
    path = tmp_path / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def config(path, **kw):
    return DataConfig(**{"path": path, "max_seq_len": 64, "batch_size": 2, **kw})


def b(s):
    return list(s.encode())


# --- masks, worked by hand -------------------------------------------------------------------------


def test_text_mask():
    ex = encode_record({"text": "ab"}, "text", TOK, "f:1")
    assert ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == bool
    assert ex.input_ids.tolist() == [BOS, 97, 98, EOS]
    assert ex.loss_mask.tolist() == [False, True, True, True]  # aligned to targets: bos is never predicted


def test_no_bos_tokenizer():
    class NoBos(ByteTokenizer):  # Qwen-style: no bos, so the first text token is the unpredicted one
        bos_token_id = None

    ex = encode_record({"text": "ab"}, "text", NoBos(), "f:1")
    assert ex.input_ids.tolist() == [97, 98, EOS]
    assert ex.loss_mask.tolist() == [False, True, True]


def test_prompt_completion_mask():
    ex = encode_record({"prompt": "Q:", "completion": " A"}, "prompt_completion", TOK, "f:1")
    assert ex.input_ids.tolist() == [BOS, *b("Q:"), *b(" A"), EOS]
    assert ex.loss_mask.tolist() == [False, False, False, True, True, True]


def test_chat_mask_two_turns():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "é"},
    ]
    ex = encode_record({"messages": msgs}, "chat", TOK, "f:1")
    prompt1 = b("<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n")
    prompt2 = b("<|user|>\nok\n<|assistant|>\n")
    assert ex.input_ids.tolist() == [BOS, *prompt1, *b("yo"), EOS, *prompt2, *b("é"), EOS]
    want = [False] * (1 + len(prompt1)) + [True] * 3 + [False] * len(prompt2) + [True] * 3  # é is 2 bytes
    assert ex.loss_mask.tolist() == want


def test_chat_template_must_render_prefixes():
    class Rewriting(ByteTokenizer):  # drops earlier turns, as some "thinking" templates do
        def apply_chat_template(self, messages, *, add_generation_prompt=False):
            return super().apply_chat_template(messages[-1:], add_generation_prompt=add_generation_prompt)

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="f:7: the chat template does not render message prefixes"):
        encode_record({"messages": msgs}, "chat", Rewriting(), "f:7")


# --- formats and errors name the file and line ----------------------------------------------------


def test_format_detected_per_file(tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for rec in ({"text": "x y"}, {"prompt": "p", "completion": "c"}, {"messages": chat}):
        data = load_data(config(write_jsonl(tmp_path, [rec, rec])), TOK)
        assert len(data.train) == 2
    data = load_data(config(write_jsonl(tmp_path, [{"prompt": "p", "completion": "c"}])), TOK)
    assert data.train[0].loss_mask.tolist() == [False, False, True, True]  # not treated as text


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"text": "a"', r"d\.jsonl:3: malformed JSON"),
        ("[1, 2]", r"d\.jsonl:3: expected a JSON object"),
        ('{"prompt": "a"}', r"d\.jsonl:3: 'prompt_completion' record with missing keys \['completion'\]"),
        ('{"text": "a", "id": 1}', r"d\.jsonl:3: 'text' record with unknown keys \['id'\]"),
        ('{"input": "a"}', r"d\.jsonl:3: unknown keys \['input'\]"),
        ('{"text": 5}', r"d\.jsonl:3: 'text' must be a string, got int"),
        ('{"text": ""}', r"d\.jsonl:3: empty text"),
        ('{"prompt": "a", "completion": ""}', r"d\.jsonl:3: 'prompt_completion' record in a 'text' file"),
        ('{"messages": [{"role": "user", "content": "a"}]}', r"d\.jsonl:3: 'chat' record in a 'text' file"),
    ],
)
def test_bad_line_named(tmp_path, bad, message):
    # Line 2 is blank: line numbers count the file's physical lines, blank ones included.
    path = write_jsonl(tmp_path, [{"text": "ok"}, "", bad])
    with pytest.raises(ValueError, match=message):
        load_data(config(path), TOK)


@pytest.mark.parametrize(
    "messages, message",
    [
        ("hi", "'messages' must be a non-empty list"),
        ([], "'messages' must be a non-empty list"),
        ([{"role": "user"}], r"messages\[0\] must have exactly the keys"),
        ([{"role": "assistant", "content": 3}], r"messages\[0\] 'role' and 'content' must be strings"),
        ([{"role": "user", "content": "a"}], "no assistant message"),
    ],
)
def test_bad_chat_named(tmp_path, messages, message):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path, [ok, {"messages": messages}])
    with pytest.raises(ValueError, match=f"d.jsonl:2: {message}"):
        load_data(config(path), TOK)


def test_explicit_format_mismatch(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "a"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: 'text' record in a 'chat' file \(requested\)"):
        load_data(config(path, format="chat"), TOK)


def test_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"d\.jsonl: no usable examples"):
        load_data(config(write_jsonl(tmp_path, ["", "  "])), TOK)


def test_overlong_policies(tmp_path):
    path = write_jsonl(tmp_path, [{"text": "abc"}, {"text": "abcdefgh"}])  # 5 and 10 tokens with bos/eos
    with pytest.raises(ValueError, match=r"d\.jsonl:2: 10 tokens exceed max_seq_len=6 .*'truncate' or 'drop'"):
        load_data(config(path, max_seq_len=6), TOK)
    dropped = load_data(config(path, max_seq_len=6, overlong="drop"), TOK)
    assert [ex.input_ids.tolist() for ex in dropped.train] == [[BOS, *b("abc"), EOS]] and dropped.dropped == 1
    cut = load_data(config(path, max_seq_len=6, overlong="truncate"), TOK)
    assert cut.train[1].input_ids.tolist() == [BOS, *b("abcde")] and cut.dropped == 0
    with pytest.raises(ValueError, match=r"no usable examples after dropping 2"):
        load_data(config(path, max_seq_len=4, overlong="drop"), TOK)


def test_truncation_that_removes_all_targets_drops(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "long prompt", "completion": "c"}, {"prompt": "p", "completion": "c"}])
    data = load_data(config(path, max_seq_len=6, overlong="truncate"), TOK)
    assert len(data.train) == 1 and data.dropped == 1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
        (dict(batch_size=-1), "batch_size=-1 must be"),
        (dict(max_seq_len=0), "max_seq_len=0 must be"),
        (dict(overlong="skip"), "overlong must be one of"),
        (dict(format="jsonl"), "format must be one of"),
        (dict(eval_fraction=1.0), r"eval_fraction=1.0 must be a finite number in \[0, 1\)"),
        (dict(eval_fraction=0.1, eval_path="e.jsonl"), "not both"),
    ],
)
def test_config_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        config("d.jsonl", **kw)


# --- batching and packing -------------------------------------------------------------------------


def examples_of(lengths, seed=0):
    """Examples with random ids (no zeros-only data) whose first target bit is off, as encode makes them."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = rng.random(n) < 0.7
        mask[0] = False
        out.append(Example(rng.integers(0, 256, n).astype(np.int32), mask))
    return out


def test_padded_batch():
    exs = examples_of([3, 5, 2])
    batch = make_batch([[0], [1], [2]], exs, batch_size=4, seq_len=6, pad_token_id=PAD)
    assert batch.input_ids.shape == (4, 6) and batch.input_ids.dtype == np.int32
    assert batch.loss_mask.dtype == bool and batch.attention_mask.dtype == np.int32
    assert batch.input_ids[1, :5].tolist() == exs[1].input_ids.tolist() and batch.input_ids[1, 5] == PAD
    assert batch.attention_mask.sum(1).tolist() == [3, 5, 2, 0]  # the 4th row is an empty top-up row
    assert not batch.loss_mask[3].any() and (batch.input_ids[3] == PAD).all()
    assert batch.positions[1].tolist() == [0, 1, 2, 3, 4, 0]
    assert batch.segment_ids[0].tolist() == [1, 1, 1, 0, 0, 0]


@given(st.lists(st.integers(1, 12), min_size=1, max_size=30), st.integers(0, 100))
@settings(max_examples=40, deadline=None)
def test_packing_keeps_every_token_once(lengths, seed):
    exs = examples_of(lengths, seed)
    order = np.random.default_rng(seed).permutation(len(exs))
    rows = plan_rows(lengths, order, 12, packing=True)
    batch = make_batch(rows, exs, batch_size=len(rows), seq_len=12, pad_token_id=PAD)
    seen = []
    for r in range(len(rows)):
        seg, pos = batch.segment_ids[r], batch.positions[r]
        assert (np.diff(seg[seg > 0]) >= 0).all() and (batch.attention_mask[r] == (seg > 0)).all()
        for s in range(1, seg.max() + 1):
            at = seg == s
            assert pos[at].tolist() == list(range(at.sum()))  # positions restart in every example
            assert not batch.loss_mask[r][at][0]  # no target is predicted across an example boundary
            seen.append((batch.input_ids[r][at].tobytes(), batch.loss_mask[r][at].tobytes()))
    assert Counter(seen) == Counter((ex.input_ids.tobytes(), ex.loss_mask.tobytes()) for ex in exs)
    assert sorted(i for row in rows for i in row) == list(range(len(exs)))
    if len(rows) > 1:  # next-fit: a row was closed only because the next example did not fit
        assert all(sum(lengths[i] for i in rows[k]) + lengths[rows[k + 1][0]] > 12 for k in range(len(rows) - 1))


# --- shuffling, epochs, resume --------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path, [{"text": "x" * (1 + i % 7) + str(i)} for i in range(11)])


def take(it, n):
    return [next(it) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        all(np.array_equal(x, y) for x, y in zip(a, c)) for a, c in zip(batches_a, batches_b)
    )


@pytest.mark.parametrize("packing", [False, True])
def test_shuffle_is_deterministic_and_covers_each_epoch(corpus, packing):
    cfg = config(corpus, batch_size=3, max_seq_len=16, packing=packing, seed=5)
    data = load_data(cfg, TOK)
    n = batches_per_epoch(data.train, cfg, 0)
    run = [bt for bt, _ in take(train_batches(data.train, cfg, pad_token_id=PAD), 3 * n)]
    again = [bt for bt, _ in take(train_batches(data.train, cfg, pad_token_id=PAD), 3 * n)]
    assert same(run, again)
    other = config(corpus, batch_size=3, max_seq_len=16, packing=packing, seed=6)
    assert not same(run, [bt for bt, _ in take(train_batches(data.train, other, pad_token_id=PAD), 3 * n)])
    docs = lambda bts: [  # noqa: E731 -- the example token strings of an epoch, in order
        bt.input_ids[r][bt.segment_ids[r] == s].tobytes()
        for bt in bts
        for r in range(cfg.batch_size)
        for s in range(1, bt.segment_ids[r].max() + 1)
    ]
    epoch0, epoch1 = docs(run[:n]), docs(run[n : n + batches_per_epoch(data.train, cfg, 1)])
    want = sorted(ex.input_ids.tobytes() for ex in data.train)
    assert sorted(epoch0) == want and sorted(epoch1) == want and epoch0 != epoch1  # reshuffled per epoch


@pytest.mark.parametrize("packing", [False, True])
def test_resume_sees_the_same_batches(corpus, packing):
    cfg = config(corpus, batch_size=3, max_seq_len=16, packing=packing, seed=1)
    data = load_data(cfg, TOK)
    full = take(train_batches(data.train, cfg, pad_token_id=PAD), 12)  # over two epochs
    assert full[-1][1].epoch >= 2
    for k in range(len(full)):
        saved = json.loads(json.dumps(full[k][1].to_dict()))  # as a checkpoint would store it
        resumed = take(train_batches(data.train, cfg, pad_token_id=PAD, start=DataState.from_dict(saved)), 3)
        want = full[k + 1 : k + 4]
        assert same([bt for bt, _ in resumed[: len(want)]], [bt for bt, _ in want])
        assert [st for _, st in resumed[: len(want)]] == [st for _, st in want]
    with pytest.raises(ValueError, match="past the"):
        next(train_batches(data.train, cfg, pad_token_id=PAD, start=DataState(epoch=0, index=99)))


# --- eval split -----------------------------------------------------------------------------------


def test_eval_fraction_is_deterministic_and_disjoint(corpus, tmp_path):
    key = lambda exs: [ex.input_ids.tobytes() for ex in exs]  # noqa: E731
    full = key(load_data(config(corpus), TOK).train)
    a = load_data(config(corpus, eval_fraction=0.3, seed=3), TOK)
    assert len(a.eval) == 3 and len(a.train) == 8
    assert sorted(key(a.train) + key(a.eval)) == sorted(full)
    assert key(a.eval) == [k for k in full if k in key(a.eval)]  # file order kept
    assert key(load_data(config(corpus, eval_fraction=0.3, seed=3), TOK).eval) == key(a.eval)
    assert key(load_data(config(corpus, eval_fraction=0.3, seed=4), TOK).eval) != key(a.eval)
    with pytest.raises(ValueError, match="leaves none to train on"):
        load_data(config(write_jsonl(tmp_path, [{"text": "a"}], "one.jsonl"), eval_fraction=0.5), TOK)


def test_eval_path_and_eval_batches(corpus, tmp_path):
    eval_file = write_jsonl(tmp_path, [{"text": t} for t in ["a", "bb", "ccc"]], "eval.jsonl")
    cfg = config(corpus, eval_path=eval_file, batch_size=2)
    data = load_data(cfg, TOK)
    assert len(data.train) == 11 and [len(ex.input_ids) for ex in data.eval] == [3, 4, 5]
    batches = list(eval_batches(data.eval, cfg, pad_token_id=PAD))
    assert len(batches) == 2 and batches[1].attention_mask.sum(1).tolist() == [5, 0]  # file order, topped up
    with pytest.raises(ValueError, match=r"eval\.jsonl:2: malformed JSON"):
        load_data(config(corpus, eval_path=write_jsonl(tmp_path, [{"text": "a"}, "{"], "eval.jsonl")), TOK)
