"""Fixtures shared by tests/ (the strict JAX modes are set for every test in the root conftest.py)."""

import pytest
from flax import nnx

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
