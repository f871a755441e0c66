"""Mixed-adapter batches (`jaxlora.mixed`, `jaxlora.PeftModel.adapter_rows`): each row runs its own adapter.

fp32 throughout: a row of a mixed batch computes the same sums as the single-adapter run (base output plus
that adapter's delta), so rows match to 1e-6 relative (summation order of the batched matmuls only).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.generate import generate
from jaxlora.lora_config import LoraConfig
from jaxlora.mixed import AdapterRows
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.peft_model import add_adapter, adapter_rows, get_peft_model, set_adapter
from jaxlora.targets import lora_layers
from tests._models import tiny_llama_config

CFG = tiny_llama_config()
NAMES = ["a", "__base__", "b"]


def two_adapters():
    """Adapter "a" (r 4, every linear layer) and "b" (r 2, some layers and the embedding), B nonzero."""
    model = get_peft_model(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), rngs=nnx.Rngs(1), adapter_name="a")
    add_adapter(model, "b", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
                rngs=nnx.Rngs(2))
    return model


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (3, 8)), jnp.int32)


def rel(x, y):
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def single(model, name, ids):
    if name == "__base__":
        with model.disable_adapter():
            return model(ids)
    set_adapter(model, name)
    return model(ids)


def test_rows_match_single_adapter_runs():
    model, ids = two_adapters(), tokens()
    mixed = model(ids, adapter_rows=adapter_rows(model, NAMES))
    runs = {n: single(model, n, ids) for n in set(NAMES)}
    for i, name in enumerate(NAMES):
        assert rel(mixed[i], runs[name][i]) < 1e-6, name
    assert rel(runs["a"], runs["__base__"]) > 1e-2 and rel(runs["b"], runs["__base__"]) > 1e-2  # adapters matter
    assert rel(runs["a"], runs["b"]) > 1e-2


def test_another_combination_does_not_retrace():
    model, ids = two_adapters(), tokens(1)
    traces = []

    @nnx.jit
    def forward(model, ids, rows):
        traces.append(1)
        return model(ids, adapter_rows=rows)

    first = forward(model, ids, adapter_rows(model, NAMES))
    second = forward(model, ids, adapter_rows(model, ["b", "b", "__base__"]))
    assert len(traces) == 1
    runs = {n: single(model, n, ids) for n in ("a", "b", "__base__")}
    for out, names in ((first, NAMES), (second, ["b", "b", "__base__"])):
        for i, name in enumerate(names):
            assert rel(out[i], runs[name][i]) < 1e-6, (names, i)


def test_generate_with_adapter_names():
    """Greedy decoding, each row with its own adapter: the same tokens as decoding that row alone."""
    model, ids = two_adapters(), tokens(2)[:, :5]
    mixed = generate(model, ids, max_new_tokens=4, adapter_names=NAMES)
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with model.disable_adapter():
                alone = generate(model, ids[i:i + 1], max_new_tokens=4)
        else:
            set_adapter(model, name)
            alone = generate(model, ids[i:i + 1], max_new_tokens=4)
        np.testing.assert_array_equal(mixed[i], alone[0])


def test_refusals():
    model, ids = two_adapters(), tokens()
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
        adapter_rows(model, ["a", "c", "b"])
    with pytest.raises(ValueError, match="3 names for a batch of 2"):
        model(ids[:2], adapter_rows=adapter_rows(model, NAMES))
    with pytest.raises(ValueError, match="list of names"):
        adapter_rows(model, "a")
    layer = lora_layers(model.base_model.model)["model.layers.0.self_attn.q_proj"]  # a per-layer view
    rows = AdapterRows.from_names(NAMES, ("a", "b"))
    layer.merge("a")
    with pytest.raises(ValueError, match="merged"):
        layer(jnp.ones((3, layer.in_features)), rows)


def test_dora_refused():
    model = get_peft_model(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)),
                           LoraConfig(r=4, use_dora=True, init_lora_weights=False), rngs=nnx.Rngs(1), adapter_name="d")
    with pytest.raises(ValueError, match="DoRA"):
        adapter_rows(model, ["d", "__base__", "d"])
    assert adapter_rows(model, ["__base__"] * 3).names == ()  # the base alone is allowed


def test_train_mode_refused():
    model = get_peft_model(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), LoraConfig(r=4, lora_dropout=0.1),
                           rngs=nnx.Rngs(1))
    model.train()
    with pytest.raises(ValueError, match="train mode"):
        adapter_rows(model, ["default"] * 3)
