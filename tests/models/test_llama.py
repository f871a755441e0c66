"""The llama family, its checkpoint I/O and generation, in JAX alone (parity with transformers is in
parity_tests/test_model_parity.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora.generate import generate
from jaxlora.models.config import LlamaConfig
from jaxlora.models.loading import from_pretrained, save_pretrained
from jaxlora.models.tied import TiedHead
from tests._models import FAMILY_CONFIGS, FAMILY_VOCAB, TINY_LLAMA, family_tokens, make_model


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_shapes_and_tree_names(name):
    model = make_model(FAMILY_CONFIGS[name])
    assert model(family_tokens((2, 5))).shape == (2, 5, 128)
    assert model.model.layers[1].self_attn.q_proj.kernel.shape == (32, 32)  # (in, out)
    assert model.model.layers[1].self_attn.k_proj.kernel.shape == (32, 16)  # 2 kv heads of 8
    assert isinstance(model.lm_head, TiedHead) == FAMILY_CONFIGS[name].tie_word_embeddings  # else an nnx.Linear
    if FAMILY_CONFIGS[name].tie_word_embeddings:  # the embedding's own variable, not a copy
        assert model.lm_head.embedding is model.model.embed_tokens.embedding
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (name == "qwen2")
    assert model.model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_kv_cache_decoding_equals_full_forward(name):
    """Prefill 5 left-padded tokens, decode 4 one at a time: the same logits as one padded forward."""
    model = make_model(FAMILY_CONFIGS[name])
    ids = family_tokens((2, 9))
    mask = jnp.ones((2, 9), jnp.int32).at[0, :2].set(0)  # row 0 has two pads on the left
    full = model(ids, mask)
    logits, cache = model(ids[:, :5], mask[:, :5], cache=model.init_cache(2, 12))
    steps = [logits]
    for t in range(5, 9):
        logits, cache = model(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
        steps.append(logits)
    real = np.asarray(mask, bool)
    assert rel_err(jnp.concatenate(steps, axis=1)[real], full[real]) < 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # not a window: transformers counts pads in it
def test_left_padding_does_not_change_logits(name):
    model = make_model(FAMILY_CONFIGS[name])
    ids = family_tokens((1, 6))
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
    assert rel_err(model(padded, mask)[:, 3:], model(ids)) < 1e-5


def test_sliding_window_limits_attention():
    """With window 3 the first token cannot influence position 3 onward; without a window it does."""
    ids = family_tokens((1, 6))
    changed = ids.at[0, 0].set(ids[0, 0] + 1)
    windowed = make_model(FAMILY_CONFIGS["mistral_window"])
    delta = np.abs(np.asarray(windowed(ids) - windowed(changed))).max(axis=-1)[0]
    # 2 layers of window 3 reach back 4 positions; position 5 is out of reach of position 0.
    assert delta[0] > 0 and delta[5] == 0
    full = make_model(FAMILY_CONFIGS["llama"])
    assert np.abs(np.asarray(full(ids) - full(changed)))[0, 5].max() > 0


def test_remat_gives_same_output_and_grads():
    ids = family_tokens((2, 6))
    plain, remat = make_model(FAMILY_CONFIGS["qwen2"]), make_model(FAMILY_CONFIGS["qwen2"], remat=True)

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    assert np.array_equal(plain(ids), remat(ids))
    g1, g2 = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel_err(a, b) < 1e-5  # the backward recomputes each layer (remat_scan): fp32 reassociation
    # A remat model still generates (decoding with a cache skips remat).
    np.testing.assert_array_equal(generate(remat, ids, max_new_tokens=3), generate(plain, ids, max_new_tokens=3))


@pytest.mark.parametrize("layers", [4, 11])  # groups of 2: 2, no tail; groups of 3: 3, and a tail of 2
def test_nested_remat_gives_same_output_and_grads(layers):
    """remat "nested" keeps every k-th layer boundary (k = round(sqrt(layers))) and re-runs each group's
    first layers in its backward: the logits and every gradient of the "full" policy's, to fp32
    reassociation, also when the layer count is not a multiple of k."""
    config = dataclasses.replace(FAMILY_CONFIGS["qwen2"], num_hidden_layers=layers)
    ids = family_tokens((2, 6))
    full, nested = make_model(config, remat="full"), make_model(config, remat="nested")

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    assert np.array_equal(full(ids), nested(ids))
    g1, g2 = nnx.grad(loss)(full), nnx.grad(loss)(nested)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert rel_err(a, b) < 1e-5


def test_dtype_policy():
    """float32 storage with bfloat16 compute: bfloat16 logits, float32 params, within bf16 rounding."""
    ids = family_tokens((2, 6))
    fp32 = make_model(FAMILY_CONFIGS["llama"])
    mixed = make_model(FAMILY_CONFIGS["llama"], dtype=jnp.bfloat16)
    assert mixed.model.layers[0].mlp.up_proj.kernel.dtype == jnp.float32
    assert mixed(ids).dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa (2^-8 ~ 0.4%); through 2 layers the logits drift a few of those.
    assert rel_err(mixed(ids), fp32(ids)) < 5e-2


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_save_load_round_trip(tmp_path, name):
    model = make_model(FAMILY_CONFIGS[name])
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids = family_tokens((2, 5))
    assert np.array_equal(loaded(ids), model(ids))
    keys = set(load_file(tmp_path / "ckpt" / "model.safetensors"))
    assert ("lm_head.weight" in keys) != FAMILY_CONFIGS[name].tie_word_embeddings
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    # Saving again into the existing directory replaces the files (no stale index is left to shadow them).
    save_pretrained(model, tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert from_pretrained(tmp_path / "ckpt").model.norm.weight.dtype == jnp.float32
    assert load_file(tmp_path / "ckpt" / "model.safetensors")["model.norm.weight"].dtype.name == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_sharded_checkpoint(tmp_path):
    model = make_model(FAMILY_CONFIGS["llama"])
    save_pretrained(model, tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, shard / file)
    weight_map = {k: f for f, keys in parts.items() for k in keys}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = family_tokens((1, 4))
    assert np.array_equal(from_pretrained(shard)(ids), model(ids))


@pytest.fixture
def saved(tmp_path):
    save_pretrained(make_model(FAMILY_CONFIGS["llama"]), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_error_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        from_pretrained(tmp_path / "absent")


def test_error_unsupported_model_type(saved):
    config = json.loads((saved / "config.json").read_text()) | {"model_type": "gpt2"}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama, mistral, qwen2"):
        from_pretrained(saved)


def test_error_unsupported_rope(saved):
    config = json.loads((saved / "config.json").read_text()) | {"rope_scaling": {"type": "yarn", "factor": 4.0}}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope"):
        from_pretrained(saved)


def test_error_missing_tensor(saved):
    rewrite(saved, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.down_proj.weight"):
        from_pretrained(saved)


def test_error_extra_tensor(saved):
    rewrite(saved, lambda t: t.update({"model.layers.2.mlp.down_proj.weight": np.ones((2, 2), np.float32)}))
    with pytest.raises(ValueError, match="unexpected.*model.layers.2.mlp.down_proj.weight"):
        from_pretrained(saved)


def test_error_misshaped_tensor(saved):
    rewrite(saved, lambda t: t.update({"model.norm.weight": np.ones((31,), np.float32)}))
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(31,\).*\(32,\)"):
        from_pretrained(saved)


def test_error_integer_dtype(saved):
    rewrite(saved, lambda t: t.update({"model.norm.weight": np.ones((32,), np.int32)}))
    with pytest.raises(ValueError, match="model.norm.weight.*I32"):
        from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_error_corrupt_file(saved, damage):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt or truncated"):
        from_pretrained(saved)


def test_config_reads_both_rope_formats():
    base = {"model_type": "llama", **TINY_LLAMA, "vocab_size": FAMILY_VOCAB}
    v4 = LlamaConfig.from_hf_dict(base | {"rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    v5 = LlamaConfig.from_hf_dict(base | {"rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling.rope_type == "llama3"
    assert LlamaConfig.from_hf_dict(base | {"rope_scaling": None}).rope_scaling is None
    assert LlamaConfig.from_hf_dict(v4.to_hf_dict()) == v4
