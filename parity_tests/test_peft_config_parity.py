"""`LoraConfig` against peft 0.21: which modules a config selects (upstream's whole
test_regex_matching_valid table from tests/test_tuners_utils.py, plus MoE layer indices), how adapter
configs from a newer PEFT are read, ranks above a layer's smaller dimension, and fast-SVD PiSSA.

Matching is decided from the module name alone on both sides (PEFT's check_target_module_exists), so
every case compares the two answers and upstream's expected one exactly.
"""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from flax import nnx  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402

from jaxlora.layers import LoRALinear  # noqa: E402
from jaxlora.lora_config import LoraConfig  # noqa: E402
from jaxlora.peft_io import read_adapter_config  # noqa: E402

# peft tests/test_tuners_utils.py REGEX_TEST_CASES: (key, target_modules, layers_to_transform,
# layers_pattern, expected)
REGEX_TEST_CASES = [
    ("", [], None, None, False),
    ("", ["foo"], None, None, False),
    ("foo", [], None, None, False),
    ("foo", ["foo"], None, None, True),
    ("foo", ["bar"], None, None, False),
    ("foo", ["foo", "bar"], None, None, True),
    ("foo", "foo", None, None, True),
    ("foo", ".*oo", None, None, True),
    ("foo", "fo.*", None, None, True),
    ("foo", ".*bar.*", None, None, False),
    ("foobar", ".*oba.*", None, None, True),
    ("foo.bar.1.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.1.baz", ["baz"], [0], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [2], ["bar"], False),
    ("foo.bar.10.baz", ["baz"], [0], ["bar"], False),
    ("foo.bar.10.baz", ["baz"], [1], ["bar"], False),
    ("foo.bar.1.baz", ["baz"], [0, 1, 2], ["bar"], True),
    ("foo.bar.1.baz", ["baz", "spam"], [1], ["bar"], True),
    ("foo.bar.1.baz", ["baz", "spam"], [0, 1, 2], ["bar"], True),
    ("foo.whatever.1.baz", ["baz"], [1], [], True),
    ("foo.whatever.1.baz", ["baz"], [0], [], False),
    ("foo.whatever.1.baz", ["baz"], [1], "", True),
    ("foo.whatever.1.baz", ["baz"], [0], "", False),
    ("foo.whatever.1.baz", ["baz"], [1], None, True),
    ("foo.whatever.1.baz", ["baz"], [0], None, False),
    ("transformer.h.1.attn.attention.q_proj.foo", ["q_proj"], None, [], False),
    ("transformer.h.1.attn.attention.q_proj", [], None, [], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], None, [], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], None, [], True),
    ("transformer.h.1.attn.attention.resid_dropout", ["q_proj", "v_proj"], None, [], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [1], ["h"], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0], ["h"], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [2], ["h"], False),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0, 1, 2], ["h"], True),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], [0, 1, 2], ["h"], True),
    ("foo.bar.q_proj", ["q_proj"], None, [], True),
    ("foo.bar.1.baz", ["baz"], [1], ["foo"], False),
    ("foo.bar.1.baz", ["baz"], [1], ["baz"], False),
    ("bar.1.baz", ["baz"], [1], ["bar"], True),  # upstream's older table: False; peft 0.21 also matches at ^
    ("foo.bar.001.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.1.spam.2.baz", ["baz"], [1], ["bar"], True),
    ("foo.bar.2.spam.1.baz", ["baz"], [1], ["bar"], False),
    ("blocks.1.weight", ["weight"], [1], ["blocks"], True),  # likewise (False before peft 0.21)
    ("blocks.1.bias", ["weight"], [1], ["blocks"], False),
    ("mlp.blocks.1.weight", ["weight"], [1], ["blocks"], True),
    ("mlp.blocks.1.bias", ["weight"], [1], ["blocks"], False),
]
# MoE: the layer index is the first number, never the expert's; an int layers_to_transform; a full name
# given in target_modules is not filtered by layer (PEFT only filters suffix matches).
MOE_AND_MORE = [
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [1], ["layers"], True),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [0], ["layers"], False),
    ("model.layers.1.mlp.experts.0.up_proj", ["up_proj"], [0], None, False),
    ("model.layers.2.mlp.experts.3.up_proj", ["up_proj"], 2, None, True),
    ("model.layers.2.mlp.experts.3.up_proj", ["up_proj"], [3], "layers", False),
    ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], [1], ["layers"], True),
    ("model.layers.0.self_attn.q_proj", ["q_proj"], [], None, True),
    ("model.layers.0.self_attn.q_proj", ["q_proj"], [0], ["layer", "layers"], True),
]


@pytest.mark.parametrize("key, target_modules, layers_to_transform, layers_pattern, expected",
                         REGEX_TEST_CASES + MOE_AND_MORE)
