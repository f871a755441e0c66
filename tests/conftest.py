"""Fixtures shared by tests/ (the strict JAX modes are set for every test in the root conftest.py). The
models and configs behind them live in tests/_models.py, which tests import directly where they need a
plain value (a module-level config) rather than a fixture."""

import json

import pytest
from flax import nnx

from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.loading import save_pretrained
from jaxlora.tokenizer import ByteTokenizer
from tests._models import ToyLM, byte_llama_config


@pytest.fixture
def byte_dense():
    """A factory: `byte_dense(seed)` is a fresh ToyLM over the byte vocabulary."""
    return lambda seed=0: ToyLM(nnx.Rngs(seed), vocab=ByteTokenizer.vocab_size)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny byte-vocabulary llama checkpoint directory (the CLI tests' model)."""
    model = LlamaForCausalLM(byte_llama_config(), rngs=nnx.Rngs(0))
    return str(save_pretrained(model, tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """64 prompt/completion additions as JSONL."""
    path = tmp_path_factory.mktemp("d") / "sums.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
