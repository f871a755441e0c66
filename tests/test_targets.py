"""Which layers a LoraConfig adapts (jaxlora/targets.py): target names, tied heads, rank / alpha patterns."""


import pytest
from flax import nnx

from jaxlora.layers import LoRALinear
from jaxlora.lora_config import LoraConfig
from jaxlora.models.tied import TiedHead
from jaxlora.peft_model import get_peft_model, merge_and_unload
from jaxlora.targets import lora_layers
from tests._models import ALL_14, diff, tiny, tokens


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


def test_tied_head_is_targeted_only_when_named():
    """A tied model's lm_head (jaxlora.models.tied.TiedHead) is a linear layer: "all-linear" leaves it alone, a
    name adapts it, as PEFT adapts transformers' tied lm_head."""
    model = get_peft_model(tiny(tie_word_embeddings=True), LoraConfig(), rngs=nnx.Rngs(0))
    assert len(lora_layers(model)) == ALL_14 and isinstance(model.base_model.model.lm_head, TiedHead)
    model = get_peft_model(tiny(tie_word_embeddings=True), LoraConfig(target_modules=["q_proj", "lm_head"]),
                           rngs=nnx.Rngs(0))
    head = model.base_model.model.lm_head
    assert len(lora_layers(model)) == 3 and isinstance(head, LoRALinear) and isinstance(head.base, TiedHead)


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
