"""The tied output head (jaxlora/models/tied.py): one table, two readers; LoRA and modules_to_save on it.

Parity with PEFT itself is in parity_tests/test_tied_parity.py; here the properties that need no torch:
the head reads the embedding's own variable, a LoRA delta reaches the logits only, merging writes into the
shared table (and unmerging takes it out), and checkpoint I/O, quantization, jit, generation and sharding
keep the model tied. fp32 throughout: a merge/unmerge round trip is bounded by the rounding of its adds
and subtracts (half a float32 ulp of the merged values each).
"""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxlora.base import LinearBase, TableBase
from jaxlora.generate import generate
from jaxlora.layers import LoRALinear
from jaxlora.lora_config import LoraConfig
from jaxlora.models.loading import from_pretrained, save_pretrained
from jaxlora.models.quantize import QuantConfig, hf_quantization_config, quantize_model
from jaxlora.models.tied import TiedHead
from jaxlora.peft_model import get_peft_model
from jaxlora.targets import base_of
from jaxlora.train.sharding import make_mesh, shard_model
from tests._models import RANDOM, diff, tiny, tokens


def tied():
    return tiny(tie_word_embeddings=True)


def table(model) -> jax.Array:
    return base_of(model.model.embed_tokens).embedding.get_value()  # the table, under a LoRA layer too


def test_head_reads_the_embedding_table():
    model = tied()
    head = model.lm_head
    assert isinstance(head, TiedHead) and isinstance(head, LinearBase) and isinstance(head, TableBase)
    assert head.embedding is model.model.embed_tokens.embedding and (head.in_features, head.out_features) == (32, 64)
    h = jax.random.normal(jax.random.key(1), (2, 3, 32))
    np.testing.assert_allclose(head(h), h @ table(model).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(head.dense_kernel(jnp.float32), table(model).T)
    new = jax.random.normal(jax.random.key(2), (32, 64))
    head.set_kernel(new)  # the embedding reads it too
    np.testing.assert_array_equal(model.model.embed_tokens(jnp.arange(3)), new.T[:3])
    untied = head.untied()  # modules_to_save's copy: the same logits, a table of its own
    assert type(untied) is nnx.Linear and diff(untied(h), head(h)) < 1e-6
    untied.kernel.set_value(untied.kernel.get_value() + 1.0)
    np.testing.assert_array_equal(table(model), new.T)


def test_state_has_the_table_once():
    """Flax reports a shared variable once (at its first path in sorted order, under lm_head)."""
    model = tied()
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tables = [p for p, v in leaves if v.get_value().shape == (64, 32)]
    assert len(tables) == 1
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    assert again.lm_head.embedding is again.model.embed_tokens.embedding


def test_lora_on_tied_head_moves_logits_only_and_merges_into_the_table():
    model = tied()
    x = tokens()
    base_h, _ = model.hidden_states(x)
    base_logits = model(x)
    table0 = table(model)
    peft = get_peft_model(model, LoraConfig(**RANDOM, target_modules=["lm_head"]), rngs=nnx.Rngs(1))
    head = model.lm_head
    assert isinstance(head, LoRALinear) and head.base.embedding is model.model.embed_tokens.embedding
    h, _ = peft.hidden_states(x)
    assert diff(h, base_h) == 0  # the embedding lookup reads the plain table
    adapted = peft(x)
    assert diff(adapted, base_logits) > 1e-2
    assert diff(nnx.jit(lambda m, x: m(x))(peft, x), adapted) < 1e-5
    adapter = head.adapters["default"]
    delta = adapter.scaling * (adapter.lora_a.get_value() @ adapter.lora_b.get_value())  # (hidden, vocab)
    peft.merge_adapter()  # PEFT: the delta goes into the shared matrix, so the embedding moves too
    np.testing.assert_allclose(table(model), table0 + delta.T, rtol=1e-6, atol=1e-6)
    assert diff(peft.hidden_states(x)[0], base_h) > 1e-3
    peft.unmerge_adapter()
    np.testing.assert_allclose(table(model), table0, atol=1e-6)
    assert diff(peft(x), adapted) < 1e-5
    merged = peft.merge_and_unload()
    assert isinstance(merged.lm_head, TiedHead) and merged.lm_head.embedding is merged.model.embed_tokens.embedding
    np.testing.assert_allclose(table(merged), table0 + delta.T, rtol=1e-6, atol=1e-6)


def test_unload_keeps_the_tie():
    model = tied()
    table0 = table(model)
    peft = get_peft_model(model, LoraConfig(**RANDOM, target_modules=["embed_tokens", "lm_head"]), rngs=nnx.Rngs(1))
    assert model.lm_head.base.embedding is model.model.embed_tokens.base.embedding  # both adapt the one table
    peft.merge_adapter()
    merged = table(model)
    assert diff(merged, table0) > 1e-2  # both deltas, in the one table
    plain = peft.unload()  # unmerges first
    assert isinstance(plain.lm_head, TiedHead) and plain.lm_head.embedding is plain.model.embed_tokens.embedding
    # Two adds and two subtracts, each rounded to half an ulp of the merged values (float32: 2^-24 relative).
    assert diff(table(plain), table0) <= 4 * 2.0**-24 * float(jnp.abs(merged).max())


def test_lora_on_tied_embedding_merge_reaches_the_head():
    """LoRA on embed_tokens of a tied model: the head keeps the plain table while unmerged and sees the merged
    one after merging (PEFT's lm_head shares the embedding's Parameter)."""
    model, x = tied(), tokens()
    peft = get_peft_model(model, LoraConfig(**RANDOM, target_modules=["embed_tokens"]), rngs=nnx.Rngs(1))
    h = jax.random.normal(jax.random.key(3), (2, 32))
    before = peft.logits(h)
    merged = peft.merge_and_unload()
    assert merged.lm_head.embedding is merged.model.embed_tokens.embedding
    assert diff(merged.logits(h), before) > 1e-2


def test_pissa_on_tied_head_is_refused():
    with pytest.raises(ValueError, match="tied to the embedding"):
        get_peft_model(tied(), LoraConfig(target_modules=["lm_head"], init_lora_weights="pissa"), rngs=nnx.Rngs(0))


def test_modules_to_save_unties_the_head(tmp_path):
    model, x = tied(), tokens()
    table0 = table(model)
    peft = get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), rngs=nnx.Rngs(1))
    copy = model.lm_head.adapters["default"]
    assert type(copy) is nnx.Linear and isinstance(copy.kernel, nnx.LoRAParam)
    copy.kernel.set_value(copy.kernel.get_value() + 0.1)  # as if trained
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(peft)
    assert diff(grads.base_model.model.lm_head.adapters["default"].kernel.get_value(), 0.0) > 0
    adapted = peft(x)
    plain = peft.merge_and_unload()
    assert type(plain.lm_head) is nnx.Linear and diff(plain(x), adapted) < 1e-5
    assert plain.config.tie_word_embeddings is False  # in memory too, as PEFT's merge_and_unload sets it
    np.testing.assert_array_equal(table(plain), table0)  # the embedding kept the original
    save_pretrained(plain, tmp_path / "untied")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(tmp_path / "untied" / "model.safetensors")
    assert diff(from_pretrained(tmp_path / "untied")(x), adapted) < 1e-5


