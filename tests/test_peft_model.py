"""PeftModel (jaxlora/peft_model.py): injection, what trains, multi-adapter switching, merging, JAX only (no torch).
LoraConfig, targeting and files: tests/test_lora_config.py, test_targets.py, test_peft_io.py.

Parity with PEFT itself is in parity_tests/test_adapters_parity.py; here the properties that need no
reference: which layers get adapters, what trains, what each model-level operation does to the logits.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxlora.layers import LoRALinear
from jaxlora.lora_config import LoraConfig
from jaxlora.mixed import Active
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.quantize import QuantConfig, quantize_model
from jaxlora.qlinear import QuantizedLinear
from jaxlora.peft_model import (PeftModel, adapter_rows, add_adapter, add_weighted_adapter, delete_adapter,
                                get_peft_model, load_adapter, merge_and_unload, print_trainable_parameters,
                                save_adapter, set_adapter, unload)
from jaxlora.targets import lora_layers
from tests._models import ALL_14, RANDOM, diff, quantize_linears, tiny, tiny_llama_config, tokens

# --- training and counting ------------------------------------------------------------------------


def test_only_lora_params_train():
    model = get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    frozen_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    x = tokens()

    def loss(m):
        logits = m(x[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], axis=-1))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int32 and float (as train/step.py)
        optimizer.update(model, grads)
    same = lambda a, b: bool(jnp.array_equal(a, b))  # noqa: E731
    frozen_same = jax.tree.map(same, frozen_before, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_moved = jax.tree.map(lambda a, b: not same(a, b), lora_before, nnx.state(model, nnx.LoRAParam))
    assert all(jax.tree.leaves(frozen_same)) and all(jax.tree.leaves(lora_moved))
    # A and B of the 7 projections of a layer, each stacked over the 2 scanned layers (ALL_14 modules)
    assert len(jax.tree.leaves(lora_moved)) == 2 * ALL_14 // 2


def test_print_trainable_parameters(capsys):
    dense_total = sum(x.size for x in jax.tree.leaves(nnx.state(tiny(), nnx.Param)))
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    trainable, total = print_trainable_parameters(model)
    assert trainable == 2 * (4 * 32 + 4 * 32) and total == dense_total + trainable
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * trainable / total:.4f}")
    # A 4-bit weight counts as out * in elements (PEFT's convention), so quantizing changes no count.
    quantized = get_peft_model(quantize_linears(tiny()), LoraConfig(r=4, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    assert print_trainable_parameters(quantized) == (trainable, total)
    q_proj = quantized.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, QuantizedLinear)


@pytest.mark.parametrize("bias, trained", [("all", {"q_proj", "k_proj", "v_proj"}), ("lora_only", {"q_proj"})])
def test_bias_trains_saves_and_loads(tmp_path, bias, trained):
    """PEFT's bias="all" / "lora_only" on qwen2 (q/k/v biases): the chosen base biases become nnx.LoRAParam,
    a train step moves them, the file carries them under PEFT's names, and unload freezes them again."""
    config = LoraConfig(**RANDOM, target_modules=["q_proj", "o_proj"], bias=bias)
    model, x = get_peft_model(tiny(model_type="qwen2"), config, rngs=nnx.Rngs(1)), tokens()
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    biases = {s for p in paths if p.endswith("bias") for s in p.split(".") if s.endswith("_proj")}
    assert biases == trained
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    q_proj = lambda: model.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731 (a fresh layer view)
    before = q_proj().base.bias.get_value()
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)
    assert diff(q_proj().base.bias.get_value(), before) > 0
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn."
    assert prefix + "q_proj.base_layer.bias" in tensors and (prefix + "k_proj.bias" in tensors) == (bias == "all")
    loaded = load_adapter(tiny(model_type="qwen2"), tmp_path / "a")  # biases from the file, into the base
    assert diff(loaded(x), model(x)) == 0
    assert isinstance(loaded.base_model.model.model.layers[1].self_attn.q_proj.base.bias, nnx.LoRAParam)
    plain = unload(loaded)
    assert not nnx.state(plain, nnx.LoRAParam) and type(plain.model.layers[1].self_attn.k_proj.bias) is nnx.Param


