"""``bnb_4bit_quant_storage`` (the FSDP-QLoRA setup): bitsandbytes views the packed 4-bit bytes as
float16 / bfloat16 / float32 instead of uint8. Against bitsandbytes' quantize_4bit and Linear4bit state
dicts and against transformers' quantize-on-load and save_pretrained, the bytes must be identical for
every storage dtype, both directions; the numbers never depend on the storage.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import bitsandbytes.functional as F

from jaxlora.models.loading import from_pretrained, save_pretrained, state_dict
from jaxlora.models.quantize import QuantConfig
from jaxlora.quant import dequantize_4bit, from_bnb_state_dict, quantize_4bit, to_bnb_state_dict
from torch_ref import bnb_ref, hf_ref

STORAGES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _same(ours: np.ndarray, theirs: np.ndarray, what: str):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (what, ours.dtype, theirs.dtype,
                                                                        ours.shape, theirs.shape)
    assert ours.tobytes() == theirs.tobytes(), what


@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize("compress", [False, True])
def test_quantize_4bit_packs_as_bitsandbytes(storage, compress):
    # last dim a multiple of the blocksize: bnb's AVX512 dequantize is wrong otherwise (bnb_ref)
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    packed, qs = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=compress,
                                 quant_storage=STORAGES[storage])  # fmt: skip
    qt = quantize_4bit(jnp.asarray(w), compress_statistics=compress, quant_storage=storage)
    sd = to_bnb_state_dict(qt)
    _same(sd["weight"], bnb_ref.to_numpy(packed), "packed weight")
    # and back: bitsandbytes' own tensors (bf16 included) read as stored, dequantized as bitsandbytes does
    back = from_bnb_state_dict(sd | {"weight": packed})
    assert back.quant_storage == storage
    ref = F.dequantize_4bit(packed, qs).numpy()
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(back)), ref)


def test_storage_needs_whole_elements():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        quantize_4bit(jnp.ones((3, 2)), quant_storage="float32")  # 3 packed bytes


@pytest.fixture(scope="module", params=["bfloat16", "float16", "float32"])
def storage_case(request, tmp_path_factory):
    """(storage, dense tiny llama dir, transformers model quantized on load with that quant_storage)."""
    path = hf_ref.save_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=1)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                             bnb_4bit_quant_storage=STORAGES[request.param])  # fmt: skip
    return request.param, path, hf_ref.load_quantized_model(path, config)


def _bnb_entries(pairs) -> dict[str, np.ndarray]:
    return {k: v for k, v in pairs if ".weight." in k or k + ".absmax" in dict(pairs)}


def _hf_entries(model) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    return {k: bnb_ref.to_numpy(v) for k, v in sd.items() if ".weight." in k or k + ".absmax" in sd}


def test_quantize_on_load_and_checkpoints_both_ways(storage_case, tmp_path):
    storage, path, hf = storage_case
    ours = from_pretrained(path, quantization=QuantConfig(compute_dtype=jnp.float32, quant_storage=storage))
    theirs = _hf_entries(hf)
    mine = _bnb_entries(list(state_dict(ours)))
    assert sorted(mine) == sorted(theirs)
    assert theirs["model.layers.0.mlp.up_proj.weight"].dtype == np.dtype(jnp.dtype(storage))
    for key in theirs:
        _same(mine[key], theirs[key], key)

    # transformers' checkpoint -> jaxlora: as stored; jaxlora's checkpoint -> transformers: the same bytes
    hf.save_pretrained(tmp_path / "hf")
    loaded = from_pretrained(tmp_path / "hf")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    for key, value in _bnb_entries(list(state_dict(loaded))).items():
        _same(value, stored[key], key)
    save_pretrained(loaded, tmp_path / "ours")
    again = load_file(tmp_path / "ours" / "model.safetensors")
    for key in theirs:
        _same(again[key], stored[key], key)
    reloaded = hf_ref.load_quantized_model(tmp_path / "ours")
    assert reloaded.config.quantization_config.bnb_4bit_quant_storage == STORAGES[storage]
    tokens = np.random.default_rng(0).integers(3, 256, (2, 16))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_array_equal(reloaded(torch.tensor(tokens)).logits.numpy(), want)
    got = np.asarray(loaded(jnp.asarray(tokens)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # fp32 compute, as test_quantized_model_parity