def test_ensure_weight_tying_trains_one_table_through_the_trainers_step():
    """ensure_weight_tying=True, modules_to_save=["embed_tokens"]: the embedding's copy and the head's are one
    nnx.LoRAParam variable; the donating step trains it (it reaches the loss through the lookup and the head)
    and the two modules still share it afterwards; unload keeps the model tied, the copy frozen."""
    from jaxlora.train.loop import _step_for
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import donating_train_step

    peft = get_peft_model(tied(), LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                             ensure_weight_tying=True), rngs=nnx.Rngs(1))
    user = peft.base_model.model
    shared = user.model.embed_tokens.adapters["default"].embedding
    assert isinstance(shared, nnx.LoRAParam) and user.lm_head.adapters["default"].embedding is shared
    before = np.array(shared.get_value())  # the step donates the array itself
    ids = np.asarray(tokens())
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}
    opt = nnx.Optimizer(peft, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)
    assert _step_for(peft, opt) is donating_train_step
    run = donating_train_step.bind(peft, opt)
    losses = [float(run(batch)["loss"]) for _ in range(3)]
    assert losses[2] < losses[0]
    assert diff(user.model.embed_tokens.adapters["default"].embedding.get_value(), before) > 1e-3
    trained = user.model.embed_tokens.adapters["default"].embedding.get_value()
    plain = peft.unload()
    assert isinstance(plain.lm_head, TiedHead) and plain.lm_head.embedding is plain.model.embed_tokens.embedding
    assert type(plain.lm_head.embedding) is nnx.Param and plain.config.tie_word_embeddings
    np.testing.assert_array_equal(table(plain), trained)


