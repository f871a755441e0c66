"""What the demo and the seed experiments share: the tiny offline base model, fine-tuning, memory maths."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jaxlora
from jaxlora.models.stack import unstacked
from examples import tasks
from jaxlora.evaluate import completion_accuracy
from jaxlora.models.config import LlamaConfig
from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.data import DataConfig, load_data
from jaxlora.train.loop import TrainConfig, train
from jaxlora.train.optim import OptimizerConfig

TOK = ByteTokenizer()


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseRecipe:
    """The tiny byte-level Llama the demo pretrains offline (in_features are multiples of 64: NF4 blocks)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    corpus_lines: int = 20000
    steps: int = 500
    batch_size: int = 32
    seq_len: int = 64
    learning_rate: float = 3e-3
    seed: int = 0

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=TOK.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=128,
            bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
        )


def compute_dtype():
    """bf16 on accelerators (QLoRA's recipe); fp32 on CPU, where XLA's bf16 matmuls are not faster."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32


def pretrain_base(out: Path, recipe: BaseRecipe = BaseRecipe(), *, fresh: bool = False) -> Path:
    """Pretrain the tiny base on the generated corpus and save it as a Hugging Face checkpoint.

    A base saved earlier with the same recipe is reused (pass fresh=True to retrain it)."""
    base = out / "base"
    stamp = base / "recipe.json"
    if not fresh and stamp.is_file() and json.loads(stamp.read_text()) == dataclasses.asdict(recipe):
        print(f"reusing the pretrained base in {base}", file=sys.stderr)
        return base
    shutil.rmtree(out / "pretrain", ignore_errors=True)  # a new base: start its training run afresh
    corpus = tasks.write_jsonl(tasks.pretraining_corpus(recipe.corpus_lines, seed=recipe.seed), out / "corpus.jsonl")
    model = jaxlora.LlamaForCausalLM(recipe.config(), rngs=nnx.Rngs(recipe.seed))
    dcfg = DataConfig(path=str(corpus), max_seq_len=recipe.seq_len, batch_size=recipe.batch_size, packing=True,
                      seed=recipe.seed)
    print(f"pretraining the base: {recipe.steps} steps on {recipe.corpus_lines} generated lines", file=sys.stderr)
    train(
        model, load_data(dcfg, TOK), data_cfg=dcfg, wrt=nnx.Param, pad_token_id=TOK.pad_token_id,
        optim_cfg=OptimizerConfig(learning_rate=recipe.learning_rate, max_steps=recipe.steps,
                                  warmup_steps=min(30, recipe.steps // 10)),
        train_cfg=TrainConfig(output_dir=str(out / "pretrain"), save_total_limit=1),
    )
    jaxlora.save_pretrained(model, base)
    TOK.save(str(base))
    stamp.write_text(json.dumps(dataclasses.asdict(recipe)))
    return base


def finetune(model, train_rows: list[dict], out: Path, *, steps: int, learning_rate: float, batch_size: int = 64,
             max_seq_len: int = 16, seed: int = 0, tok=TOK) -> dict:
    """Train the adapters of `model` (already given by get_peft_model) on JSONL-style rows. `out` is this
    script's own run directory: a previous run there is replaced."""
    shutil.rmtree(out, ignore_errors=True)
    path = tasks.write_jsonl(train_rows, out / "train.jsonl")
    dcfg = DataConfig(path=str(path), max_seq_len=max_seq_len, batch_size=batch_size, seed=seed, overlong="truncate")
    return train(
        model, load_data(dcfg, tok), data_cfg=dcfg, pad_token_id=tok.pad_token_id or 0,
        optim_cfg=OptimizerConfig(learning_rate=learning_rate, max_steps=steps, warmup_steps=min(20, steps // 10)),
        train_cfg=TrainConfig(output_dir=str(out), save_total_limit=1),
    )


def accuracy(model, rows: list[dict]) -> float:
    return completion_accuracy(model, TOK, rows)[0]


# --- memory ---------------------------------------------------------------------------------------------

# Bits per weight of each base format, with bitsandbytes' layouts (blocksize 64, nested blocks of 256):
# 4-bit codes + one fp32 absmax per 64 weights; double quantization stores absmax as 8-bit codes plus
# one fp32 scale per 256 blocks (the 1-scalar offset is negligible); the 8-bit map likewise at 64.
BITS_PER_WEIGHT = {
    "bf16": 16.0,
    "8-bit blockwise": 8 + 32 / 64,
    "NF4": 4 + 32 / 64,
    "NF4 + DQ": 4 + 8 / 64 + 32 / (64 * 256),
}

# (hidden, intermediate, layers, heads, kv_heads, vocab) of the Llama-2 family, from their config.json.
LLAMA_SHAPES = {
    "7B": (4096, 11008, 32, 32, 32, 32000),
    "13B": (5120, 13824, 40, 40, 40, 32000),
    "70B": (8192, 28672, 80, 64, 8, 32000),
}


def llama_param_counts(hidden, inter, layers, heads, kv_heads, vocab) -> tuple[int, int]:
    """(quantizable linear weights, everything else: embeddings, lm_head, norms)."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    linear = layers * (attn + mlp)
    other = 2 * vocab * hidden + (2 * layers + 1) * hidden
    return linear, other


def memory_rows(linear: int, other: int) -> list[tuple[str, float, float]]:
    """(format, GiB for the whole base, bits per linear weight); non-linear params stay bf16."""
    rows = []
    for name, bits in BITS_PER_WEIGHT.items():
        total_bytes = linear * bits / 8 + other * 2
        rows.append((name, total_bytes / 2**30, bits))
    return rows


def measured_bits(model) -> tuple[float, int, int]:
    """(bits per linear weight, quantized bytes, linear weights), measured on a model's QuantizedTensors."""
    nbytes = weights = 0
    with unstacked(model):  # per layer: a stacked QuantizedTensor's shape is one layer's
        for _, module in nnx.iter_graph(model):
            if isinstance(module, jaxlora.QuantizedLinear):
                qt = module.weight.get_value()
                nbytes += qt.nbytes
                weights += math.prod(qt.shape)
    return 8 * nbytes / weights, nbytes, weights


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
