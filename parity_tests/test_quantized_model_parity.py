"""Quantized llama / mistral / qwen2 against transformers + bitsandbytes (CPU): quantize-on-load bytes,
logits, and bitsandbytes 4-bit checkpoints in both directions.

Error measure: rel_err = max|ours - theirs| / max|theirs| over the logits (as test_model_parity.py).
The tiny configs' linear shapes (64, 128 columns) are multiples of the blocksize 64, so bitsandbytes'
AVX512 dequantize bug (spec bnb-4bit.md) cannot touch the reference; the fixture asserts it.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jaxlora.models.loading import from_pretrained, save_pretrained, state_dict
from jaxlora.models.quantize import QuantConfig
from torch_ref import bnb_ref, hf_ref
from torch_ref.compare import rel_err

FAMILIES = ("llama", "mistral", "qwen2")  # qwen2: q/k/v biases on quantized layers
SEQ = 16


def ids(batch=2, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(3, 256, (batch, seq))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def hf_bnb_entries(model) -> dict[str, np.ndarray]:
    """Every quantized layer's bitsandbytes state-dict entries (what transformers would save)."""
    return {k: v.numpy() for k, v in model.state_dict().items() if ".weight." in k or v.dtype == torch.uint8}


def assert_same_entries(ours: dict, theirs: dict):
    """Exact equality of codes, absmax, nested absmax, maps and the quant-state JSON bytes."""
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        a, b = np.asarray(ours[key]), np.asarray(theirs[key])
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.tobytes() == b.tobytes(), key


def ours_entries(model) -> dict[str, np.ndarray]:
    return {k: v for k, v in state_dict(model) if ".weight." in k or v.dtype == np.uint8}


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    """(family, dense checkpoint dir, transformers model quantized on load with fp32 compute)."""
    path = hf_ref.save_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    hf = hf_ref.load_quantized_model(path, hf_ref.bnb_4bit_config(compute_dtype=torch.float32))
    for name, m in hf.named_modules():
        if type(m).__name__ == "Linear4bit":
            assert not bnb_ref.avx512_dequant_is_buggy(tuple(m.weight.quant_state.shape), 64), name
    return request.param, path, hf


def test_quantize_on_load_bytes_identical(case):
    """Every quantized layer: the same packed codes, uint8 absmax, nested absmax, offset (in the JSON)
    and maps as bitsandbytes, and the same set of quantized layers (all linears but lm_head)."""
    _, path, hf = case
    ours = from_pretrained(path, quantization=QuantConfig(quant_type="nf4", double_quant=True))
    theirs = hf_bnb_entries(hf)
    assert len([k for k in theirs if k.endswith(".weight")]) == 7 * 2  # q k v o gate up down, 2 layers
    assert_same_entries(ours_entries(ours), theirs)


def test_logits_fp32_compute(case):
    """fp32 compute: identical bytes dequantize to identical fp32 weights on both sides (one rounding,
    same formula), so only fp32 summation order differs, as in the dense fp32 parity (~4e-7): bound
    1e-5. The quantized logits must differ from the dense model's (else the test proves nothing)."""
    _, path, hf = case
    ours = from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.float32))
    tokens = ids()
    theirs = hf_logits(hf, tokens)
    err = rel_err(ours(jnp.asarray(tokens)), theirs)
    print(f"fp32 compute rel_err {err:.2e}")
    assert err < 1e-5
    assert rel_err(from_pretrained(path)(jnp.asarray(tokens)), theirs) > 1e-3


def test_logits_bf16_compute(case):
    """bf16 compute (fp32 model, bnb_4bit_compute_dtype=bfloat16): the same bytes, the same casts of weight
    and input to bf16, fp32 accumulation and one rounding of each linear output to bf16 on both sides.
    Only the fp32 accumulation order differs, which can flip a rare output by one bf16 step (2^-8
    relative), so the bound is 1e-3 rather than fp32's 1e-5 (measured ~3e-7: no flip in these cases).
    It sits below the ~6e-3 that bf16 compute moves the logits from fp32 compute, asserted here so that
    a side silently computing in fp32 fails."""
    _, path, _ = case
    hf = hf_ref.load_quantized_model(path, hf_ref.bnb_4bit_config(compute_dtype=torch.bfloat16))
    ours = from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.bfloat16))
    assert_same_entries(ours_entries(ours), hf_bnb_entries(hf))
    tokens = ids()
    theirs = hf_logits(hf, tokens)
    err = rel_err(ours(jnp.asarray(tokens)), theirs)
    print(f"bf16 compute rel_err {err:.2e}")
    assert err < 1e-3
    assert rel_err(from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.float32))(jnp.asarray(tokens)),
                   theirs) > 2e-3


def test_transformers_bnb_checkpoint_into_jaxlora(case, tmp_path):
    """transformers' saved bnb 4-bit checkpoint loads as stored (bytes equal to the file's, nothing
    re-quantized) and gives transformers' logits (fp32 compute from its config: bound 1e-5 as above)."""
    _, _, hf = case
    hf.save_pretrained(tmp_path / "bnb")
    ours = from_pretrained(tmp_path / "bnb")
    stored = load_file(tmp_path / "bnb" / "model.safetensors")
    assert_same_entries(ours_entries(ours), {k: v for k, v in stored.items() if ".weight." in k or v.dtype == np.uint8})
    assert ours.model.layers[0].mlp.up_proj.compute_dtype == jnp.float32
    tokens = ids(seed=1)
    assert rel_err(ours(jnp.asarray(tokens)), hf_logits(hf, tokens)) < 1e-5


def test_jaxlora_bnb_checkpoint_into_transformers(case, tmp_path):
    """jaxlora's quantized save_pretrained loads in transformers (its config's quantization_config) with
    the same bytes, and gives the logits of transformers quantizing the dense checkpoint itself."""
    _, path, hf = case
    ours = from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.float32))
    save_pretrained(ours, tmp_path / "q")
    loaded = hf_ref.load_quantized_model(tmp_path / "q")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert_same_entries(ours_entries(ours), hf_bnb_entries(loaded))
    tokens = ids(seed=2)
    assert rel_err(hf_logits(loaded, tokens), hf_logits(hf, tokens)) == 0.0  # same bytes, same code path
    assert rel_err(ours(jnp.asarray(tokens)), hf_logits(loaded, tokens)) < 1e-5