def test_regex_matching_valid(key, target_modules, layers_to_transform, layers_pattern, expected):
    kw = dict(target_modules=target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
    ref = bool(check_target_module_exists(peft.LoraConfig(**kw), key))
    ours = LoraConfig(**kw).targets(key)
    assert ref == expected  # the table still describes the installed PEFT
    assert ours == ref


def test_layers_to_transform_in_an_adapter_file(tmp_path):
    peft_cfg = peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers")
    peft_cfg.save_pretrained(tmp_path)
    ours = read_adapter_config(tmp_path)
    assert (ours.layers_to_transform, ours.layers_pattern) == ((0, 2), "layers")
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"):
        assert ours.targets(key) == bool(check_target_module_exists(peft_cfg, key))
    assert peft.LoraConfig(**{k: v for k, v in ours.to_peft_dict().items() if k != "peft_type"}).layers_to_transform \
        == [0, 2]


def test_unknown_keys_from_a_newer_peft_are_warned_about_and_ignored_as_peft_does(tmp_path):
    d = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4).to_dict()
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    d["peft_type"], d["task_type"] = "LORA", "CAUSAL_LM"
    d |= {"lora_from_the_future": {"enabled": True}, "another_new_knob": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="Unexpected keyword arguments"):
        ref = peft.PeftConfig.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"\['another_new_knob', 'lora_from_the_future'\] are unknown"):
        ours = read_adapter_config(tmp_path)
    assert not hasattr(ref, "another_new_knob")
    assert (ours.r, set(ours.target_modules)) == (ref.r, set(ref.target_modules))


def test_known_but_unimplemented_fields_are_still_refused(tmp_path):
    d = LoraConfig(target_modules=["q_proj"]).to_peft_dict() | {"lora_bias": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PEFT 0.21 field is not "from a newer PEFT": no warning, an error
        with pytest.raises(ValueError, match="lora_bias=True"):
            LoraConfig.from_peft_dict(d)


def test_rank_above_the_smaller_dimension_matches_peft():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 4))
    ref = peft.get_peft_model(dense, peft.LoraConfig(target_modules=["0"], r=16, lora_alpha=8, init_lora_weights=False))
    layer = ref.base_model.model[0]
    lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(layer.base_layer.weight.detach().numpy().T))
    lin.bias.set_value(jnp.asarray(layer.base_layer.bias.detach().numpy()))
    ours = LoRALinear(lin, r=16, lora_alpha=8, rngs=nnx.Rngs(0))
    ours.load_peft_state({"lora_A.weight": layer.lora_A["default"].weight.detach().numpy(),
                          "lora_B.weight": layer.lora_B["default"].weight.detach().numpy()})
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    y_ref = ref(torch.from_numpy(x)).detach().numpy()
    assert np.abs(y_ref - layer.base_layer(torch.from_numpy(x)).detach().numpy()).max() > 1e-2  # adapter acts
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), y_ref, rtol=1e-6, atol=1e-6)


def _pissa_pair(w: np.ndarray, bias: np.ndarray, init: str, r: int = 8, alpha: int = 8):
    """(PEFT layer, jaxlora layer) PiSSA-initialised from the same (out, in) weight."""
    torch_lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        torch_lin.weight.copy_(torch.from_numpy(w))
        torch_lin.bias.copy_(torch.from_numpy(bias))
    ref = peft.get_peft_model(torch.nn.Sequential(torch_lin), peft.LoraConfig(
        target_modules=["0"], r=r, lora_alpha=alpha, init_lora_weights=init))
    lin = nnx.Linear(w.shape[1], w.shape[0], rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(w.T))
    lin.bias.set_value(jnp.asarray(bias))
    return ref, LoRALinear(lin, r=r, lora_alpha=alpha, init_lora_weights=init, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16"])
def test_pissa_keeps_the_output_within_upstream_bound(init):
    """peft test_lora_pissa_linear_init_default: nn.Linear(1000, 1000) at its default init, torch.rand
    input, ``torch.allclose(before, after, atol=1e-6)`` (whose default rtol=1e-5 is part of the bound)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(1000, 1000)
    w, bias = base.weight.detach().numpy().copy(), base.bias.detach().numpy().copy()
    x = torch.rand(10, 1000)
    before = base(x).detach().numpy()
    ref, ours = _pissa_pair(w, bias, init)
    assert torch.allclose(ref(x), torch.from_numpy(before), atol=1e-6)
    assert torch.allclose(torch.from_numpy(np.asarray(ours(jnp.asarray(x.numpy())))), torch.from_numpy(before),
                          atol=1e-6)


def test_pissa_niter_finds_peft_s_subspace():
    """Where the top r singular values stand apart (rank 8 plus 1e-4 noise), PEFT's torch.svd_lowrank and
    jaxlora's sketch (different random draws) find the same product B A, to the noise level."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 8)) @ rng.standard_normal((8, 96)) + 1e-4 * rng.standard_normal((64, 96)))
    ref, ours = _pissa_pair(w.astype(np.float32), np.zeros(64, np.float32), "pissa_niter_4", alpha=16)
    ref_layer = ref.base_model.model[0]
    ref_ba = (ref_layer.lora_B["default"].weight @ ref_layer.lora_A["default"].weight).detach().numpy()
    ad = ours.adapters["default"]
    ours_ba = np.asarray(ad.lora_a.get_value() @ ad.lora_b.get_value()).T  # (out, in), as PEFT's B @ A
    assert np.abs(ours_ba - ref_ba).max() <= 1e-4 * np.abs(ref_ba).max()
    assert np.abs(ours_ba).max() > 1.0  # the adapter holds the principal part, not zeros
