"""Stacked, scanned decoder layers (jaxlora/models/stack.py): runs, per-layer views, unstacked edits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.lora_config import LoraConfig
from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.stack import LayerStack, unstacked
from jaxlora.peft_model import get_peft_model
from jaxlora.targets import lora_layers
from tests._models import tiny_llama_config

CONFIG = tiny_llama_config(num_hidden_layers=4, initializer_range=0.3)


def test_one_structure_is_one_run():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    stack = model.model.layers
    assert isinstance(stack, LayerStack) and stack.sizes == (4,) and len(stack) == 4
    assert stack.runs[0].self_attn.q_proj.kernel.shape == (4, 32, 32)  # (layers, in, out)
    assert model.model.layers[2].self_attn.q_proj.kernel.shape == (32, 32)  # a per-layer view


def test_layers_of_another_structure_start_a_run():
    """Mistral-style full / sliding layers: consecutive layers of one window share a run."""
    types = ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    config = LlamaConfig(**{**CONFIG.__dict__, "model_type": "mistral", "sliding_window": 3, "layer_types": types})
    assert LlamaForCausalLM(config, rngs=nnx.Rngs(0)).model.layers.sizes == (1, 2, 1)


def test_rank_pattern_splits_runs_and_keeps_per_layer_names():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 64, dtype=jnp.int32)
    base = model(ids)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj",), init_lora_weights="gaussian",
                        rank_pattern={"model.layers.2.self_attn.q_proj": 2})
    peft = get_peft_model(model, config, rngs=nnx.Rngs(2))
    assert model.model.layers.sizes == (2, 1, 1)
    layers = lora_layers(model)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    assert [layers[f"model.layers.{i}.self_attn.q_proj"].adapters["default"].r for i in range(4)] == [4, 4, 2, 4]
    # B starts at zero with "gaussian" in PEFT too; set it so that the adapters change the output.
    with unstacked(model):
        for layer in lora_layers(model).values():
            adapter = layer.adapters["default"]
            adapter.lora_b.set_value(jnp.ones_like(adapter.lora_b.get_value()))
    assert np.abs(np.asarray(peft(ids) - base)).max() > 1e-3


def test_an_untouched_edit_reuses_every_array():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    before = jax.tree.leaves(nnx.state(model))
    with unstacked(model) as m:
        assert isinstance(m.model.layers, nnx.List) and len(m.model.layers) == 4
    after = jax.tree.leaves(nnx.state(model))
    assert all(a is b for a, b in zip(before, after))


def test_unstacked_edits_reach_the_stack():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    with unstacked(model):
        model.model.layers[1].mlp.up_proj.kernel.set_value(jnp.full((32, 64), 7.0))
    kernel = np.asarray(model.model.layers.runs[0].mlp.up_proj.kernel.get_value())
    assert (kernel[1] == 7.0).all() and not (kernel[0] == 7.0).any()


def test_chunked_mlp_equals_one_call(monkeypatch):
    """Long sequences run the MLP in rematerialized chunks of positions: the same logits and gradients."""
    from jaxlora.models import llama

    model = get_peft_model(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"), rngs=nnx.Rngs(1))
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 64, dtype=jnp.int32)

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    whole, g_whole = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    monkeypatch.setattr(llama, "MLP_CHUNK", 4)  # 8 positions: two chunks
    chunked, g_chunked = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):  # fp32, another summation order
        assert np.abs(np.asarray(a - b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