def test_biases_train_for_the_active_adapter_only(tmp_path):
    """Two adapters, one with bias="all": the base biases train (are nnx.LoRAParam, in `trainable`) only while
    it is active, as PEFT marks them by the active adapter's bias; its file carries them either way."""
    model = get_peft_model(tiny(model_type="qwen2"), LoraConfig(**RANDOM, target_modules=["q_proj"]),
                           rngs=nnx.Rngs(1))
    model.add_adapter("b", LoraConfig(**RANDOM, target_modules=["q_proj"], bias="all"), rngs=nnx.Rngs(2))
    k_proj = lambda: model.base_model.model.model.layers[0].self_attn.k_proj  # noqa: E731 (a fresh layer view)

    def biases():
        return [p for p, _ in nnx.to_flat_state(nnx.state(model, model.trainable)) if p[-1] == "bias"]

    assert type(k_proj().bias) is nnx.Param and not biases()
    model.set_adapter("b")
    assert type(k_proj().bias) is nnx.LoRAParam and len(biases()) == 3  # q, k, v (stacked over the layers)
    save_adapter(model, tmp_path / "b")
    model.set_adapter("default")
    assert type(k_proj().bias) is nnx.Param and not biases()
    saved = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.k_proj.bias" in saved
    model.delete_adapter("default")  # "b" becomes active: its biases train again
    assert model.active_adapter == "b" and type(k_proj().bias) is nnx.LoRAParam


