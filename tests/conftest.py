"""Fixtures shared by tests/ (the strict JAX modes are set for every test in the root conftest.py)."""

import json

import pytest
from flax import nnx

from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.loading import save_pretrained
from jaxlora.tokenizer import ByteTokenizer


class ByteDense(nnx.Module):
    """Embed -> LoRA dense over the byte vocabulary: the smallest model whose loss curve depends on
    which batches it saw, and in what order."""

    def __init__(self, rngs):
        vocab = ByteTokenizer.vocab_size
        self.embed = nnx.Embed(vocab, 8, rngs=rngs)
        self.proj = nnx.LoRALinear(8, vocab, lora_rank=2, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        return self.proj(self.embed(ids))


@pytest.fixture
def byte_dense():
    """A factory: `byte_dense(seed)` is a fresh ByteDense."""
    return lambda seed=0: ByteDense(nnx.Rngs(seed))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny byte-vocabulary llama checkpoint directory (the CLI tests' model)."""
    cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return str(save_pretrained(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """64 prompt/completion additions as JSONL."""
    path = tmp_path_factory.mktemp("d") / "sums.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
