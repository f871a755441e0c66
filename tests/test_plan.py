"""The real model's compiled train step (jaxlora/plan.py: get_peft_model over a quantized Llama built from a
config, the real `train_step`, XLA's memory_analysis) -- the checks that would have caught the unscanned
decoder keeping every layer's dequantized weights alive."""

import dataclasses
import functools

import pytest

from jaxlora.models.config import LlamaConfig
from jaxlora.plan import StepPlan, plan_step

# Small enough to compile in seconds, wide enough that a dequantized layer (6.8 MiB in bf16) dwarfs the
# per-layer adapter state (~0.7 MiB of fp32 gradients), so a leak of one layer's weights per layer shows.
CONFIG = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8)
LAYER_DENSE_BYTES = (4 * 512 * 512 + 3 * 512 * 1536) * 2  # one layer's linear weights in bf16


@functools.cache
def _plan(layers: int, seq: int, remat: str) -> StepPlan:
    """CONFIG at `layers` layers, compiled once per module: the tests below share these compiles (the 4-layer
    seq-512 step without remat is both policies' baseline, the 2-layer seq-16 one both the depth test's and
    the argument test's step)."""
    return plan_step(dataclasses.replace(CONFIG, num_hidden_layers=layers), seq=seq, remat=remat)


def _temp(layers: int, seq: int, remat: str = "full") -> int:
    return _plan(layers, seq, remat).temp


def test_temp_does_not_grow_with_depth():
    """8 layers against 2 at seq 16: the scanned step's temp may grow by the adapters' gradients (a few
    percent of a layer's dense weights per layer), never by a layer's dequantized weights per layer."""
    growth_per_layer = (_temp(8, 16) - _temp(2, 16)) / 6
    assert growth_per_layer < 0.25 * LAYER_DENSE_BYTES, growth_per_layer


@pytest.mark.parametrize("policy", ["full", "nested", "dots"])
def test_remat_reduces_temp_at_long_sequences(policy):
    """At 512 tokens the activations dominate: keeping only layer boundaries ("full", or every other one:
    "nested") must cut the temp well below autodiff's ("none"); saving the matmul outputs ("dots") sits in
    between or at "none"."""
    none, remat = _temp(4, 512, "none"), _temp(4, 512, policy)
    if policy in ("full", "nested"):
        assert remat < 0.7 * none, (remat, none)
    else:
        assert remat <= none * 1.05, (remat, none)


def test_argument_is_the_quantized_model_plus_trained_state():
    """The step's arguments are the NF4+DQ weights, bf16 embeddings, head and norms, adapters, AdamW state
    and the batch: the analytic floor without activations, to a rounding of the batch."""
    plan = _plan(CONFIG.num_hidden_layers, 16, "full")  # plan_step(CONFIG, seq=16) at its default remat
    assert abs(plan.argument - (plan.frozen + plan.trained)) < 4096
    assert plan.frozen < 0.5 * (2 * LAYER_DENSE_BYTES + 2 * 1024 * 512 * 2)  # 4-bit, not bf16 layers


def test_a_layer_backward_holds_a_fraction_of_its_dense_weights():
    """One Llama-2-7B layer (hidden 4096, intermediate 11008) at seq 16: its compiled step's temp stays
    well under the layer's dense bf16 weights (386 MiB). Each weight is dequantized a row tile at a time
    inside a loop that takes the matmul's input (`jaxlora.qmatmul.row_tiles`); with whole-weight
    dequantization XLA scheduled all 14 of a layer's dequantizations (forward and backward) first, and
    the temp was 1.8x the dense weights."""
    layer = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                        num_attention_heads=32, num_key_value_heads=32)
    dense = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2
    temp = plan_step(layer, seq=16).temp
    assert temp < 0.5 * dense, (temp / 2**20, dense / 2**20)
