"""PEFT adapter files both ways, merged checkpoints and QLoRA, against transformers + PEFT (+ bitsandbytes).

Error measure: rel_err = max|ours - theirs| / max|theirs| over the logits (as test_model_parity). Bounds:
fp32 models differ only in summation order, so 1e-4 (the model parity bound) has ~100x headroom over the
measured ~1e-6; every adapter has nonzero A and B, and each test checks that the adapter moves the logits
by far more than the bound (`assert_adapted`), so a silently dropped adapter fails.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxlora.generate import generate
from jaxlora.lora_config import LoraConfig
from jaxlora.models.loading import from_pretrained, save_pretrained
from jaxlora.models.quantize import QuantConfig, quantize_model
from jaxlora.peft_model import adapter_rows, get_peft_model, load_adapter, merge_and_unload, save_adapter
from jaxlora.targets import lora_layers
from torch_ref import hf_ref, peft_ref
from torch_ref.compare import assert_adapted, ids, rel_err, torch_logits

FAMILIES = ("llama", "mistral", "qwen2")  # qwen2: q/k/v biases under the adapters
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return hf_ref.save_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_ref.save_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=1)


def jax_adapted(path, config=None, quantized=False):
    model = from_pretrained(path)
    if quantized:  # NF4 + double quantization, float32 compute: transformers' BitsAndBytesConfig below
        quantize_model(model, QuantConfig(compute_dtype=jnp.float32))
    # init_lora_weights=False draws B at random (nonzero) instead of PEFT's B = 0.
    config = config or LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    return get_peft_model(model, config, rngs=nnx.Rngs(3))


def test_jaxlora_adapter_loads_in_peft(checkpoint, tmp_path):
    """save_adapter -> PeftModel.from_pretrained: same logits; "all-linear" written as PEFT writes it."""
    model = jax_adapted(checkpoint)
    save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" not in written["target_modules"] and len(written["target_modules"]) == 14
    tokens = ids()
    peft = peft_ref.load_adapter(hf_ref.load_model(checkpoint), tmp_path / "adapter")
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(checkpoint), tokens))


def test_peft_adapter_loads_in_jaxlora(checkpoint, tmp_path):
    """A PEFT-saved adapter with random A, B -> load_adapter: same logits."""
    peft = peft_ref.random_adapter(hf_ref.load_model(checkpoint), seed=2, r=4, lora_alpha=16,
                                   target_modules="all-linear")
    peft.save_pretrained(tmp_path / "adapter")
    model = load_adapter(from_pretrained(checkpoint), tmp_path / "adapter", rngs=nnx.Rngs(0))
    tokens = ids(1)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(checkpoint), tokens))


VARIANTS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"q_proj": 3}),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(k_proj|up_proj)"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", exclude_modules=["gate_proj"]),
}


def round_trip(peft, base_path, tmp_path, tokens, **load):
    """PEFT -> jaxlora -> PEFT: PEFT's saved adapter loads in jaxlora with PEFT's logits, jaxlora writes back
    exactly PEFT's tensors (keys and values), and PEFT loads that with the same logits again. Returns
    (jaxlora model, its logits, PEFT's logits, PEFT's file as a dict)."""
    from safetensors.numpy import load_file

    peft.save_pretrained(tmp_path / "peft")
    model = load_adapter(from_pretrained(base_path), tmp_path / "peft", **load)
    save_adapter(model, tmp_path / "ours")
    ours, theirs = model(jnp.asarray(tokens)), torch_logits(peft, tokens)
    assert rel_err(ours, theirs) < TOL
    again = peft_ref.load_adapter(hf_ref.load_model(base_path), tmp_path / "ours")
    assert rel_err(torch_logits(again, tokens), theirs) < TOL
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    return model, ours, theirs, a


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_round_trip(llama, tmp_path, variant):
    """PEFT -> jaxlora -> PEFT for rank/alpha patterns, rsLoRA (+ regex targets), DoRA (+ exclude): the
    logits agree at every hop and the re-saved config means what PEFT's did."""
    cfg = VARIANTS[variant]
    peft = peft_ref.random_adapter(hf_ref.load_model(llama), seed=4, **cfg)
    # Tensor by tensor too: jaxlora writes back exactly what PEFT wrote (float32 through, no arithmetic).
    _, ours, _, _ = round_trip(peft, llama, tmp_path, ids(2), rngs=nnx.Rngs(0))
    assert_adapted(ours, torch_logits(hf_ref.load_model(llama), ids(2)))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return hf_ref.save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), seed=1)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_round_trip(qwen2, tmp_path, bias):
    """bias="all" / "lora_only" on qwen2's q/k/v biases: PEFT's file (trained biases shifted) loads in jaxlora
    with PEFT's logits, and jaxlora writes back the same keys and values, which PEFT loads again."""
    peft = peft_ref.random_adapter(hf_ref.load_model(qwen2), seed=5, r=4, lora_alpha=8, bias=bias,
                                   target_modules=["q_proj", "o_proj", "up_proj"])
    tokens = ids(6)
    _, _, theirs, a = round_trip(peft, qwen2, tmp_path, tokens)
    # The biases alone move the logits: with them reset to the base's, the logits differ.
    biases = [k for k in a if k.endswith(".bias")]
    assert len(biases) == (6 if bias == "all" else 2)  # q, k, v of 2 layers; "lora_only": q (the adapted one)
    assert any(".base_layer.bias" in k for k in biases)
    base = hf_ref.load_model(qwen2)
    with torch.no_grad():
        peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.copy_(
            base.model.layers[0].self_attn.q_proj.bias)
    assert rel_err(torch_logits(peft, tokens), theirs) > 1e-3


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens"]])
def test_modules_to_save_round_trip(llama, tmp_path, saved):
    """modules_to_save (a copy trained in full): PEFT's file loads in jaxlora with PEFT's logits, jaxlora writes
    back PEFT's keys and values, PEFT loads that; with adapters disabled both run the original module."""
    peft = peft_ref.random_adapter(hf_ref.load_model(llama), seed=6, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj"], modules_to_save=saved)
    tokens = ids(7)
    model, _, _, a = round_trip(peft, llama, tmp_path, tokens)
    assert {"lm_head": "base_model.model.lm_head.weight",
            "embed_tokens": "base_model.model.model.embed_tokens.weight"}[saved[0]] in a
    with peft.disable_adapter(), model.disable_adapter():
        assert rel_err(model(jnp.asarray(tokens)), torch_logits(peft, tokens)) < TOL
    # The copy alone matters: with LoRA's B zeroed on both sides the logits still differ from the base's.
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert_adapted(torch_logits(peft, tokens), torch_logits(hf_ref.load_model(llama), tokens))


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_lora_round_trip(tmp_path, tie):
    """LoRA on embed_tokens (PEFT's lora.Embedding, lora_embedding_A / _B): PEFT's file loads in jaxlora with
    PEFT's logits, jaxlora writes back the same keys and values (the table too, as PEFT), PEFT loads that;
    the merged model matches too. Tied: the output head keeps the base table on both sides while unmerged;
    merged, the delta is in the shared table on both sides (PEFT's lm_head shares the embedding's matrix)."""
    path = hf_ref.save_tiny_model("llama", tmp_path / "m", seed=1, tie_word_embeddings=tie)
    peft = peft_ref.random_adapter(hf_ref.load_model(path), seed=7, r=4, lora_alpha=8,
                                   target_modules=["embed_tokens", "v_proj"])
    tokens = ids(8)
    model, ours, _, a = round_trip(peft, path, tmp_path, tokens)
    assert a["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 256)
    assert a["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
    with torch.no_grad():  # the embedding's adapter alone moves the logits
        for n, p in peft.named_parameters():
            if "v_proj.lora_B" in n:
                p.zero_()
    assert_adapted(torch_logits(peft, tokens), torch_logits(hf_ref.load_model(path), tokens))
    save_pretrained(merge_and_unload(model), tmp_path / "merged")
    merged = torch_logits(hf_ref.load_model(tmp_path / "merged"), tokens)
    if tie:  # the merged table moves the head too, as PEFT's merge into the shared matrix: not the adapted logits
        peft = peft_ref.load_adapter(hf_ref.load_model(path), tmp_path / "peft")
        assert rel_err(merged, torch_logits(peft.merge_and_unload(), tokens)) < TOL
        assert_adapted(merged, ours)
    else:
        assert rel_err(merged, ours) < TOL


def test_merged_checkpoint_loads_in_transformers(checkpoint, tmp_path):
    """merge_and_unload -> save_pretrained -> transformers: the adapted model's logits, no PEFT needed."""
    model = jax_adapted(checkpoint)
    tokens = ids(3)
    adapted = model(jnp.asarray(tokens))
    save_pretrained(merge_and_unload(model), tmp_path / "merged")
    merged = hf_ref.load_model(tmp_path / "merged")
    assert rel_err(torch_logits(merged, tokens), adapted) < TOL
    assert_adapted(adapted, torch_logits(hf_ref.load_model(checkpoint), tokens))


def test_qlora_adapter_matches_bnb_peft(checkpoint, tmp_path):
    """NF4 + double-quantized base on both sides (jaxlora's bytes equal bitsandbytes', tested elsewhere),
    float32 compute, the same adapter file: logits agree to fp32 rounding. Then the merged QLoRA model
    (dequantize(W) + delta, no re-quantization) saved dense loads in transformers with the same logits."""
    model = jax_adapted(checkpoint, quantized=True)
    save_adapter(model, tmp_path / "adapter")
    bnb_model = peft_ref.load_adapter(
        hf_ref.load_quantized_model(checkpoint, hf_ref.bnb_4bit_config(compute_dtype=torch.float32)),
        tmp_path / "adapter",
    )
    tokens = ids(4)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(bnb_model, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(checkpoint), tokens))
    save_pretrained(merge_and_unload(model), tmp_path / "merged")
    assert rel_err(torch_logits(hf_ref.load_model(tmp_path / "merged"), tokens), ours) < TOL


def test_greedy_generation_with_adapter(llama, tmp_path):
    """jaxlora generate (KV cache, left padding) with an adapter = PEFT model.generate(do_sample=False)."""
    model = jax_adapted(llama)
    save_adapter(model, tmp_path / "adapter")
    peft = peft_ref.load_adapter(hf_ref.load_model(llama), tmp_path / "adapter")
    tokens, mask = ids(5, seq=6), np.ones((2, 6), np.int64)
    tokens[1, :2], mask[1, :2] = 0, 0
    ours = generate(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), max_new_tokens=12)
    with torch.no_grad():
        theirs = peft.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=12,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
    with torch.no_grad():
        base = hf_ref.load_model(llama).generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                                                 max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not np.array_equal(base.numpy(), theirs.numpy())  # the adapter changes what is generated


def test_save_pretrained_layout_loads_in_peft(llama, tmp_path):
    """PeftModel.save_pretrained with two adapters -> PEFT's PeftModel.from_pretrained(dir) + load_adapter(dir/b):
    PEFT finds both where it looks ("default" in dir, "b" in dir/b) with our logits for each; our LoRA layers sit
    at PEFT's module paths (base_model.model....)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = jax_adapted(llama)
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                                      modules_to_save=["lm_head"]), rngs=nnx.Rngs(4))
    model.save_pretrained(tmp_path / "both")
    peft = PeftModel.from_pretrained(hf_ref.load_model(llama), str(tmp_path / "both"))
    peft.load_adapter(str(tmp_path / "both" / "b"), adapter_name="b")
    peft.eval()
    theirs_paths = {n for n, m in peft.named_modules() if isinstance(m, LoraLayer)}
    assert set(lora_layers(model)) == theirs_paths and len(theirs_paths) == 14
    tokens, base = ids(9), torch_logits(hf_ref.load_model(llama), tokens=ids(9))
    for name in ("default", "b"):
        model.set_adapter(name)
        peft.set_adapter(name)
        ours = model(jnp.asarray(tokens))
        assert rel_err(ours, torch_logits(peft, tokens)) < TOL, name
        assert_adapted(ours, base)


MIXED = ["a", "__base__", "b"]


@pytest.fixture(scope="module")
def two_adapters(llama, tmp_path_factory):
    """PEFT and jaxlora holding the same two adapters: "a" (r 4, all-linear), "b" (r 2, three projections and
    the embedding), each with its own trained copy of lm_head (modules_to_save), all tensors random."""
    tmp = tmp_path_factory.mktemp("mixed")
    settings = {"a": dict(seed=8, r=4, lora_alpha=8, target_modules="all-linear"),
                "b": dict(seed=9, r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])}
    for name, kw in settings.items():
        peft_ref.random_adapter(hf_ref.load_model(llama), modules_to_save=["lm_head"], **kw).save_pretrained(tmp / name)
    from peft import PeftModel

    peft = PeftModel.from_pretrained(hf_ref.load_model(llama), str(tmp / "a"), adapter_name="a")
    peft.load_adapter(str(tmp / "b"), adapter_name="b")
    model = from_pretrained(llama)
    for name in settings:  # the first wraps the plain model in a PeftModel, the next adds to it
        model = load_adapter(model, tmp / name, adapter_name=name)
    return peft.eval(), model


def test_mixed_adapter_batch_matches_peft(llama, two_adapters):
    """model(ids, adapter_names=["a", "__base__", "b"]): PEFT's logits row for row, each row its own adapter."""
    peft, model = two_adapters
    tokens = np.random.default_rng(10).integers(3, 256, (3, 12))
    with torch.no_grad():
        theirs = peft(torch.tensor(tokens), adapter_names=MIXED).logits.float().numpy()
    ours = model(jnp.asarray(tokens), adapter_rows=adapter_rows(model, MIXED))
    assert rel_err(ours, theirs) < TOL
    base = torch_logits(hf_ref.load_model(llama), tokens)
    assert rel_err(ours[1], base[1]) < TOL  # "__base__": the base model alone
    assert_adapted(ours[0], base[0])
    assert_adapted(ours[2], base[2])
    swapped = model(jnp.asarray(tokens), adapter_rows=adapter_rows(model, MIXED[::-1]))
    assert rel_err(swapped[0], theirs[0]) > 1e-2 and rel_err(swapped[2], theirs[2]) > 1e-2  # rows are routed


def test_mixed_adapter_generation_matches_peft(two_adapters):
    """Greedy generate(adapter_names=...) with left padding = PEFT's generate(adapter_names=...)."""
    peft, model = two_adapters
    tokens, mask = np.random.default_rng(11).integers(3, 256, (3, 6)), np.ones((3, 6), np.int64)
    tokens[1, :2], mask[1, :2] = 0, 0
    ours = generate(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), max_new_tokens=8,
                    adapter_names=MIXED)
    with torch.no_grad():
        theirs = peft.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=8,
                               do_sample=False, eos_token_id=None, pad_token_id=0, adapter_names=MIXED)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_trainable_count_follows_the_active_adapter_as_peft(llama):
    """get_nb_trainable_parameters counts what trains -- the active adapter's A and B and its trained copy of
    lm_head, as PEFT counts requires_grad after add_adapter and set_adapter -- and every parameter in all."""
    from peft import LoraConfig as TheirConfig
    from peft import get_peft_model as their_peft_model

    first = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    second = dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft = their_peft_model(hf_ref.load_model(llama), TheirConfig(**first))
    peft.add_adapter("b", TheirConfig(**second))
    model = get_peft_model(from_pretrained(llama), LoraConfig(**first), rngs=nnx.Rngs(0))
    model.add_adapter("b", LoraConfig(**second), rngs=nnx.Rngs(1))
    assert model.get_nb_trainable_parameters() == peft.get_nb_trainable_parameters()
    peft.set_adapter("b")
    model.set_adapter("b")
    assert model.get_nb_trainable_parameters() == peft.get_nb_trainable_parameters()
    assert model.get_nb_trainable_parameters()[0] > 2 * 4 * 2 * 64  # b's: more than the first adapter's


@pytest.mark.parametrize("first, second", [("all", "none"), ("none", "all"), ("lora_only", "none")])
def test_trainable_biases_follow_the_active_adapter_as_peft(qwen2, first, second):
    """qwen2's q/k/v biases with two adapters of different `bias`: after add_adapter the biases of the
    active adapter's setting train, on both sides (PEFT marks them by the active adapter's bias when it
    injects one; what set_adapter does after that differs: README "Known differences"). PEFT refuses a second
    adapter with a bias, so one of the two has none."""
    from peft import LoraConfig as TheirConfig
    from peft import get_peft_model as their_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    peft = their_peft_model(hf_ref.load_model(qwen2), TheirConfig(**kw, bias=first))
    peft.add_adapter("b", TheirConfig(**kw, bias=second))
    model = get_peft_model(from_pretrained(qwen2), LoraConfig(**kw, bias=first), rngs=nnx.Rngs(0))
    model.add_adapter("b", LoraConfig(**kw, bias=second), rngs=nnx.Rngs(1))
    assert model.get_nb_trainable_parameters() == peft.get_nb_trainable_parameters()
