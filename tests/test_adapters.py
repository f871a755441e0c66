"""Adapter injection, targeting, multi-adapter switching, PEFT file I/O and merging, JAX only (no torch).

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
from safetensors.numpy import load_file, save_file

from jaxlora.generate import generate
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
from tests._models import tiny_llama_config

TINY = tiny_llama_config()
ALL_14 = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head excluded
# init_lora_weights=False: B is random, so every adapter changes the output (PEFT's default B = 0 would not).
RANDOM = dict(r=4, lora_alpha=8, init_lora_weights=False)


def tiny(seed=0, **overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(seed))


def tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 8), 0, 64)


def diff(a, b) -> float:
    return float(jnp.abs(a - b).max())


def quantize_linears(model):
    """Every linear but lm_head -> QuantizedLinear (NF4 + double quantization), as transformers does."""
    return quantize_model(model, QuantConfig(compute_dtype=jnp.float32))


# --- LoraConfig -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r=0"), (dict(lora_alpha=-1), "lora_alpha"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(bias="some"), "bias='some'"), (dict(task_type="SEQ_CLS"), "task_type"),
    (dict(init_lora_weights="olora"), "olora"), (dict(init_lora_weights="pissa_niter_x"), "pissa_niter_x"), (dict(target_modules="(unclosed"), "not a valid regex"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(target_modules=None), "target_modules=None"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(**kw)


def test_config_peft_dict_round_trip_and_hash():
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*",
                     rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 8}, use_rslora=True, use_dora=True,
                     init_lora_weights="gaussian", lora_dropout=0.1)
    d = json.loads(json.dumps(cfg.to_peft_dict()))
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["peft_type"] == "LORA"
    assert LoraConfig.from_peft_dict(d) == cfg and hash(LoraConfig.from_peft_dict(d)) == hash(cfg)
    with pytest.raises(TypeError):
        cfg.rank_pattern["x"] = 1  # read-only: a config is frozen all the way down


@pytest.mark.parametrize("field, value", [("fan_in_fan_out", True), ("use_qalora", True),
                                          ("layer_replication", [[0, 1]]), ("peft_type", "IA3"), ("lora_bias", True)])
def test_config_from_peft_dict_names_unsupported_fields(field, value):
    d = LoraConfig().to_peft_dict() | {field: value}
    with pytest.raises(ValueError, match=field):
        LoraConfig.from_peft_dict(d)


def test_config_warns_about_and_ignores_keys_from_a_newer_peft():
    d = LoraConfig(target_modules=["q_proj"]).to_peft_dict() | {"lora_magic_v2": {"on": True}, "future_flag": 1}
    with pytest.warns(UserWarning, match=r"\['future_flag', 'lora_magic_v2'\] are unknown"):
        assert LoraConfig.from_peft_dict(d) == LoraConfig(target_modules=["q_proj"])


def test_config_and_adapted_model_survive_deepcopy_and_pickle():
    import copy
    import pickle

    cfg = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 4}, alpha_pattern={"q": 2},
                     loftq_config={"loftq_iter": 2}, layers_to_transform=[1], layers_pattern="layers")
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert clone == cfg and hash(clone) == hash(cfg) and clone.r_for("a.q_proj") == 4
    model = get_peft_model(tiny(), LoraConfig(init_lora_weights=False), rngs=nnx.Rngs(0))
    x = tokens()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.peft_config == model.peft_config
        np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(model(x)))


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "cannot be used when target_modules is a str"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "needs layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform=["0"]), "layers_to_transform must be"),
])
def test_layers_to_transform_is_checked(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(**kw)


def test_layers_to_transform_selects_layers_and_round_trips(tmp_path):
    cfg = LoraConfig(target_modules=["q_proj", "down_proj"], layers_to_transform=1, layers_pattern="layers",
                     init_lora_weights=False)
    model = get_peft_model(tiny(), cfg, rngs=nnx.Rngs(0))
    assert sorted(lora_layers(model.base_model.model)) == ["model.layers.1.mlp.down_proj",
                                                           "model.layers.1.self_attn.q_proj"]
    save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["layers_to_transform"], saved["layers_pattern"]) == (1, "layers")
    loaded = load_adapter(tiny(), tmp_path / "a")  # no rngs: every weight comes from the file
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(model))
    assert loaded.peft_config["default"] == cfg
    np.testing.assert_allclose(np.asarray(loaded(tokens())), np.asarray(model(tokens())), atol=1e-6)


def test_exclude_modules_that_exclude_nothing_warn():
    with pytest.warns(UserWarning, match="excludes no linear layer"):
        get_peft_model(tiny(), LoraConfig(exclude_modules=["qproj"]), rngs=nnx.Rngs(0))


def test_config_ignores_bookkeeping_fields():
    d = LoraConfig().to_peft_dict() | {"peft_version": "0.21.2", "base_model_name_or_path": "x", "eva_config": None}
    assert LoraConfig.from_peft_dict(d) == LoraConfig()


# --- targeting and patterns -----------------------------------------------------------------------


@pytest.mark.parametrize("kw, expected", [
    (dict(), ALL_14),  # "all-linear" is the default, without lm_head
    (dict(target_modules=["q_proj", "v_proj"]), 4),
    (dict(target_modules=["model.layers.1.mlp.down_proj", "o_proj"]), 3),  # a full path or a suffix
    (dict(target_modules=r".*layers\.0\..*_proj"), 7),  # a regex is full-matched
    (dict(target_modules=r"q_proj"), 0),  # ... so a bare name as a regex matches nothing (PEFT's rule)
    (dict(exclude_modules=["gate_proj", "up_proj"]), 10),
    (dict(target_modules=["q_proj", "lm_head"]), 3),  # lm_head only when named
    (dict(exclude_modules=r".*layers\.1\..*"), 7),
])
def test_targeting(kw, expected):
    model, config = tiny(), LoraConfig(**kw)
    if expected == 0:
        with pytest.raises(ValueError, match="matches no linear layer.*q_proj"):
            get_peft_model(model, config, rngs=nnx.Rngs(0))
        assert not lora_layers(model)  # nothing was touched
        return
    peft = get_peft_model(model, config, rngs=nnx.Rngs(0))
    assert peft.base_model.model is model and len(lora_layers(model)) == expected  # adapted in place
    assert isinstance(model.lm_head, LoRALinear) == ("lm_head" in kw.get("target_modules", ()))


def test_tied_embeddings_have_no_head_to_target():
    model = get_peft_model(tiny(tie_word_embeddings=True), LoraConfig(), rngs=nnx.Rngs(0))
    assert len(lora_layers(model)) == ALL_14


def test_rank_and_alpha_patterns():
    """PEFT's get_pattern_key: keys are regexes matched at a '.' boundary, the first matching key wins."""
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4},
                        alpha_pattern={"down_proj": 1})
    layers = lora_layers(get_peft_model(tiny(), config, rngs=nnx.Rngs(0)).base_model.model)
    adapter = lambda name: layers[name].adapters["default"]  # noqa: E731
    assert adapter("model.layers.0.self_attn.q_proj").r == 2
    assert adapter("model.layers.1.self_attn.q_proj").r == 4
    assert adapter("model.layers.0.self_attn.k_proj").r == 8
    assert adapter("model.layers.0.mlp.down_proj").scaling == 1 / 8
    assert adapter("model.layers.0.mlp.up_proj").scaling == 2.0
    rs = lora_layers(get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, use_rslora=True),
                                    rngs=nnx.Rngs(0)).base_model.model)
    assert rs["model.layers.0.mlp.up_proj"].adapters["default"].scaling == 8 / 2  # alpha / sqrt(r)


