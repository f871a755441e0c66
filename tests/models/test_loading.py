"""QuantConfig, quantize_model, quantize-on-load and bitsandbytes 4-bit checkpoints, in JAX alone
(byte and logit parity with transformers + bitsandbytes: parity_tests/test_quantized_model_parity.py).

Also a script: ``python tests/models/test_loading.py probe <dir> dense|quant`` loads a checkpoint in
a fresh process and prints its RSS figures (used by `test_peak_memory_of_quantize_on_load`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.loading import from_pretrained, save_pretrained, state_dict
from jaxlora.models.quantize import QuantConfig, quantize_model
from jaxlora.models.stack import unstacked
from jaxlora.qlinear import QuantizedLinear
from jaxlora.quant import quantize
from tests._models import tiny_llama_config

# in_features 64 and 128: whole NF4 blocks. initializer_range 0.3: O(1) activations, so wrong weights show in logits.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, initializer_range=0.3)  # tiny_llama_config overrides
FP32 = QuantConfig(compute_dtype=jnp.float32)


def checkpoint(tmp_path, name="llama", **kw) -> Path:
    config = tiny_llama_config(**TINY, model_type="qwen2" if name == "qwen2" else "llama", **kw)
    return save_pretrained(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), tmp_path / name)


def tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 7), 3, TINY["vocab_size"], dtype=jnp.int32)


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def assert_same_state(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(nnx.state(a)) == jax.tree.structure(nnx.state(b))
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def linears(model, kind):
    with unstacked(model):  # per-layer module names, as in the checkpoint
        return {".".join(map(str, p)) for p, m in nnx.iter_graph(model) if type(m) is kind}


# --- QuantConfig ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("quant_type", "int4"), ("blocksize", 48), ("blocksize", True), ("compute_dtype", jnp.int8),
    ("compute_dtype", "float64"), ("skip_modules", "lm_head"), ("bnb_backend", "mps"), ("double_quant", "yes"),
])  # fmt: skip
def test_quant_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=f"QuantConfig.{field} .*{value!r}"):
        QuantConfig(**{field: value})


def test_quant_config_dynamic8_needs_no_double_quant():
    with pytest.raises(ValueError, match="double_quant=True is 4-bit only"):
        QuantConfig(quant_type="dynamic8")
    assert QuantConfig(quant_type="dynamic8", double_quant=False).to_hf_dict is not None


def test_quant_config_normalizes_and_round_trips():
    c = QuantConfig(quant_type="fp4", double_quant=False, compute_dtype="float16", skip_modules=["lm_head", "v_proj"])
    assert c.compute_dtype == np.dtype(np.float16) and c.skip_modules == ("lm_head", "v_proj")
    assert QuantConfig.from_hf_dict(c.to_hf_dict()) == c
    assert QuantConfig.from_hf_dict(QuantConfig().to_hf_dict()) == QuantConfig()
    # BitsAndBytesConfig(load_in_4bit=True).to_dict(): skip None -> lm_head; compute None -> float32; fp4
    d = {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": None,
         "bnb_4bit_compute_dtype": None}  # fmt: skip
    assert QuantConfig.from_hf_dict(d) == QuantConfig(quant_type="fp4", double_quant=False, compute_dtype="float32")
    with pytest.raises(ValueError, match="dynamic8.*has no transformers"):
        QuantConfig(quant_type="dynamic8", double_quant=False).to_hf_dict()


def test_skip_modules_match_as_transformers():
    c = QuantConfig(skip_modules=("lm_head", "model.layers.0", r"model\.layers\.\d+\.mlp\.up", "v_proj"))
    assert not c.targets("lm_head") and not c.targets("model.layers.0.mlp.down_proj")
    assert c.targets("model.layers.10.mlp.down_proj")  # "layers.0" ends at a module boundary
    assert not c.targets("model.layers.1.self_attn.v_proj")  # suffix
    assert c.targets("model.layers.1.mlp.up_proj")  # the regex stops at a boundary: "up" is not "up_proj"


# --- quantize_model ---------------------------------------------------------------------------------


def test_quantize_model_replaces_targeted_linears_in_place():
    model = LlamaForCausalLM(tiny_llama_config(**TINY, model_type="qwen2"), rngs=nnx.Rngs(0))
    q_proj = model.model.layers[1].self_attn.q_proj
    kernel, bias, embedding = q_proj.kernel.get_value(), q_proj.bias.get_value(), model.model.embed_tokens.embedding
    out = quantize_model(model, QuantConfig(skip_modules=("lm_head", "model.layers.0.mlp")))
    assert out is model
    mlp0 = {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert linears(model, nnx.Linear) == {"lm_head"} | mlp0
    assert len(linears(model, QuantizedLinear)) == 4 * 2 + 3
    layer = model.model.layers[1].self_attn.q_proj
    expected = quantize(kernel.T, QuantConfig(blocksize=64, quant_type="nf4", double_quant=True))
    for a, b in zip(jax.tree.leaves(layer.weight.get_value()), jax.tree.leaves(expected)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert np.array_equal(layer.bias.get_value(), bias) and layer.compute_dtype == jnp.bfloat16
    assert model.model.embed_tokens.embedding is embedding  # embeddings and norms are never quantized
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_model(model, "nf4")


def test_dynamic8_model_runs_and_cannot_be_saved(tmp_path):
    """8-bit blockwise weights: relative RMS error under 2% (measured 0.95%; NF4's is ~9%); the model runs
    on them (logits finite, not the dense ones); saving refuses, as transformers has no such format."""
    model = LlamaForCausalLM(tiny_llama_config(**TINY), rngs=nnx.Rngs(0))
    dense, w = model(tokens()), model.model.layers[0].mlp.up_proj.kernel.get_value().T
    quantize_model(model, QuantConfig(quant_type="dynamic8", double_quant=False, compute_dtype=jnp.float32))
    wq = model.model.layers[0].mlp.up_proj.dequantize(jnp.float32)
    assert model.model.layers[0].mlp.up_proj.weight.get_value().quant_type == "dynamic8"
    assert float(jnp.sqrt(jnp.mean((w - wq) ** 2) / jnp.mean(w**2))) < 2e-2
    logits = model(tokens())
    assert bool(jnp.isfinite(logits).all()) and not np.array_equal(logits, dense)
    with pytest.raises(ValueError, match="dynamic8"):
        save_pretrained(model, tmp_path / "d8")
    assert not (tmp_path / "d8").exists()  # refused before anything was written


# --- quantize-on-load -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [("llama", {}), ("qwen2", {}), ("llama", dict(tie_word_embeddings=True))])
def test_quantize_on_load_equals_quantize_model(tmp_path, name, kw):
    """Tensor by tensor while loading == loading dense, then quantize_model: same bytes, same logits."""
    path = checkpoint(tmp_path, name, **kw)
    ours = from_pretrained(path, quantization=FP32)
    assert_same_state(ours, quantize_model(from_pretrained(path), FP32))
    assert len(linears(ours, QuantizedLinear)) == 14 and linears(ours, nnx.Linear) <= {"lm_head"}
    assert np.array_equal(ours(tokens()), quantize_model(from_pretrained(path), FP32)(tokens()))


def test_quantize_on_load_casts_to_dtype_round_to_nearest_even(tmp_path):
    """dtype=bfloat16: the fp32 checkpoint tensor is rounded to bf16 (RNE, as torch's .to) and then
    quantized; the QuantizedTensor records bfloat16 and dequantizes to it."""
    path = checkpoint(tmp_path)
    ours = from_pretrained(path, dtype=jnp.bfloat16, quantization=FP32)
    w = load_file(path / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    expected = quantize(jnp.asarray(w.astype(ml_dtypes.bfloat16)), QuantConfig())
    got = ours.model.layers[1].mlp.down_proj.weight.get_value()
    assert got.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _probe(directory: str, mode: str) -> None:
    """Load in this (fresh) process; print the RSS before loading and its peak during loading."""

    def status(field):  # bytes
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    before = status("VmRSS")
    model = from_pretrained(directory, quantization=FP32 if mode == "quant" else None)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    print(json.dumps(dict(before=before, peak=status("VmHWM"))))


def _big_checkpoint(directory: Path, layers: int, hidden=1024, inter=2048, vocab=256) -> int:
    """A llama checkpoint of random fp32 weights written with numpy alone; returns its linear bytes."""
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), np.float32),
         "lm_head.weight": rng.standard_normal((vocab, hidden), np.float32),
         "model.norm.weight": np.ones(hidden, np.float32)}  # fmt: skip
    shapes = dict(q_proj=(hidden, hidden), k_proj=(hidden, hidden), v_proj=(hidden, hidden), o_proj=(hidden, hidden),
                  gate_proj=(inter, hidden), up_proj=(inter, hidden), down_proj=(hidden, inter))
    for i in range(layers):
        for name, shape in shapes.items():
            module = "self_attn" if name[0] in "qkvo" else "mlp"
            t[f"model.layers.{i}.{module}.{name}.weight"] = rng.standard_normal(shape, np.float32)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = np.ones(hidden, np.float32)
    directory.mkdir()
    save_file(t, directory / "model.safetensors", metadata={"format": "pt"})
    config = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    (directory / "config.json").write_text(json.dumps(config))
    return sum(a.nbytes for k, a in t.items() if k.startswith("model.layers.") and a.ndim == 2)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_of_quantize_on_load(tmp_path):
    """Peak RSS while loading, in fresh processes, for 1 and 5 decoder layers of the same shapes (40 MiB
    of fp32 linear weights per layer). The difference between the two removes what does not scale with
    the model (~100 MiB: XLA compiling the quantizer once per shape, lazily mapped library code), leaving
    the peak bytes per byte of dense linear weight: >= 1 whenever the dense weights are all resident
    (the dense load measures it), ~0.14 for what quantize-on-load keeps (4 bits + scales per fp32).

    glibc's malloc is told to map large blocks (MALLOC_MMAP_THRESHOLD_), so that a freed per-tensor
    buffer leaves RSS rather than staying in a fragmented heap: with glibc's adaptive threshold the
    quantized slope varies from run to run (0.2-0.35 measured), with it pinned 0.13-0.16."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), JAX_PLATFORMS="cpu",
               MALLOC_MMAP_THRESHOLD_="131072")
    peaks, dense = {}, {}
    for layers in (1, 5):
        dense[layers] = _big_checkpoint(tmp_path / f"l{layers}", layers)
        for mode in ("dense", "quant"):
            out = subprocess.run([sys.executable, __file__, "probe", str(tmp_path / f"l{layers}"), mode],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[mode, layers] = r["peak"] - r["before"]
    added = dense[5] - dense[1]
    slope = {mode: round((peaks[mode, 5] - peaks[mode, 1]) / added, 3) for mode in ("dense", "quant")}
    mib = {f"{m}{n}": round(v / 2**20, 1) for (m, n), v in peaks.items()}
    print(f"\nfp32 linear weights: {dense[1] / 2**20:.0f} / {dense[5] / 2**20:.0f} MiB; peak RSS over the "
          f"pre-load RSS (MiB): {mib}; peak bytes per added dense byte: {slope}")
    assert slope["dense"] > 0.9  # the measurement sees a dense model
    assert slope["quant"] < 0.4  # >= 1 if the dense linear weights were all resident at once
    assert peaks["quant", 5] < 0.75 * peaks["dense", 5]


# --- bitsandbytes 4-bit checkpoints -----------------------------------------------------------------


def test_quantized_save_writes_bnb_format_and_loads_as_stored(tmp_path):
    path = checkpoint(tmp_path, "qwen2")
    ours = from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.float32))
    saved = save_pretrained(ours, tmp_path / "q")
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"] == FP32.to_hf_dict() and config["torch_dtype"] == "float32"
    stored = load_file(saved / "model.safetensors")
    p = "model.layers.0.self_attn.q_proj."
    assert {k for k in stored if k.startswith(p)} == {p + "bias", p + "weight"} | {p + "weight." + s for s in (
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")}
    assert stored[p + "weight"].dtype == np.uint8 and stored[p + "weight"].shape == (64 * 64 // 2, 1)
    assert stored["lm_head.weight"].dtype == np.float32  # skipped: dense
    loaded = from_pretrained(saved)
    assert_same_state(loaded, ours)
    assert np.array_equal(loaded(tokens()), ours(tokens()))
    # A runtime setting may be changed on load; the stored format may not.
    assert from_pretrained(saved, quantization=QuantConfig()).model.layers[0].mlp.up_proj.compute_dtype == jnp.bfloat16
    runtime = QuantConfig(compute_dtype=jnp.float16, bnb_backend="cuda", use_kernel=True)
    layer = from_pretrained(saved, quantization=runtime).model.layers[0].mlp.up_proj  # the file's format, ...
    assert (layer.config.quant_type, layer.config.double_quant) == ("nf4", True)  # ... the asked runtime
    assert (layer.compute_dtype, layer.use_kernel, layer.config.bnb_backend) == (np.dtype(np.float16), True, "cuda")
    with pytest.raises(ValueError, match="already quantized.*'nf4'.*'fp4'"):
        from_pretrained(saved, quantization=QuantConfig(quant_type="fp4"))


@pytest.fixture
def saved_bnb(tmp_path):
    return save_pretrained(from_pretrained(checkpoint(tmp_path), quantization=FP32), tmp_path / "bnb")


def _rewrite(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _set_state(tensors, key, **changes):
    meta = json.loads(bytes(tensors[key]).decode()) | changes
    tensors[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()


STATE_KEY = "model.layers.1.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4"


def test_error_quant_state_shape_disagrees_with_model(saved_bnb):
    _rewrite(saved_bnb, lambda t: _set_state(t, STATE_KEY, shape=[32, 128]))  # same numel, wrong shape
    with pytest.raises(ValueError, match=STATE_KEY.replace(".", r"\.") + ".*\\[32, 128\\].*\\[64, 64\\]"):
        from_pretrained(saved_bnb)


def test_error_quant_state_shape_disagrees_with_codes(saved_bnb):
    _rewrite(saved_bnb, lambda t: _set_state(t, STATE_KEY, shape=[64, 128]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight must be uint8\[4096, 1\]"):
        from_pretrained(saved_bnb)


def test_error_missing_bnb_entry(saved_bnb):
    _rewrite(saved_bnb, lambda t: t.pop("model.layers.0.mlp.up_proj.weight.absmax"))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.0\.mlp\.up_proj\.weight\.absmax'\]"):
        from_pretrained(saved_bnb)


def test_error_dense_weight_where_config_says_quantized(saved_bnb):
    _rewrite(saved_bnb, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ones((128, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*F32\[128, 64\].*bitsandbytes"):
        from_pretrained(saved_bnb)


@pytest.mark.parametrize("changes, match", [
    (dict(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True), "load_in_8bit=True .*LLM.int8.* not supported"),
    (dict(quant_method="gptq"), "quant_method 'gptq' is not supported.*'bitsandbytes'"),
    (dict(bnb_4bit_quant_storage="int8"), "bnb_4bit_quant_storage 'int8' is not supported.*'uint8', 'float16'"),
    (dict(bnb_4bit_compute_dtype="int8"), "quantization_config: QuantConfig.compute_dtype .*'int8'"),
])  # fmt: skip
def test_error_unreadable_quantization_config(saved_bnb, changes, match):
    file = saved_bnb / "config.json"
    config = json.loads(file.read_text())
    config["quantization_config"] |= changes
    file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        from_pretrained(saved_bnb)


def test_error_quantization_must_be_a_quant_config(saved_bnb):
    with pytest.raises(TypeError, match="QuantConfig.*'nf4'"):
        from_pretrained(saved_bnb, quantization="nf4")


def test_state_dict_leaves_dense_dtype_to_dense_tensors(saved_bnb):
    sd = dict(state_dict(from_pretrained(saved_bnb), dtype=jnp.bfloat16))
    assert sd["model.norm.weight"].dtype == jnp.bfloat16 and sd["model.layers.0.mlp.up_proj.weight"].dtype == np.uint8


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    _probe(sys.argv[2], sys.argv[3])