@pytest.mark.parametrize("name, tie", [("lm_head", False), ("embed_tokens", False), ("lm_head", True)])
def test_modules_to_save_train_a_copy_save_and_load(tmp_path, name, tie):
    """modules_to_save: a full trainable copy (nnx.LoRAParam) beside a frozen original; the copy runs, the
    original runs with adapters disabled; saved under the module's own names; unload keeps the copy."""
    config = LoraConfig(**RANDOM, target_modules=["q_proj"], modules_to_save=[name])
    model, x = get_peft_model(tiny(tie_word_embeddings=tie), config, rngs=nnx.Rngs(1)), tokens()
    base = tiny(tie_word_embeddings=tie)
    user = model.base_model.model
    module = user.lm_head if name == "lm_head" else user.model.embed_tokens
    trained = module.adapters["default"]
    var = trained.kernel if name == "lm_head" else trained.embedding
    # A tied head's original is the embedding's table; its copy is an untied nnx.Linear (PEFT's copy).
    assert isinstance(var, nnx.LoRAParam) and type(getattr(module.original, (
        "kernel" if name == "lm_head" and not tie else "embedding"))) is nnx.Param
    var.set_value(var.get_value() + jax.random.normal(jax.random.key(0), var.get_value().shape) * 0.5)  # as if trained
    adapted = model(x)
    with model.disable_adapter():
        assert diff(model(x), base(x)) == 0
    with get_peft_model(tiny(tie_word_embeddings=tie), dataclasses.replace(config, modules_to_save=None),
                        rngs=nnx.Rngs(1)).disable_adapter() as no_copy:
        assert diff(no_copy(x), base(x)) == 0
    assert diff(adapted, get_peft_model(tiny(tie_word_embeddings=tie), dataclasses.replace(config, modules_to_save=None),
                                        rngs=nnx.Rngs(1))(x)) > 1e-3  # the copy matters
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.lm_head.weight" if name == "lm_head" else "base_model.model.model.embed_tokens.weight"
    assert tensors[key].shape == ((64, 32) if name == "lm_head" else (64, 32))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == [name]
    loaded = load_adapter(tiny(tie_word_embeddings=tie), tmp_path / "a")
    assert diff(loaded(x), adapted) == 0
    merged = merge_and_unload(loaded)  # PEFT's merge_and_unload (and unload) keep the active copy, frozen again
    assert not nnx.state(merged, nnx.LoRAParam) and diff(merged(x), adapted) < 1e-4
    assert isinstance(merged.lm_head if name == "lm_head" else merged.model.embed_tokens, nnx.Linear | nnx.Embed)


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="both a LoRA target"):
        get_peft_model(tiny(), LoraConfig(target_modules=["q_proj"], modules_to_save=["q_proj"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\['norm_x'\] match no module"):
        get_peft_model(tiny(), LoraConfig(target_modules=["q_proj"], modules_to_save=["norm_x"]), rngs=nnx.Rngs(0))
    model = quantize_model(tiny(), QuantConfig(skip_modules=()))
    with pytest.raises(ValueError, match="lm_head is quantized"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="modules_to_save"):
        LoraConfig(modules_to_save="lm_head")


def test_lora_on_embeddings():
    """target_modules naming embed_tokens adapts it (PEFT's init: A = 0, so it starts as the base); "all-linear"
    never does; merge_and_unload folds scale * a @ b into the table."""
    from jaxlora.embedding import LoRAEmbedding

    x, base = tokens(), tiny()
    all_linear = get_peft_model(tiny(), LoraConfig(), rngs=nnx.Rngs(0))
    assert not isinstance(all_linear.base_model.model.model.embed_tokens, LoRAEmbedding)
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["embed_tokens"]), rngs=nnx.Rngs(1))
    layer = model.base_model.model.model.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and diff(model(x), base(x)) == 0
    layer.adapters["default"].lora_a.set_value(jax.random.normal(jax.random.key(2), (64, 4)))
    adapted = model(x)
    assert diff(adapted, base(x)) > 1e-2
    with model.disable_adapter():
        assert diff(model(x), base(x)) == 0
    with pytest.raises(ValueError, match="embedding"):
        get_peft_model(tiny(), LoraConfig(target_modules=["embed_tokens"], use_dora=True), rngs=nnx.Rngs(0))
    merged = merge_and_unload(model)
    assert isinstance(merged.model.embed_tokens, nnx.Embed) and diff(merged(x), adapted) < 1e-5


# --- several adapters -----------------------------------------------------------------------------


def test_multi_adapter_switching():
    model, x = tiny(), tokens()
    base = model(x)
    peft = get_peft_model(model, LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    first = peft(x)
    add_adapter(peft, "q_only", LoraConfig(**RANDOM, target_modules=["q_proj"]), rngs=nnx.Rngs(2))
    assert diff(peft(x), first) == 0  # adding does not activate (PEFT)
    set_adapter(peft, "q_only")
    q_only = peft(x)
    assert diff(q_only, first) > 1e-2 and diff(q_only, base) > 1e-2
    up, h = model.model.layers[0].mlp.up_proj, jax.random.normal(jax.random.key(3), (2, 8, 32))
    assert diff(up(h, Active("q_only")), up.base(h)) == 0  # no "q_only" there: base alone
    assert diff(up(h, Active("default")), up.base(h)) > 1e-2
    with pytest.raises(ValueError, match="name the one to use"):
        model.model.layers[0].self_attn.q_proj(h)  # two adapters here: a call must say which (PeftModel passes one)
    with peft.disable_adapter():
        assert diff(peft(x), base) == 0
    assert diff(peft(x), q_only) == 0
    set_adapter(peft, "default")
    assert diff(peft(x), first) == 0
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        set_adapter(peft, "nope")
    delete_adapter(peft, "default")  # the active one: "q_only" takes over, other layers revert
    assert peft.active_adapter == "q_only" and diff(peft(x), q_only) == 0
    assert isinstance(model.model.layers[0].mlp.up_proj, nnx.Linear) and len(lora_layers(model)) == 2
    assert list(peft.peft_config) == ["q_only"]


def test_set_adapter_round_trip_keeps_the_graphdef():
    """The active adapter is static graph data of the wrapper, never of a layer: switching A -> B -> A gives
    back the same graphdef (a jitted step compiled for A is reused), and B's differs only while B runs."""
    peft = get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1), adapter_name="a")
    peft.add_adapter("b", LoraConfig(**RANDOM, target_modules=["q_proj"]), rngs=nnx.Rngs(2))
    graphdef_a, state_a = nnx.split(peft)
    peft.set_adapter("b")
    graphdef_b = nnx.graphdef(peft)
    peft.set_adapter("a")
    assert nnx.graphdef(peft) == graphdef_a and graphdef_b != graphdef_a
    same = jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), state_a, nnx.state(peft))
    assert all(jax.tree.leaves(same))


