"""Tied embeddings (``tie_word_embeddings=True``) with ``lm_head`` adapted, against transformers + PEFT 0.21.

What PEFT does there (its default ``ensure_weight_tying=False``; README "Tied embeddings"): LoRA on lm_head
adds its delta to the logits only, the file carries the shared table as ``lm_head.base_layer.weight``, and
merging writes the delta into the shared matrix -- the embedding moves too and the model stays tied.
``modules_to_save=["lm_head"]`` trains an untied copy; merge_and_unload keeps it and unties the model
(``tie_word_embeddings=False``). Each test checks both sides against each other and that the adapted part
moves the logits (`assert_adapted`), so a dropped adapter or copy fails.

Error measure and bound as test_adapters_parity: rel_err over the logits, 1e-4 for fp32 (summation order).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from jaxlora.layers import LoRALinear
from jaxlora.lora_config import LoraConfig
from jaxlora.models.loading import from_pretrained, save_pretrained
from jaxlora.models.tied import TiedHead
from jaxlora.peft_model import get_peft_model, load_adapter, merge_and_unload, save_adapter
from torch_ref import hf_ref, peft_ref
from torch_ref.compare import assert_adapted, ids, rel_err, torch_logits

TOL = 1e-4
HEAD = "base_model.model.lm_head"


@pytest.fixture(scope="module", autouse=True)
def _fresh_compiler():
    """Release the compiled programs of the tests before this module. In the full suite (one process, ~950
    tests before this module) XLA's CPU compiler aborted (SIGABRT) compiling the shared-table gradient below,
    which compiles fine in a fresh process; dropping what earlier modules compiled is meant to stop that
    (the abort listed 153 loaded XLA kernels). Releasing after every module instead made the suite 3x slower."""
    jax.clear_caches()
    yield


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return hf_ref.save_tiny_model("llama", tmp_path_factory.mktemp("tied"), seed=1, tie_word_embeddings=True)


def peft_head_lora(path, **kw):
    """PEFT's LoRA on q_proj and the tied lm_head, every A and B random (peft_ref.random_adapter)."""
    return peft_ref.random_adapter(hf_ref.load_model(path), seed=11, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "lm_head"], **kw)


def table(model):
    return np.asarray(model.model.embed_tokens.embedding.get_value())


def assert_same_file(model, theirs_file, path):
    """model's adapter, saved to `path`, holds exactly PEFT's tensors: the same keys, bit for bit."""
    save_adapter(model, path)
    ours_file = load_file(path / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(theirs_file)
    assert all(np.array_equal(ours_file[k], theirs_file[k]) for k in theirs_file)


def assert_same_tied_lists(ours_dir, theirs_dir) -> None:
    """adapter_config.json's target_modules and modules_to_save as PEFT rewrites them to tie (PEFT writes a
    set: order aside)."""
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (ours_dir, theirs_dir))
    for key in ("target_modules", "modules_to_save"):
        assert (theirs[key] is None and ours[key] is None) or sorted(ours[key]) == sorted(theirs[key]), key


def assert_merged_checkpoint(merged, theirs, tokens, path, *, tied: bool) -> np.ndarray:
    """A merged model has PEFT's merged logits, and its checkpoint is tied or untied as PEFT's (lm_head.weight
    written iff untied, tie_word_embeddings saying so) and loads in transformers with the same logits."""
    ours = merged(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(theirs, tokens)) < TOL
    save_pretrained(merged, path)
    assert ("lm_head.weight" in load_file(path / "model.safetensors")) is not tied
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is tied
    assert rel_err(torch_logits(hf_ref.load_model(path), tokens), ours) < TOL
    return ours


