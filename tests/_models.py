"""Models, configs and batches that several test modules share. Tests import them from here (or take the
fixtures in conftest.py), never from another test module.

The tiny configs differ only where a test needs it, and say so with an override at the call site.
"""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.config import LlamaConfig, RopeScaling
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.quantize import QuantConfig, quantize_model
from jaxlora.tokenizer import ByteTokenizer

# loss.png is written only where matplotlib is installed (the "train" extra); plot_metrics returns None
# without it, so the tests assert the plot exactly when it can exist.
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# The tiny Llama: 2 layers, hidden 32, 4 query heads sharing 2 key/value heads (GQA, head_dim 8), vocab 64.
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
# The CLI tests' Llama: the byte tokenizer's vocabulary, and in_features (64, 128) that are whole NF4 blocks.
BYTE_LLAMA = TINY_LLAMA | dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                               max_position_embeddings=64)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """The tiny Llama's config; `overrides` are LlamaConfig fields."""
    return LlamaConfig(**(TINY_LLAMA | overrides))


def byte_llama_config(**overrides) -> LlamaConfig:
    """The byte-vocabulary Llama's config (what `base_dir` saves); `overrides` are LlamaConfig fields."""
    return LlamaConfig(**(BYTE_LLAMA | overrides))


# --- one config per family at vocab 128 (models/test_llama.py, models/test_packing.py) --------------------------------

FAMILY_VOCAB = 128
FAMILY_CONFIGS = {
    "llama": tiny_llama_config(vocab_size=FAMILY_VOCAB),
    "llama3_tied": tiny_llama_config(vocab_size=FAMILY_VOCAB, tie_word_embeddings=True, rope_theta=500000.0,
                                     rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0,
                                                              original_max_position_embeddings=16)),
    "mistral_window": tiny_llama_config(vocab_size=FAMILY_VOCAB, model_type="mistral", sliding_window=3),
    "qwen2": tiny_llama_config(vocab_size=FAMILY_VOCAB, model_type="qwen2"),
}


def make_model(config: LlamaConfig, seed: int = 0, **kw) -> LlamaForCausalLM:
    # initializer_range 0.3: O(1) activations, so that wrong indexing shows in the logits.
    return LlamaForCausalLM(dataclasses.replace(config, initializer_range=0.3), rngs=nnx.Rngs(seed), **kw)


def family_tokens(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """Random ids in [3, FAMILY_VOCAB): never pad (0), bos (1) or eos (2)."""
    return jax.random.randint(jax.random.key(seed), shape, 3, FAMILY_VOCAB, dtype=jnp.int32)


# --- the smallest trainable model: embed -> LoRA dense ----------------------------------------------------


class ToyLM(nnx.Module):
    """Embedding → flax LoRA-adapted dense → logits: enough to exercise the train step and the loop without
    the model, and a loss curve that depends on which batches it saw, and in what order."""

    def __init__(self, rngs, vocab: int = 17, d: int = 8):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.proj = nnx.LoRALinear(d, vocab, lora_rank=2, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        return self.proj(self.embed(ids))


def toy_batch(seed: int, b: int = 4, s: int = 6, vocab: int = 17) -> dict:
    """A (b, s) batch of random ids with a random ~70% loss mask and no padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, s)).astype(np.int32)
    mask = rng.random((b, s)) < 0.7
    return {"input_ids": ids, "attention_mask": np.ones((b, s), np.int32), "loss_mask": mask}


# --- the adapter tests' tiny Llama (test_peft_model, test_peft_io, test_targets, test_lora_config) --------

TINY = tiny_llama_config()  # the adapter tests' model
ALL_14 = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head excluded
# init_lora_weights=False: B is random, so every adapter changes the output (PEFT's default B = 0 would not).
RANDOM = dict(r=4, lora_alpha=8, init_lora_weights=False)


def tiny(seed=0, **overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(seed))


def tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 8), 0, 64)


def diff(a, b) -> float:
    return float(jnp.abs(a - b).max())


def quantize_linears(model):
    """Every linear but lm_head -> QuantizedLinear (NF4 + double quantization), as transformers does."""
    return quantize_model(model, QuantConfig(compute_dtype=jnp.float32))