def test_functional_forms_refuse_a_plain_model(tmp_path):
    """The functional forms act on the PeftModel that owns the adapters: a plain model is a TypeError naming
    what to pass, never a silent no-op on a model without configs."""
    model, config = tiny(), LoraConfig(**RANDOM)
    calls = [lambda: add_adapter(model, "b", config, rngs=nnx.Rngs(0)), lambda: set_adapter(model, "default"),
             lambda: delete_adapter(model, "default"), lambda: merge_and_unload(model), lambda: unload(model),
             lambda: add_weighted_adapter(model, ["default"], [1.0], "c"), lambda: print_trainable_parameters(model),
             lambda: save_adapter(model, tmp_path / "a"), lambda: adapter_rows(model, ["default"])]
    for call in calls:
        with pytest.raises(TypeError, match="expected a jaxlora.PeftModel.*got LlamaForCausalLM"):
            call()
    assert not lora_layers(model) and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="already has adapters"):
        get_peft_model(get_peft_model(model, config, rngs=nnx.Rngs(0)), config, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="already a PeftModel"):
        PeftModel(PeftModel(tiny()))


def test_add_weighted_adapter():
    """One adapter at weight 1 ("linear") reproduces it; two adapters at full rank ("svd") give the sum."""
    model, x = tiny(), tokens()
    peft = get_peft_model(model, LoraConfig(**RANDOM, target_modules=["v_proj"]), rngs=nnx.Rngs(1))
    add_adapter(peft, "b", LoraConfig(**RANDOM, target_modules=["v_proj", "o_proj"]), rngs=nnx.Rngs(2))
    first = peft(x)
    add_weighted_adapter(peft, ["default"], [1.0], "copy", combination_type="linear")
    set_adapter(peft, "copy")
    assert diff(peft(x), first) < 1e-5
    add_weighted_adapter(peft, ["default", "b"], [0.5, 0.5], "mix", combination_type="svd", svd_rank=8)
    assert peft.peft_config["mix"].target_modules == tuple(sorted(
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("o_proj", "v_proj")))
    layer = model.model.layers[0].self_attn.v_proj
    want = 0.5 * (layer.adapters["default"].delta_weight() + layer.adapters["b"].delta_weight())
    assert diff(layer.adapters["mix"].delta_weight(), want) < 1e-5