def test_lora_on_tied_head_round_trip(tied, tmp_path):
    """PEFT -> jaxlora -> PEFT: the same logits at every hop, the same tensors back (the shared table as
    lm_head.base_layer.weight, as PEFT writes it); the head's adapter alone moves the logits."""
    peft = peft_head_lora(tied)
    peft.save_pretrained(tmp_path / "peft")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert f"{HEAD}.base_layer.weight" in theirs_file and f"{HEAD}.lora_A.weight" in theirs_file
    assert not any("embed_tokens" in k for k in theirs_file)  # PEFT adapts the head, not the embedding

    model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    user = model.base_model.model
    assert isinstance(user.lm_head, LoRALinear) and isinstance(user.lm_head.base, TiedHead)
    assert user.lm_head.base.embedding is user.model.embed_tokens.embedding  # still one table
    tokens = ids(1)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    base = torch_logits(hf_ref.load_model(tied), tokens)
    with torch.no_grad():  # the head's adapter alone moves the logits
        peft.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.zero_()
        peft.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.zero_()
    assert_adapted(torch_logits(peft, tokens), base)
    # (That the delta reaches the logits only, not the embedding lookup: tests/models/test_tied.py.)

    model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    assert_same_file(model, theirs_file, tmp_path / "ours")
    again = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "ours")
    assert rel_err(torch_logits(again, tokens), ours) < TOL


def test_jaxlora_tied_head_adapter_loads_in_peft(tied, tmp_path):
    """get_peft_model(target_modules=[..., "lm_head"]) on a tied model -> save_adapter -> PEFT: same logits,
    and the file's table loads into PEFT's shared matrix (a base with another table gets ours)."""
    model = get_peft_model(from_pretrained(tied), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["q_proj", "lm_head"]), rngs=nnx.Rngs(3))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["lm_head", "q_proj"] and not config.get("ensure_weight_tying")
    other = hf_ref.load_model(tied)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2.0)  # a different shared table: the file's replaces it
    peft = peft_ref.load_adapter(other, tmp_path / "adapter")
    tokens = ids(2)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(tied), tokens))


def test_tied_head_merge_and_unload_matches_peft(tied, tmp_path):
    """merge_and_unload writes the head's delta into the shared matrix on both sides: the embedding moves too
    (so the merged logits differ from the adapted ones), the model stays tied, and its checkpoint is a tied
    transformers checkpoint (no lm_head.weight) that loads with PEFT's merged logits."""
    peft = peft_head_lora(tied)
    peft.save_pretrained(tmp_path / "peft")
    model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    tokens = ids(3)
    adapted = model(jnp.asarray(tokens))
    theirs = peft.merge_and_unload()
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight and theirs.config.tie_word_embeddings
    merged = merge_and_unload(model)
    assert isinstance(merged.lm_head, TiedHead) and merged.lm_head.embedding is merged.model.embed_tokens.embedding
    np.testing.assert_allclose(table(merged), theirs.model.embed_tokens.weight.detach().numpy(), rtol=1e-6, atol=1e-6)
    ours = assert_merged_checkpoint(merged, theirs, tokens, tmp_path / "merged", tied=True)
    assert_adapted(ours, adapted)  # the merged embedding moves the hidden states: not the adapted model


def test_modules_to_save_tied_head_matches_peft(tied, tmp_path):
    """modules_to_save=["lm_head"] on a tied model: an untied trained copy on both sides (the embedding keeps
    the original), PEFT's file both ways, and merge_and_unload unties the model as PEFT does: lm_head.weight
    is written and tie_word_embeddings is False."""
    peft = peft_ref.random_adapter(hf_ref.load_model(tied), seed=12, r=4, lora_alpha=8, target_modules=["q_proj"],
                                   modules_to_save=["lm_head"])
    peft.save_pretrained(tmp_path / "peft")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert f"{HEAD}.weight" in theirs_file
    model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    user = model.base_model.model
    original = table(user)
    tokens = ids(4)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_same_file(model, theirs_file, tmp_path / "ours")
    again = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "ours")
    assert rel_err(torch_logits(again, tokens), ours) < TOL
    with torch.no_grad():  # the copy alone moves the logits
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert_adapted(torch_logits(peft, tokens), torch_logits(hf_ref.load_model(tied), tokens))

    peft = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "peft")
    theirs = peft.merge_and_unload()
    assert not theirs.config.tie_word_embeddings and theirs.lm_head.weight is not theirs.model.embed_tokens.weight
    merged = merge_and_unload(model)
    assert type(merged.lm_head) is nnx.Linear
    np.testing.assert_array_equal(table(merged), original)  # the embedding keeps the original table
    ours = assert_merged_checkpoint(merged, theirs, tokens, tmp_path / "merged", tied=False)
    assert rel_err(np.asarray(from_pretrained(tmp_path / "merged")(jnp.asarray(tokens))), ours) < TOL