def test_ensure_weight_tying_with_a_second_adapter():
    """Two tied adapters: each has its own shared copy; switching, a mixed batch and deleting one work, and
    the base (adapters disabled) reads the original table."""
    model, x = tied(), tokens()
    config = LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    peft = get_peft_model(model, config, rngs=nnx.Rngs(1))
    peft.add_adapter("b", dataclasses.replace(config, modules_to_save=["lm_head"]), rngs=nnx.Rngs(2))
    for name, shift in (("default", 0.1), ("b", -0.2)):
        copy = model.model.embed_tokens.adapters[name].embedding
        assert model.lm_head.adapters[name].embedding is copy
        copy.set_value(copy.get_value() + shift)  # as if trained
    outs = {}
    for name in ("default", "b"):
        peft.set_adapter(name)
        outs[name] = peft(x)
    with peft.disable_adapter():
        base = peft(x)
    assert diff(outs["default"], outs["b"]) > 1e-2 and diff(outs["b"], base) > 1e-2
    mixed = peft(x, adapter_names=["b", "__base__"])
    assert diff(mixed[0], outs["b"][0]) < 1e-5 and diff(mixed[1], base[1]) < 1e-5
    peft.delete_adapter("default")
    assert list(model.lm_head.adapters) == ["b"] and diff(peft(x), outs["b"]) < 1e-5
    plain = peft.merge_and_unload()
    assert plain.lm_head.embedding is plain.model.embed_tokens.embedding and plain.config.tie_word_embeddings


def test_a_refused_tied_adapter_leaves_the_model_as_it_was():
    """ensure_weight_tying with modules_to_save on a model whose embedding already carries LoRA (an earlier
    adapter): refused before anything changes; and LoRA on the head with the embedding in modules_to_save
    names the tying, not a modules_to_save conflict the user did not write."""
    model = tied()
    peft = get_peft_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"]), rngs=nnx.Rngs(1))
    before = jax.tree.map(np.asarray, nnx.state(model))
    held = r"in full, as one copy, but \['model.embed_tokens'\] carry LoRA of adapters \['default'\]"
    with pytest.raises(ValueError, match=held):
        peft.add_adapter("b", LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                         ensure_weight_tying=True), rngs=nnx.Rngs(2))
    assert list(peft.peft_config) == ["default"]
    assert list(model.model.layers[0].self_attn.q_proj.adapters) == ["default"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)
    with pytest.raises(ValueError, match=r"as one copy, but target_modules puts LoRA on \['lm_head'\] as well"):
        get_peft_model(tied(), LoraConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"],
                                          ensure_weight_tying=True), rngs=nnx.Rngs(0))


def test_ensure_weight_tying_checks():
    """As PEFT: a warning where there is nothing to tie; a tied layer in the adapter without
    ensure_weight_tying warns; with it, LoRA on either tied layer ties the head's adapter to the
    embedding's; one rank for both, the embedding not excluded."""
    config = dict(target_modules=["q_proj"], ensure_weight_tying=True)
    with pytest.warns(UserWarning, match="has no tied embeddings"):
        get_peft_model(tiny(), LoraConfig(**config, modules_to_save=["lm_head"]), rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="neither model.embed_tokens nor lm_head"):
        get_peft_model(tied(), LoraConfig(**config), rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="ensure_weight_tying is not set"):
        get_peft_model(tied(), LoraConfig(target_modules=["q_proj", "lm_head"]), rngs=nnx.Rngs(0))
    for names in (["q_proj", "embed_tokens"], ["q_proj", "lm_head"], r".*\.q_proj|lm_head"):
        model = tied()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tied as asked: nothing to warn about
            get_peft_model(model, LoraConfig(target_modules=names, ensure_weight_tying=True), rngs=nnx.Rngs(0))
        assert model.lm_head.adapters["default"].source is model.model.embed_tokens.adapters["default"]
    for bad, match in ((dict(rank_pattern={"lm_head": 2}), r"give them r=8, lora_alpha=8 and r=2, lora_alpha=8"),
                       (dict(alpha_pattern={"embed_tokens": 16}), r"r=8, lora_alpha=16 and r=8, lora_alpha=8"),
                       (dict(exclude_modules=["embed_tokens"]), "excludes it"),
                       (dict(use_dora=True), r"embedding \(ensure_weight_tying puts the tied lm_head's LoRA on it\)")):
        model = tied()
        with pytest.raises(ValueError, match=match):
            get_peft_model(model, LoraConfig(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True, **bad),
                           rngs=nnx.Rngs(0))
        assert isinstance(model.lm_head, TiedHead) and not nnx.state(model, nnx.LoRAParam)  # left as it was
    with pytest.raises(TypeError, match="ensure_weight_tying"):
        LoraConfig(ensure_weight_tying="yes")
    both = LoraConfig(**config, modules_to_save=["lm_head"])
    assert both.to_peft_dict()["ensure_weight_tying"] is True
    assert LoraConfig.from_peft_dict(both.to_peft_dict()) == both


