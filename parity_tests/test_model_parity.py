"""The llama family against transformers: logits, padded batches, greedy generation, checkpoint I/O.

Error measure throughout: rel_err = max|ours - theirs| / max|theirs| over the compared logits, the
max-abs error relative to the logits' scale (a per-element relative error blows up near zero).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlora.generate import generate
from jaxlora.models.loading import from_pretrained, save_pretrained
from torch_ref import hf_ref
from torch_ref.compare import rel_err

CASES = {
    "llama": ("llama", {}),
    "llama3_tied": ("llama", dict(rope_scaling=hf_ref.LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)),
    "mistral": ("mistral", {}),
    "mistral_window": ("mistral", dict(sliding_window=5)),  # shorter than the sequences below
    "qwen2": ("qwen2", {}),  # q/k/v biases
}
SEQ = 16  # > original_max_position_embeddings / high_freq_factor, so llama3's scaled bands matter


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = hf_ref.save_tiny_model(family, tmp_path_factory.mktemp(request.param), seed=1, **overrides)
    return request.param, path, hf_ref.load_model(path)


def prompts(batch=2, seq=SEQ, pads=(0, 5), seed=0):
    """Token ids and a left-padding mask; row i starts with pads[i] pad tokens."""
    ids = np.random.default_rng(seed).integers(3, 256, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def hf_logits(model, ids, mask=None):
    kw = {}
    if mask is not None:  # the positions transformers' generate uses: count real tokens only
        kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0)))
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def test_fp32_logits(case):
    """fp32: only summation order differs, so the error is float32 rounding (measured ~4e-7)."""
    _, path, hf = case
    ids, _ = prompts(pads=(0, 0))
    assert rel_err(from_pretrained(path)(jnp.asarray(ids)), hf_logits(hf, ids)) < 1e-4


def test_left_padded_batch(case):
    """A left-padded batch with attention_mask matches transformers on every real token."""
    name, path, hf = case
    ids, mask = prompts(pads=(0, 5))
    ours = from_pretrained(path)(jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    assert rel_err(np.asarray(ours)[real], hf_logits(hf, ids, mask)[real]) < 1e-4


def test_bf16_logits(case):
    """bf16 weights and compute on both sides. Each side rounds every matmul and norm output to bf16
    (8-bit mantissa, relative step 2^-8 = 0.4%) in a different order, so the two drift apart by a few
    of those steps through 2 layers: bound 3e-2. To show that the drift is rounding and not a bug, our
    bf16 error against the fp32 reference must also be no worse than 2x transformers' own."""
    _, path, hf = case
    ids, _ = prompts(pads=(0, 0))
    exact = hf_logits(hf, ids)
    ours = from_pretrained(path, dtype=jnp.bfloat16)(jnp.asarray(ids))
    theirs = hf_logits(hf_ref.load_model(path, dtype=torch.bfloat16), ids)
    assert rel_err(ours, theirs) < 3e-2
    assert rel_err(ours, exact) < 2 * rel_err(theirs, exact) + 1e-3


def test_greedy_generation(case):
    """Greedy decoding with the KV cache gives transformers' generate(do_sample=False) tokens."""
    _, path, hf = case
    ids, mask = prompts(seq=6, pads=(0, 2))
    ours = generate(from_pretrained(path), jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=12)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_save_pretrained_loads_in_transformers(case, tmp_path):
    """Our checkpoint (config.json + safetensors) loads in transformers and gives the same logits."""
    _, path, hf = case
    save_pretrained(from_pretrained(path), tmp_path / "out")
    reloaded = hf_ref.load_model(tmp_path / "out")
    assert type(reloaded) is type(hf)
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids, _ = prompts(pads=(0, 0))
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) < 1e-6  # same fp32 weights, same code


def test_sharded_bf16_checkpoint_from_transformers(tmp_path):
    """transformers' sharded bf16 checkpoint loads exactly: bf16 -> fp32 is lossless."""
    hf = hf_ref.make_tiny_model("qwen2", seed=2, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = from_pretrained(tmp_path)
    expected = hf.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(ours.model.layers[1].self_attn.k_proj.kernel), expected)
    ids, _ = prompts(pads=(0, 0))
    # Reloaded in fp32 rather than hf.float(): casting a model to bf16 also rounds its RoPE frequencies.
    assert rel_err(ours(jnp.asarray(ids)), hf_logits(hf_ref.load_model(tmp_path), ids)) < 1e-4