def test_lora_on_untied_head_round_trip(tmp_path):
    """Untied lm_head targeted: PEFT writes its weight beside the adapter too (lm_head.base_layer.weight,
    save_embedding_layers), jaxlora reads it into the head's kernel and writes it back: the same tensors."""
    path = hf_ref.save_tiny_model("llama", tmp_path / "untied", seed=1)
    peft = peft_head_lora(path)
    peft.save_pretrained(tmp_path / "peft")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert f"{HEAD}.base_layer.weight" in theirs_file
    other = hf_ref.load_model(path)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    other.save_pretrained(tmp_path / "other")  # another head: the file's weight replaces it
    model = load_adapter(from_pretrained(tmp_path / "other"), tmp_path / "peft")
    tokens = ids(5)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(path), tokens))
    assert_same_file(model, theirs_file, tmp_path / "ours")


def weighted_grads(peft, model, tokens) -> dict[tuple, np.ndarray]:
    """The gradient of sum(logits * R), R a fixed random weighting, on both sides: PEFT's fills each
    Parameter's .grad, ours is returned (flat state path -> array)."""
    weights = np.random.default_rng(0).standard_normal(torch_logits(peft, tokens).shape).astype(np.float32)
    peft.zero_grad()
    (peft(torch.tensor(tokens)).logits * torch.tensor(weights)).sum().backward()
    # Compiled: an eager nnx.grad through the scanned layers compiles each scan's linearization on its own.
    grad = nnx.grad(lambda m: (m(jnp.asarray(tokens)) * weights).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.jit(grad)(model))}


def shared_table_grad_parity(peft, model, tokens, peft_param, our_path) -> None:
    """d/dW of sum(logits * R) for one trained table, both sides: the copy's gradient has its
    embedding-lookup part, and its head part where the head reads it too."""
    ours = weighted_grads(peft, model, tokens)[our_path]
    assert rel_err(ours, peft_param.grad.numpy()) < TOL


def test_modules_to_save_tied_embedding_matches_peft(tied, tmp_path):
    """modules_to_save=["embed_tokens"] on a tied model (ensure_weight_tying=False): the embedding's copy
    trains and the head keeps reading the original table, on both sides; PEFT's file both ways; both warn
    that a tied layer is part of the adapter; merge_and_unload unties the model as PEFT does (the head keeps
    the original matrix, lm_head.weight is written, tie_word_embeddings is False in memory and on disk)."""
    with pytest.warns(UserWarning, match="tied layer is part of the adapter"):
        peft = peft_ref.random_adapter(hf_ref.load_model(tied), seed=13, r=4, lora_alpha=8,
                                       target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    peft.save_pretrained(tmp_path / "peft")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" in theirs_file and f"{HEAD}.weight" not in theirs_file
    with pytest.warns(UserWarning, match="tied layer is part of the adapter"):
        model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    user = model.base_model.model
    original = np.asarray(user.lm_head.embedding.get_value())
    tokens = ids(6)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(tied), tokens))
    copy = peft.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    shared_table_grad_parity(peft, model, tokens, copy,
                             ("base_model", "model", "model", "embed_tokens", "adapters", "default", "embedding"))
    assert_same_file(model, theirs_file, tmp_path / "ours")
    again = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "ours")
    assert rel_err(torch_logits(again, tokens), ours) < TOL

    theirs = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "peft").merge_and_unload()
    assert not theirs.config.tie_word_embeddings
    merged = merge_and_unload(model)
    assert type(merged.lm_head) is nnx.Linear and not merged.config.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(merged.lm_head.kernel.get_value()).T, original)  # the head keeps it
    np.testing.assert_array_equal(table(merged), theirs.model.embed_tokens.weight.detach().numpy())
    assert_merged_checkpoint(merged, theirs, tokens, tmp_path / "merged", tied=False)


