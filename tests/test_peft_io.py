"""PEFT adapter files (jaxlora/peft_io.py): round trips, the PeftModel's paths as the file's names, PEFT's
multi-adapter layout, bad files refused before the model is touched, bf16 tensors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora.lora_config import LoraConfig
from jaxlora.peft_model import PeftModel, get_peft_model, load_adapter, save_adapter, set_adapter
from jaxlora.targets import lora_layers
from tests._models import ALL_14, RANDOM, diff, tiny, tokens


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


def test_a_trained_bias_loads_under_either_peft_name(tmp_path):
    # PEFT names a trained bias by which layers any adapter wraps: "k_proj.base_layer.bias" in a model where
    # another adapter wraps k_proj, "k_proj.bias" in one where none does. Either file loads into either model.
    config = LoraConfig(**RANDOM, target_modules=["q_proj"], bias="all")
    src = get_peft_model(tiny(model_type="qwen2"), config, rngs=nnx.Rngs(1))
    for module in lora_layers(src.base_model.model).values():
        if module.base.bias is not None:
            module.base.bias.set_value(module.base.bias.get_value() + 1.0)  # as if trained
    save_adapter(src, tmp_path / "b")
    assert "base_model.model.model.layers.0.self_attn.k_proj.bias" in load_file(tmp_path / "b" / "adapter_model.safetensors")
    other = get_peft_model(tiny(model_type="qwen2"), LoraConfig(**RANDOM, target_modules=["k_proj"]),
                           rngs=nnx.Rngs(2), adapter_name="a")
    other.load_adapter(tmp_path / "b", "b")  # k_proj is wrapped here: the file says k_proj.bias
    other.set_adapter("b")
    assert diff(other(tokens()), src(tokens())) < 1e-6


def test_no_save_or_load_while_merged(tmp_path):
    peft = get_peft_model(tiny(), LoraConfig(**RANDOM, target_modules=["embed_tokens", "q_proj"]),
                          rngs=nnx.Rngs(1))
    save_adapter(peft, tmp_path / "a")
    peft.merge_adapter()
    with pytest.raises(ValueError, match=r"adapters \['default'\] are merged .* unmerge_adapter\(\)"):
        save_adapter(peft, tmp_path / "b")
    with pytest.raises(ValueError, match="are merged"):
        peft.load_adapter(tmp_path / "a", "again")
    assert not (tmp_path / "b").exists() and list(peft.peft_config) == ["default"]