def test_checkpoint_quantization_generation_and_sharding_stay_tied(tmp_path):
    model, x = tied(), tokens()
    save_pretrained(model, tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = from_pretrained(tmp_path / "m")
    assert isinstance(loaded.lm_head, TiedHead) and loaded.lm_head.embedding is loaded.model.embed_tokens.embedding
    assert diff(loaded(x), model(x)) == 0

    quantize_model(loaded, QuantConfig(compute_dtype=jnp.float32))
    assert isinstance(loaded.lm_head, TiedHead)  # not an nnx.Linear: never quantized, as transformers
    assert "lm_head" in hf_quantization_config(loaded)["llm_int8_skip_modules"]

    peft = get_peft_model(loaded, LoraConfig(**RANDOM, target_modules=["q_proj", "lm_head"]), rngs=nnx.Rngs(2))
    shard_model(peft, make_mesh(data=1))
    assert loaded.lm_head.base.embedding is loaded.model.embed_tokens.embedding
    out = generate(peft, x[:, :4], max_new_tokens=3)
    first = jnp.argmax(peft(x[:, :4])[:, -1], axis=-1)  # greedy: the cached decode's first token is the argmax
    np.testing.assert_array_equal(out[:, 4], first)


def tied_lora(target_modules=("q_proj", "lm_head"), seed=1, **kw):
    """A tied model with ensure_weight_tying LoRA (A and B random, as if trained) and the base's table."""
    model = tied()
    w = table(model)
    peft = get_peft_model(model, LoraConfig(**RANDOM, target_modules=list(target_modules), ensure_weight_tying=True,
                                            **kw), rngs=nnx.Rngs(seed))
    return peft, model, w


def test_ensure_weight_tying_lora_is_one_adapter_read_twice():
    """LoRA on a tied layer under ensure_weight_tying (PEFT's tied target_modules): the embedding gets the
    LoRA, the head a TiedAdapter over it. The lookup adds Δ = s·A B rows and the head multiplies by (W + Δ).T,
    one table read both ways; one pair of variables holds A and B (state, gradient), written through either
    layer; and neither ranks nor tensors can drift apart."""
    from jaxlora.adapter import TiedAdapter

    peft, model, w = tied_lora()
    x = tokens()
    embed, head = model.model.embed_tokens.adapters["default"], model.lm_head.adapters["default"]
    assert isinstance(head, TiedAdapter) and head.source is embed and isinstance(model.lm_head.base, TiedHead)
    delta = embed.delta_weight()  # (vocab, hidden)
    assert float(jnp.abs(delta).max()) > 1e-2
    a, b = head.weights()
    np.testing.assert_array_equal(a, embed.lora_b.get_value().T)
    np.testing.assert_array_equal(b, embed.lora_a.get_value().T)
    np.testing.assert_allclose(head.delta_weight(), delta.T, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.model.embed_tokens(x, adapters=None), (w + delta)[x], rtol=1e-6, atol=1e-6)
    h, _ = peft.hidden_states(x)
    np.testing.assert_allclose(peft.logits(h), h @ (w + delta).T, rtol=2e-5, atol=2e-5)
    adapters = nnx.to_flat_state(nnx.state(peft, nnx.LoRAParam))
    tied_vars = [path for path, _ in adapters if "embed_tokens" in path or "lm_head" in path]
    assert len(tied_vars) == 2 and all("source" in path for path in tied_vars)  # one pair, once
    grads = nnx.grad(lambda m: m(x).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(peft)
    assert len([p for p, _ in nnx.to_flat_state(grads) if "embed_tokens" in p or "lm_head" in p]) == 2
    head.set_weights(a * 2, b)  # through the head: the embedding's B
    np.testing.assert_array_equal(embed.lora_b.get_value(), 2 * a.T)
    trainable, _ = peft.get_nb_trainable_parameters()
    q_proj = 2 * 4 * (32 + 32)  # 2 layers, q_proj (32 -> 32), r=4
    assert trainable == q_proj + 4 * (64 + 32)  # the tied pair counted once


def test_ensure_weight_tying_lora_merges_once():
    """Merging writes Δ into the shared table once (the embedding's merge; the head's writes nothing), so the
    merged model is the adapted one -- PEFT adds it twice (W + 2Δ, README "Tied embeddings") -- and stays tied;
    unmerging restores W; a mixed batch, disabling and deleting the adapter behave as on any layer."""
    peft, model, w = tied_lora()
    x = tokens()
    adapted = peft(x)
    delta = model.model.embed_tokens.adapters["default"].delta_weight()
    with peft.disable_adapter():
        base = peft(x)
    assert diff(adapted, base) > 1e-2
    mixed = peft(x, adapter_names=["default", "__base__"])
    assert diff(mixed[0], adapted[0]) < 1e-5 and diff(mixed[1], base[1]) < 1e-5
    peft.merge_adapter()
    assert peft.merged_adapters == ["default"]
    np.testing.assert_allclose(table(model), w + delta, rtol=1e-6, atol=1e-6)
    assert diff(peft(x), adapted) < 1e-4
    peft.unmerge_adapter()
    np.testing.assert_allclose(table(model), w, rtol=1e-6, atol=1e-6)
    merged = peft.merge_and_unload()
    assert isinstance(merged.lm_head, TiedHead) and merged.lm_head.embedding is merged.model.embed_tokens.embedding
    assert type(merged.model.embed_tokens) is nnx.Embed and merged.config.tie_word_embeddings
    assert diff(merged(x), adapted) < 1e-4

    peft, model, _ = tied_lora()
    peft.delete_adapter("default")
    assert isinstance(model.lm_head, TiedHead) and type(model.model.embed_tokens) is nnx.Embed
    assert model.lm_head.embedding is model.model.embed_tokens.embedding and diff(peft(x), base) < 1e-5


def test_ensure_weight_tying_lora_trains_through_the_trainers_step_and_saves(tmp_path):
    """The donating step trains the one pair (both readers see the update); the adapter file round-trips; a
    file whose head copy is not the embedding's transposed is refused before the model changes; combining a
    tied adapter is refused before any layer changes."""
    from jaxlora.peft_model import load_adapter, save_adapter
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import donating_train_step
    from safetensors.numpy import save_file

    peft, model, _ = tied_lora(seed=2)
    embed = model.model.embed_tokens.adapters["default"]
    before = np.array(embed.lora_a.get_value())
    ids = np.asarray(tokens())
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}
    opt = nnx.Optimizer(peft, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)
    run = donating_train_step.bind(peft, opt)
    losses = [float(run(batch)["loss"]) for _ in range(3)]
    assert losses[2] < losses[0] and diff(embed.lora_a.get_value(), before) > 1e-4
    assert model.lm_head.adapters["default"].source is embed
    x = tokens(1)
    trained = peft(x)

    save_adapter(peft, tmp_path / "a")
    again = load_adapter(tied(), tmp_path / "a")
    assert again.base_model.model.lm_head.adapters["default"].source is \
        again.base_model.model.model.embed_tokens.adapters["default"]
    assert diff(again(x), trained) == 0

    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lm_head.lora_A.weight"] = tensors["base_model.model.lm_head.lora_A.weight"] + 1
    save_file(tensors, file)
    other = get_peft_model(tied(), LoraConfig(target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"lm_head.lora_A.weight is not .*embed_tokens.lora_embedding_B transposed"):
        load_adapter(other, tmp_path / "a", adapter_name="b")
    assert list(other.peft_config) == ["default"] and isinstance(other.base_model.model.lm_head, TiedHead)

    peft.add_adapter("b", LoraConfig(target_modules=["q_proj"]), rngs=nnx.Rngs(3))
    with pytest.raises(ValueError, match=r"adapters \['default'\] tie a head's LoRA"):
        peft.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    assert list(peft.peft_config) == ["default", "b"]
    assert not any("mix" in layer.adapters for layer in (model.lm_head, model.model.embed_tokens,
                                                        model.model.layers[0].self_attn.q_proj))