@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_ensure_weight_tying_modules_to_save_matches_peft(tied, tmp_path, saved):
    """ensure_weight_tying=True, either tied layer in modules_to_save: PEFT trains one copy that the
    embedding and the head both read, and so does jaxlora (one variable); the file holds it under both names
    (PEFT's keys, bit for bit, both ways); the gradient of the copy sums both uses, as PEFT's; and
    merge_and_unload leaves a tied model holding the copy (a tied checkpoint, no lm_head.weight)."""
    peft = peft_ref.random_adapter(hf_ref.load_model(tied), seed=14, r=4, lora_alpha=8, target_modules=["q_proj"],
                                   modules_to_save=[saved], ensure_weight_tying=True)
    peft.save_pretrained(tmp_path / "peft")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    copies = [f"{HEAD}.weight", "base_model.model.model.embed_tokens.weight"]
    assert set(copies) <= set(theirs_file) and np.array_equal(*(theirs_file[k] for k in copies))
    model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    user = model.base_model.model
    assert user.lm_head.adapters["default"].embedding is user.model.embed_tokens.adapters["default"].embedding
    tokens = ids(7)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    assert_adapted(ours, torch_logits(hf_ref.load_model(tied), tokens))
    copy = peft.base_model.model.model.embed_tokens.modules_to_save["default"].weight  # PEFT's head shares it
    shared_table_grad_parity(peft, model, tokens, copy, ("base_model", "model", "lm_head", "adapters", "default",
                                                          "embedding"))
    assert_same_file(model, theirs_file, tmp_path / "ours")
    again = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "ours")
    assert rel_err(torch_logits(again, tokens), ours) < TOL

    ours_new = get_peft_model(from_pretrained(tied), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                modules_to_save=[saved], ensure_weight_tying=True),
                              rngs=nnx.Rngs(0))
    save_adapter(ours_new, tmp_path / "new")  # jaxlora's own file: PEFT reads it as its own
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    assert_same_tied_lists(tmp_path / "new", tmp_path / "peft")
    assert set(load_file(tmp_path / "new" / "adapter_model.safetensors")) == set(theirs_file)
    peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "new")

    theirs = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "peft").merge_and_unload()
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight and theirs.config.tie_word_embeddings
    merged = merge_and_unload(model)
    assert isinstance(merged.lm_head, TiedHead) and merged.lm_head.embedding is merged.model.embed_tokens.embedding
    assert merged.config.tie_word_embeddings and type(merged.lm_head.embedding) is nnx.Param
    np.testing.assert_array_equal(table(merged), theirs.model.embed_tokens.weight.detach().numpy())
    assert_merged_checkpoint(merged, theirs, tokens, tmp_path / "merged", tied=True)


