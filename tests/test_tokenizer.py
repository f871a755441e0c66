"""Tokenizers: the byte tokenizer exactly, and the Hugging Face wrapper on a tiny tokenizer built here
(no hub access)."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from jaxlora.train.records import encode_record

CHAT = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "the cat"},
    {"role": "user", "content": "world"},
    {"role": "assistant", "content": "sat on"},
]


@given(st.text(max_size=40))
@settings(max_examples=50, deadline=None)
def test_byte_roundtrip_and_offsets(text):
    tok = ByteTokenizer()
    ids, offsets = tok.encode_with_offsets(text)
    if "<|" not in text:  # no special-token strings: ids are exactly the UTF-8 bytes
        assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == re.sub(r"<\|(bos|eos|pad)\|>", "", text)  # one left-to-right pass, as encode
    # Offsets cover the text in order: each character's span yields exactly its bytes (or its special id).
    rebuilt = [tok.encode(text[s:e]) for (s, e), prev in zip(offsets, [None, *offsets]) if prev != (s, e)]
    assert [i for part in rebuilt for i in part] == ids
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_byte_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("a<|eos|>é<|bos|>") == [97, 257, 0xC3, 0xA9, 256]
    assert tok.encode_with_offsets("a<|eos|>é")[1] == [(0, 1), (1, 8), (8, 9), (8, 9)]
    assert tok.decode([256, 97, 257, 258]) == "a"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_byte_chat_template():
    tok = ByteTokenizer()
    msgs = [{"role": r, "content": c} for r, c in [("system", "s"), ("user", "hi"), ("assistant", "yo")]]
    prompt = "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs) == prompt + "yo<|eos|>"
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=True) == prompt


def test_byte_save_and_load(tmp_path):
    assert load_tokenizer("byte") == ByteTokenizer()
    ByteTokenizer().save(str(tmp_path / "ckpt"))
    assert load_tokenizer(str(tmp_path / "ckpt")) == ByteTokenizer()
    (tmp_path / "ckpt" / BYTE_TOKENIZER_FILE).write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(str(tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE trained on three strings, with a Jinja chat template, saved like a hub repo."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world", "the cat sat on the mat", "2+2=4"], trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", additional_special_tokens=specials[2:]
    )
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(str(path))
    return str(path)


def test_hf_wrapper(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    assert tok.vocab_size == len(tok.hf)
    ids = tok.encode("the cat")
    assert tok.bos_token_id not in ids  # encode adds no specials
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id]) == "the cat"
    assert tok.encode("<|end|>") == [4]  # special strings in text are single ids
    assert tok.apply_chat_template(CHAT[:1], add_generation_prompt=True) == "<s><|user|>hello<|end|><|assistant|>"
    tok.save(str(tmp_path / "saved"))
    assert load_tokenizer(str(tmp_path / "saved")).encode("hello world") == tok.encode("hello world")


def test_hf_chat_mask(hf_dir):
    """Through the data pipeline: loss exactly on each assistant content and its <|end|>, and the ids
    equal tokenizing the whole conversation at once (bos comes from the template, not added twice)."""
    tok = load_tokenizer(hf_dir)
    ex = encode_record({"messages": CHAT}, "chat", tok, "f:1")
    assert ex.input_ids.tolist() == tok.encode(tok.apply_chat_template(CHAT))
    assert ex.input_ids.tolist().count(tok.bos_token_id) == 1
    end = tok.encode("<|end|>")
    want = [False] * len(tok.encode("<s><|user|>hello<|end|><|assistant|>"))
    want += [True] * len(tok.encode("the cat") + end)
    want += [False] * len(tok.encode("<|user|>world<|end|><|assistant|>"))
    want += [True] * len(tok.encode("sat on") + end)
    np.testing.assert_array_equal(ex.loss_mask, want)


def test_hf_without_chat_template(hf_dir):
    tok = load_tokenizer(hf_dir)
    tok.hf.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template(CHAT)
