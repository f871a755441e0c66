"""LoraConfig (jaxlora/lora_config.py): validation naming the bad value, PEFT dict round trips, unknown keys,
layers_to_transform / layers_pattern, copy and pickle."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxlora.lora_config import LoraConfig
from jaxlora.peft_model import get_peft_model, load_adapter, save_adapter
from jaxlora.targets import lora_layers
from tests._models import tiny, tokens

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