@pytest.mark.parametrize("named", ["lm_head", "embed_tokens"])
def test_ensure_weight_tying_lora_matches_peft(tied, tmp_path, named):
    """ensure_weight_tying=True with LoRA on either tied layer: PEFT puts the LoRA on the embedding and gives
    lm_head a LoRA whose A and B are views of the embedding's B and A; jaxlora's head reads the embedding's
    adapter transposed (TiedAdapter). The same logits, the head's part moving them; PEFT's file bit for bit
    both ways (the tables only where target_modules says "embed_tokens": PEFT's save_embedding_layers rule);
    the one pair's gradient is the sum of PEFT's two views' gradients (so an SGD step is PEFT's); merging adds
    the delta once, where PEFT's merge_and_unload adds it twice (README "Tied embeddings")."""
    peft = peft_ref.random_adapter(hf_ref.load_model(tied), seed=15, r=4, lora_alpha=8,
                                   target_modules=["q_proj", named], ensure_weight_tying=True)
    embed, head = peft.base_model.model.model.embed_tokens, peft.base_model.model.lm_head
    assert head.lora_A["default"].weight.data_ptr() == embed.lora_embedding_B["default"].data_ptr()
    assert head.lora_B["default"].weight.data_ptr() == embed.lora_embedding_A["default"].data_ptr()
    peft.save_pretrained(tmp_path / "peft")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {f"{HEAD}.lora_A.weight", "base_model.model.model.embed_tokens.lora_embedding_A"} <= set(theirs_file)
    assert (f"{HEAD}.base_layer.weight" in theirs_file) is (named == "embed_tokens")

    model = load_adapter(from_pretrained(tied), tmp_path / "peft")
    user = model.base_model.model
    assert user.lm_head.adapters["default"].source is user.model.embed_tokens.adapters["default"]
    tokens = ids(8)
    ours = model(jnp.asarray(tokens))
    assert rel_err(ours, torch_logits(peft, tokens)) < TOL
    h, _ = model.hidden_states(jnp.asarray(tokens))
    assert_adapted(ours, user.lm_head.base(h))  # the head's delta matters: the lookup's alone is not enough

    grads = weighted_grads(peft, model, tokens)
    source = ("base_model", "model", "lm_head", "adapters", "default", "source")
    head_a, head_b = head.lora_A["default"].weight.grad, head.lora_B["default"].weight.grad
    assert float(head_b.abs().max()) > 1e-3  # PEFT's head view has a part of its own
    theirs_a = embed.lora_embedding_A["default"].grad + head_b.T  # (r, vocab), PEFT's storage of A
    theirs_b = embed.lora_embedding_B["default"].grad + head_a.T  # (hidden, r)
    assert rel_err(grads[(*source, "lora_a")], theirs_a.numpy().T) < TOL
    assert rel_err(grads[(*source, "lora_b")], theirs_b.numpy().T) < TOL

    assert_same_file(model, theirs_file, tmp_path / "ours")
    again = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "ours")
    assert again.base_model.model.lm_head.lora_A["default"].weight.data_ptr() == \
        again.base_model.model.model.embed_tokens.lora_embedding_B["default"].data_ptr()
    assert rel_err(torch_logits(again, tokens), ours) < TOL
    ours_new = get_peft_model(from_pretrained(tied), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", named],
                                                                ensure_weight_tying=True, init_lora_weights=False),
                              rngs=nnx.Rngs(0))
    save_adapter(ours_new, tmp_path / "new")  # jaxlora's own file: PEFT reads it as its own
    assert_same_tied_lists(tmp_path / "new", tmp_path / "peft")
    assert set(load_file(tmp_path / "new" / "adapter_model.safetensors")) == set(theirs_file)
    theirs_new = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "new")
    assert rel_err(torch_logits(theirs_new, tokens), ours_new(jnp.asarray(tokens))) < TOL

    w = np.asarray(user.lm_head.base.embedding.get_value())  # the shared table, unmerged
    theirs = peft_ref.load_adapter(hf_ref.load_model(tied), tmp_path / "peft").merge_and_unload()
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight and theirs.config.tie_word_embeddings
    merged = merge_and_unload(model)
    assert isinstance(merged.lm_head, TiedHead) and merged.lm_head.embedding is merged.model.embed_tokens.embedding
    theirs_delta = theirs.model.embed_tokens.weight.detach().numpy() - w  # PEFT's: both layers' merge, 2 delta
    np.testing.assert_allclose(table(merged) - w, theirs_delta / 2, rtol=1e-5, atol=1e-6)
    merged_logits = merged(jnp.asarray(tokens))
    assert rel_err(merged_logits, ours) < TOL  # merged once: the adapted model's logits
    save_pretrained(merged, tmp_path / "merged")
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")
    assert rel_err(torch_logits(hf_ref.load_model(tmp_path / "merged"), tokens), merged_logits) < TOL