def test_rank_larger_than_layer_is_accepted_as_in_peft():
    model = tiny()
    x = tokens()
    peft = get_peft_model(model, LoraConfig(r=8, rank_pattern={"k_proj": 64}, init_lora_weights=False),
                          rngs=nnx.Rngs(0))
    k_proj = lora_layers(model)["model.layers.0.self_attn.k_proj"]
    assert k_proj.adapters["default"].lora_a.get_value().shape == (k_proj.in_features, 64)
    assert min(k_proj.in_features, k_proj.out_features) < 64
    before = peft(x)
    assert merge_and_unload(peft) is model
    assert diff(model(x), before) < 1e-5


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


@pytest.mark.parametrize("name, tie", [("lm_head", False), ("embed_tokens", False)])
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
    assert isinstance(var, nnx.LoRAParam) and type(getattr(module.original, var_name := (
        "kernel" if name == "lm_head" else "embedding"))) is nnx.Param
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
    for name in ("lm_head", "embed_tokens"):
        with pytest.raises(ValueError, match="tied embeddings"):
            get_peft_model(tiny(tie_word_embeddings=True), LoraConfig(target_modules=["q_proj"], modules_to_save=[name]),
                           rngs=nnx.Rngs(0))
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


# --- files ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model, x = get_peft_model(tiny(), LoraConfig(**RANDOM, use_dora=True), rngs=nnx.Rngs(1)), tokens()
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a")  # over an existing directory: files replaced, no temp dirs left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"].shape == (64,)
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)} and len(tensors) == 3 * ALL_14
    loaded = load_adapter(tiny(), tmp_path / "a", rngs=nnx.Rngs(9))
    assert diff(loaded(x), model(x)) == 0
    # A second adapter loads inactive (PEFT); loaded under another name it switches in exactly.
    load_adapter(loaded, tmp_path / "a", adapter_name="again", rngs=nnx.Rngs(9))
    assert loaded.active_adapter == "default"
    set_adapter(loaded, "again")
    assert diff(loaded(x), model(x)) == 0


