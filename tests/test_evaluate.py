"""Evaluation (jaxlora/evaluate.py): the loss over a data set and completion accuracy, also with PEFT's
mixed-adapter `adapter_names` (one adapter per example, "__base__" for the base model).

fp32 throughout: a row of a mixed batch computes the same sums as the single-adapter run (base output plus
that adapter's delta), so losses match to 1e-6 relative (summation order of the batched matmuls only) and
greedy completions token for token.
"""

import json

import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.evaluate import completion_accuracy, eval_loss
from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.data import DataConfig, load_data
from jaxlora.train.step import lm_loss
from tests._models import tiny_llama_config

TOK = ByteTokenizer()
CFG = tiny_llama_config(vocab_size=TOK.vocab_size, max_position_embeddings=64)
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(3) for b in range(11, 14)]  # 9 examples
NAMES = ["a", "__base__", "b"] * 3
DATA = DataConfig(path="", max_seq_len=16, batch_size=4)  # 9 examples: the last batch is topped up


def base():
    return jaxlora.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


def two_adapters():
    """Adapters "a" (r 4, every linear layer) and "b" (r 2, some layers) over `base()`, B nonzero."""
    model = base()
    model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                   rngs=nnx.Rngs(1), adapter_name="a")
    jaxlora.add_adapter(model, "b", jaxlora.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]),
                        rngs=nnx.Rngs(2))
    return model


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return load_data(DataConfig(path=str(path), max_seq_len=16, batch_size=4), TOK).train


def targets(example) -> int:
    return int(example.loss_mask[1:].sum())  # the first token is never a target (position t predicts t+1)


def test_eval_loss_rows_match_single_adapter_runs(examples):
    model, plain = two_adapters(), base()
    other = ["b", "b", "a", "__base__", "a", "b", "__base__", "__base__", "a"]
    traces = []

    def counting_loss(m, batch):  # counts traces: another combination of names must not compile again
        traces.append(1)
        return lm_loss(m, batch)

    mixed = {tuple(names): eval_loss(model, examples, DATA, pad_token_id=TOK.pad_token_id, loss_fn=counting_loss,
                                     adapter_names=names) for names in (NAMES, other)}
    assert len(traces) == 1
    # Each example's loss under each adapter alone (set_adapter; the base: the same model without adapters).
    alone = {}
    for name in ("a", "b", "__base__"):
        if name != "__base__":
            jaxlora.set_adapter(model, name)
        run = plain if name == "__base__" else model
        alone[name] = [eval_loss(run, examples.select([i]), DATA, pad_token_id=TOK.pad_token_id)
                       for i in range(len(examples))]
    for name in ("a", "b"):  # the adapters matter, so a row that ran the wrong adapter would show
        assert np.min(np.abs(np.subtract(alone[name], alone["__base__"]))) > 1e-3
    counts = [targets(ex) for ex in examples]
    for names, loss in mixed.items():
        want = sum(alone[n][i] * counts[i] for i, n in enumerate(names)) / sum(counts)  # token-weighted mean
        np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_completion_accuracy_rows_match_single_adapter_runs():
    model, plain = two_adapters(), base()
    acc, mixed = completion_accuracy(model, TOK, ROWS, batch_size=4, max_new_tokens=3, adapter_names=NAMES)
    alone = {"__base__": completion_accuracy(plain, TOK, ROWS, batch_size=4, max_new_tokens=3)[1]}
    for name in ("a", "b"):
        jaxlora.set_adapter(model, name)
        alone[name] = completion_accuracy(model, TOK, ROWS, batch_size=4, max_new_tokens=3)[1]
    assert mixed == [alone[n][i] for i, n in enumerate(NAMES)]
    assert alone["a"] != alone["__base__"] and alone["b"] != alone["__base__"]  # the adapters change the text
    hits = [o.strip() == r["completion"] for o, r in zip(mixed, ROWS)]
    assert acc == sum(hits) / len(ROWS)


def test_adapter_names_refusals(examples):
    model = two_adapters()
    with pytest.raises(ValueError, match="8 names for 9 examples"):
        eval_loss(model, examples, DATA, pad_token_id=TOK.pad_token_id, adapter_names=NAMES[:8])
    with pytest.raises(ValueError, match="list of names"):
        completion_accuracy(model, TOK, ROWS[:1], adapter_names="a")
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
        completion_accuracy(model, TOK, ROWS[:2], adapter_names=["a", "c"])
    packed = DataConfig(path="", max_seq_len=16, batch_size=4, packing=True)
    with pytest.raises(ValueError, match="packing=False"):
        eval_loss(model, examples, packed, pad_token_id=TOK.pad_token_id, adapter_names=NAMES)