# --- merging, initialisers, generation ------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
def test_merge_and_unload(quantized):
    """Dense: W + s A B (float32 rounding, bound 1e-5 on O(1) logits). Quantized: dequantize(W) + delta in a
    plain nnx.Linear, so the same bound holds (no re-quantization error)."""
    model = tiny()
    if quantized:
        quantize_linears(model)
    peft = get_peft_model(model, LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    x = tokens()
    adapted = peft(x)
    assert merge_and_unload(peft) is model
    assert not lora_layers(model) and not peft.peft_config and peft.active_adapter is None  # the wrapper is empty
    assert all(isinstance(m, nnx.Linear) for m in (model.model.layers[1].mlp.down_proj, model.lm_head))
    assert diff(model(x), adapted) < 1e-5


def test_merge_adapter_then_unmerge():
    """PEFT's merge_adapter / unmerge_adapter on the wrapper: the merged model runs the merged weights with the
    adapted output (float32 rounding, 1e-5 on O(1) logits); switching to an unmerged adapter is refused; disabling
    unmerges first (PEFT), so the base runs; unmerge_adapter gives the adapted output back."""
    model, x = tiny(), tokens()
    base = model(x)
    peft = get_peft_model(model, LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    peft.add_adapter("q_only", LoraConfig(**RANDOM, target_modules=["q_proj"]), rngs=nnx.Rngs(2))
    assert peft.get_base_model() is model and peft.config is model.config
    adapted = peft(x)
    peft.merge_adapter()
    assert diff(peft(x), adapted) < 1e-5 and diff(peft(x), base) > 1e-2
    with pytest.raises(ValueError, match="merged"):
        peft.set_adapter("q_only")
    with pytest.raises(ValueError, match="merged"):
        peft.adapter_rows(["default", "q_only"])
    with peft.disable_adapter():
        assert diff(peft(x), base) < 1e-5  # W + s A B - s A B: float32 rounding
    assert diff(peft(x), adapted) < 1e-5  # unmerged by disabling: the adapters run on top of the base again
    peft.merge_adapter()
    peft.unmerge_adapter()
    peft.set_adapter("q_only")
    assert diff(peft(x), adapted) > 1e-2


def test_unload_restores_base():
    model, x = tiny(), tokens()
    base = model(x)
    assert unload(get_peft_model(model, LoraConfig(**RANDOM), rngs=nnx.Rngs(1))) is model
    assert diff(model(x), base) == 0 and not lora_layers(model)


def test_pissa_starts_at_the_base_model_and_needs_dense_weights():
    model, x = tiny(), tokens()
    base = model(x)
    peft = get_peft_model(model, LoraConfig(r=4, init_lora_weights="pissa"), rngs=nnx.Rngs(1))
    assert diff(peft(x), base) < 1e-4  # residual + adapter = W up to float32 SVD rounding
    with pytest.raises(ValueError, match="needs the dense weight"):
        get_peft_model(quantize_linears(tiny()), LoraConfig(init_lora_weights="pissa"), rngs=nnx.Rngs(1))


def test_save_pretrained_refuses_a_model_with_adapters(tmp_path):
    """A base checkpoint has no place for adapters: saving must fail before writing, pointing to the fix."""
    from jaxlora.models.loading import save_pretrained

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1), rngs=nnx.Rngs(0))
    peft = get_peft_model(model, LoraConfig(r=2), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="still holds LoRA adapters.*merge_and_unload"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_and_unload(peft)
    assert (save_pretrained(model, tmp_path / "out") / "config.json").is_file()


def test_a_failed_add_adapter_leaves_the_model_as_it_was():
    peft, x = get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1)), tokens()
    before, graph = peft(x), nnx.graphdef(peft)
    # PiSSA refuses r > min(in, out) in the layers it reaches: a 64-wide layer passes, a 32 x 16 one fails.
    with pytest.raises(ValueError, match="PiSSA"):
        peft.add_adapter("x", LoraConfig(r=20, init_lora_weights="pissa"), rngs=nnx.Rngs(2))
    assert list(peft.peft_config) == ["default"] and nnx.graphdef(peft) == graph
    np.testing.assert_array_equal(peft(x), before)  # no base rewritten by PiSSA either
    peft.add_adapter("x", LoraConfig(**RANDOM), rngs=nnx.Rngs(2))  # the name is free again
    with pytest.raises(ValueError, match="adapter_name='__base__'"):
        peft.add_adapter("__base__", LoraConfig(**RANDOM), rngs=nnx.Rngs(2))


def test_one_owner_a_model_is_wrapped_once():
    model = tiny()
    get_peft_model(model, LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="model already holds adapters"):
        get_peft_model(model, LoraConfig(**RANDOM), rngs=nnx.Rngs(1), adapter_name="b")


def test_a_weighted_adapter_of_one_with_modules_to_save_saves_and_loads(tmp_path):
    peft = get_peft_model(tiny(), LoraConfig(**RANDOM, modules_to_save=["lm_head"]), rngs=nnx.Rngs(1))
    peft.add_weighted_adapter(["default"], [0.5], "half", combination_type="linear")
    assert peft.peft_config["half"].modules_to_save is None  # LoRA weights only, as the layers hold
    peft.save_pretrained(tmp_path)
    loaded = load_adapter(tiny(), tmp_path / "half", adapter_name="half")
    peft.set_adapter("half")
    assert diff(loaded(tokens()), peft(tokens())) < 1e-6