def test_peft_model_paths_are_the_adapter_file_names(tmp_path):
    """The wrapper's module paths are PEFT's state-dict names: every LoRAParam of the PeftModel, at its nnx path
    (per layer), is a tensor of the saved file under that name, and the file holds nothing else."""
    from jaxlora.models.stack import unstacked

    config = LoraConfig(**RANDOM, use_dora=True, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])
    peft = get_peft_model(tiny(), config, rngs=nnx.Rngs(1))
    peft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    peft_name = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "magnitude": "lora_magnitude_vector",
                 "kernel": "weight", "bias": "bias"}
    names = {}
    with unstacked(peft):
        for path, var in nnx.to_flat_state(nnx.state(peft, nnx.LoRAParam)):
            *module, leaf = map(str, path)
            if module[-2:-1] == ["adapters"]:  # <layer>.adapters.<name>: PEFT drops the adapter name
                module = module[:-2]
            names[".".join([*module, peft_name[leaf]])] = np.asarray(var.get_value()).T if leaf == "kernel" else \
                np.asarray(var.get_value())
    assert names.keys() == tensors.keys()
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert "base_model.model.lm_head.weight" in names
    for k, v in names.items():  # "lora_a" is PEFT's A transposed: compare values only up to that layout
        want = tensors[k].T if k.endswith(("lora_A.weight", "lora_B.weight")) else tensors[k]
        np.testing.assert_array_equal(v, want, err_msg=k)


def test_save_pretrained_layout_and_from_pretrained(tmp_path):
    """PEFT's layout: "default" in the directory, any other adapter in directory/<name>; each loads back
    exactly, by PeftModel.from_pretrained and load_adapter, and selected_adapters writes only those named."""
    x = tokens()
    peft = get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    peft.add_adapter("q_only", LoraConfig(**RANDOM, target_modules=["q_proj"]), rngs=nnx.Rngs(2))
    want = {}
    for name in ("default", "q_only"):
        peft.set_adapter(name)
        want[name] = peft(x)
    peft.save_pretrained(tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors", "q_only"]
    loaded = PeftModel.from_pretrained(tiny(), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "q_only", "q_only")
    assert list(loaded.peft_config) == ["default", "q_only"] and loaded.active_adapter == "default"
    assert loaded.peft_config["q_only"] == peft.peft_config["q_only"]  # ("all-linear" is saved as the paths)
    for name in ("default", "q_only"):
        loaded.set_adapter(name)
        assert diff(loaded(x), want[name]) == 0
    peft.save_pretrained(tmp_path / "some", selected_adapters=["q_only"])
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["q_only"]
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        peft.save_pretrained(tmp_path / "none", selected_adapters=["q_only", "nope"])
    assert not (tmp_path / "none").exists()  # checked before anything is written


def _saved(tmp_path, edit_tensors=None, edit_config=None):
    src = save_adapter(get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1)), tmp_path / "src")
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, src / "adapter_model.safetensors")
    (src / "adapter_config.json").write_text(json.dumps(config))
    return src


KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize("edit_tensors, edit_config, match", [
    (lambda t: t.pop(KEY), None, "missing 1 adapter tensors.*down_proj"),
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)}), None,
     "lm_head.lora_A"),
    (lambda t: t.update({KEY: np.zeros((32, 2), np.float32)}), None, "down_proj.lora_B.weight has shape"),
    (lambda t: t.update({KEY: np.zeros((32, 4), np.int32)}), None, "down_proj.lora_B.weight has dtype I32"),
    (None, lambda c: c.update(use_dora=True), "missing .*lora_magnitude_vector"),
    (None, lambda c: c.update(modules_to_save=["lm_head"]), r"missing 1 adapter tensors.*lm_head\.weight"),
    (None, lambda c: c.update(r=2), "lora_A.weight has shape"),
])
def test_load_adapter_errors_name_the_problem(tmp_path, edit_tensors, edit_config, match):
    directory = _saved(tmp_path, edit_tensors, edit_config)
    model = tiny()
    with pytest.raises(ValueError, match=match):
        load_adapter(model, directory, rngs=nnx.Rngs(0))
    assert not lora_layers(model)  # checked before touching the model
    peft = get_peft_model(tiny(), LoraConfig(**RANDOM, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(peft)
    with pytest.raises(ValueError, match=match):  # a further adapter: the wrapper is left as it was
        peft.load_adapter(directory, "bad")
    assert list(peft.peft_config) == ["default"] and nnx.graphdef(peft) == graphdef


def test_load_bf16_adapter(tmp_path):
    """PEFT saves the parameters' dtype; bf16 widens to float32 exactly."""
    import ml_dtypes

    directory = _saved(tmp_path, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    model = load_adapter(tiny(), directory, rngs=nnx.Rngs(0))
    a = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_a.get_value()
    assert a.dtype == jnp.float32 and bool(jnp.all(a == a.astype(jnp.bfloat16).astype(jnp.float32)))


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


def test_generate_jits_a_model_with_adapters():
    model = get_peft_model(tiny(), LoraConfig(**RANDOM), rngs=nnx.Rngs(1))
    out = generate(model, tokens()[:, :4], max_new_tokens=3)
    assert out.shape == (2, 7)


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
