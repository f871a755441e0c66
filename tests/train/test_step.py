"""The train step touches adapters only, its loss is the masked causal-LM mean, the schedules equal
transformers' formulas, and gradient accumulation averages micro-batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.train.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxlora.train.step import causal_lm_loss, eval_step, train_step
from tests._models import ToyLM, tiny_llama_config
from tests._models import toy_batch as _batch

# LoRAParam subclasses Param: the frozen weights are the Params that are not LoRAParams.
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5)).astype(np.int32)
    mask = rng.random((2, 5)) < 0.6
    mask[0, 3] = True
    total, n = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                lp = logits[b, t - 1] - np.log(np.sum(np.exp(logits[b, t - 1])))
                total -= lp[ids[b, t]]
                n += 1
    loss, count = causal_lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    assert int(count) == n
    np.testing.assert_allclose(float(loss), total / n, rtol=1e-6)


def test_train_step_moves_only_adapters_and_lowers_loss():
    model = ToyLM(nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=5e-2, max_steps=30)), wrt=nnx.LoRAParam)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, FROZEN))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    batch = _batch(1)
    first = float(train_step(model, opt, batch)["loss"])
    for _ in range(29):
        last = float(train_step(model, opt, batch)["loss"])
    assert last < first * 0.8
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, FROZEN))
    jax.tree.map(np.testing.assert_array_equal, frozen_before, frozen_after)
    lora_after = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), lora_before, lora_after))
    assert all(moved)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_equal_transformers_formulas(kind):
    cfg = OptimizerConfig(learning_rate=1e-3, lr_scheduler_type=kind, warmup_steps=3, max_steps=10)
    sched = make_schedule(cfg)
    for k in range(11):
        if k < 3:
            want = 1e-3 * k / 3
        else:
            progress = (k - 3) / 7
            want = {
                "cosine": 1e-3 * 0.5 * (1 + math.cos(math.pi * progress)),
                "linear": 1e-3 * (1 - progress),
                "constant": 1e-3,
            }[kind]
        np.testing.assert_allclose(float(sched(k)), want, rtol=1e-5, atol=1e-12)


def test_gradient_accumulation_averages_micro_batches():
    # Two micro-batches with equal target counts accumulate to the update of their union.
    full = _batch(2, b=4)
    full["loss_mask"][:] = True
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    cfg = dict(optim="sgd", momentum=0.0, learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=None)
    m1 = ToyLM(nnx.Rngs(0))
    o1 = nnx.Optimizer(m1, make_optimizer(OptimizerConfig(**cfg)), wrt=nnx.LoRAParam)
    train_step(m1, o1, full)
    m2 = ToyLM(nnx.Rngs(0))
    o2 = nnx.Optimizer(m2, make_optimizer(OptimizerConfig(**cfg, gradient_accumulation_steps=2)), wrt=nnx.LoRAParam)
    train_step(m2, o2, halves[0])
    unchanged = jax.tree.map(np.asarray, nnx.state(m2, nnx.LoRAParam))
    train_step(m2, o2, halves[1])
    # Two micro-batches sum in another order than their union (float32; the CPU's dot kernels choose it):
    # rtol 1e-6 plus an absolute floor of 1e-9 for weights near zero (on an AVX2 machine an 8e-5 weight
    # differed by 1.2e-10, at commit 9e51273 as after it).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
        jax.tree.map(lambda x: np.asarray(x), nnx.state(m1, nnx.LoRAParam)),
        jax.tree.map(lambda x: np.asarray(x), nnx.state(m2, nnx.LoRAParam)),
    )
    # The first micro-step alone must not have applied an update.
    m3 = ToyLM(nnx.Rngs(0))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(m3, nnx.LoRAParam)), unchanged)


def test_eval_step_sums():
    model = ToyLM(nnx.Rngs(0))
    batch = _batch(3)
    out = eval_step(model, batch)
    logits = model(jnp.asarray(batch["input_ids"]))
    loss, n = causal_lm_loss(logits, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(float(out["loss_sum"]), float(loss * n), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(optim="lion"), "optim='lion'"),
        (dict(lr_scheduler_type="poly"), "lr_scheduler_type='poly'"),
        (dict(learning_rate=0.0), "learning_rate=0.0"),
        (dict(warmup_steps=20, max_steps=10), "warmup_steps=20"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
        (dict(max_grad_norm=-1.0), "max_grad_norm=-1.0"),
    ],
)
def test_bad_optimizer_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        OptimizerConfig(**kwargs)


def test_offloaded_optimizer_state_stays_on_host_and_trains_identically():
    from jaxlora.train.step import offload_optimizer_state

    batch = _batch(5)
    cfg = OptimizerConfig(learning_rate=1e-2, max_steps=5)
    m1 = ToyLM(nnx.Rngs(0))
    o1 = nnx.Optimizer(m1, make_optimizer(cfg), wrt=nnx.LoRAParam)
    plain = [float(train_step(m1, o1, batch)["loss"]) for _ in range(4)]
    m2 = ToyLM(nnx.Rngs(0))
    o2 = nnx.Optimizer(m2, make_optimizer(cfg), wrt=nnx.LoRAParam)
    offload_optimizer_state(o2)
    offloaded = [float(train_step(m2, o2, batch, offload_optimizer=True)["loss"]) for _ in range(4)]
    np.testing.assert_array_equal(offloaded, plain)
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(nnx.state(o2, nnx.OptState))}
    assert kinds == {"pinned_host"}
    # Adapters stay in device memory; only the optimizer state moved.
    assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(nnx.state(m2, nnx.LoRAParam))} == {"device"}


def test_bf16_compute_keeps_fp32_adapters_and_trains():
    """QLoRA's dtype policy: bf16 activations and dequantized weights, fp32 adapter params and updates."""
    import jaxlora

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128, num_hidden_layers=1)  # whole NF4 blocks
    model = jaxlora.LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    jaxlora.quantize_model(model, jaxlora.QuantConfig(compute_dtype=jnp.bfloat16))
    model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=4, init_lora_weights="gaussian"), rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2)), wrt=nnx.LoRAParam)
    ids = np.random.default_rng(0).integers(0, 64, (4, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}
    assert model(jnp.asarray(ids)).dtype == jnp.bfloat16
    losses = [float(train_step(model, opt, batch)["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))} == {jnp.dtype(jnp.float32)}


def test_injected_loss_is_the_one_trained():
    """`loss_fn(model, batch) -> (loss, aux)`: the step minimizes it and returns its aux entries."""
    from jaxlora.train.step import lm_loss

    def tripled(m, batch):  # 3x the default: 3x its gradient, and an aux entry of its own
        loss, aux = lm_loss(m, batch)
        return 3.0 * loss, {**aux, "plain": loss}

    batch = _batch(6)
    cfg = OptimizerConfig(learning_rate=1e-2, max_steps=5, max_grad_norm=None)
    m1, m2 = ToyLM(nnx.Rngs(0)), ToyLM(nnx.Rngs(0))
    plain = train_step(m1, nnx.Optimizer(m1, make_optimizer(cfg), wrt=nnx.LoRAParam), batch)
    custom = train_step(m2, nnx.Optimizer(m2, make_optimizer(cfg), wrt=nnx.LoRAParam), batch, loss_fn=tripled)
    np.testing.assert_allclose(float(custom["loss"]), 3 * float(plain["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(custom["grad_norm"]), 3 * float(plain["grad_norm"]), rtol=1e-5)
    assert float(custom["plain"]) == float(plain["loss"]) and float(custom["tokens"]) == float(plain["tokens"])
    out = eval_step(m1, batch, loss_fn=tripled)  # evaluation weights it by its aux `tokens`
    np.testing.assert_allclose(float(out["loss_sum"]), 3 * float(out["plain"]) * float(out["tokens"]), rtol=1e-6)


def test_the_optimizer_decides_what_trains():
    """wrt is the optimizer's: an nnx.Param optimizer trains the frozen weights too, with no other argument."""
    model = ToyLM(nnx.Rngs(0))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, FROZEN))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=5)), wrt=nnx.Param)
    train_step(model, opt, _batch(7))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), frozen_before,
                         jax.tree.map(np.asarray, nnx.state(model, FROZEN)))
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("remat", ["none", "full", "nested"])
def test_the_steps_never_copy_or_donate_the_frozen_base(remat):
    """On a real QLoRA model (NF4 base, LoRA with dropout): after train_step, donating_train_step and
    eval_step every frozen variable holds the very buffer it held before, still valid (the compiled step
    takes the base as an input only: under nnx.jit each step copied all of it), while the dropout RNG count,
    a frozen variable the step does change, advances (so each step draws a new mask)."""
    from jaxlora import LoraConfig, get_peft_model
    from jaxlora.models.quantize import QuantConfig, quantize_model
    from jaxlora.train.step import donating_train_step
    from tests._models import tiny, tokens

    ids = np.asarray(tokens())
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}
    base = quantize_model(tiny(), QuantConfig())
    base.model.remat = remat
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "down_proj"], lora_dropout=0.1), rngs=nnx.Rngs(0))
    model.train()
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)
    frozen = nnx.Not(nnx.Any(nnx.LoRAParam, nnx.RngState))
    held = jax.tree.leaves(nnx.state(model, frozen))
    assert len(held) > 20
    counts = []
    for step in (train_step, donating_train_step, lambda m, o, b: eval_step(m, b)):
        step(model, opt, batch)
        now = jax.tree.leaves(nnx.state(model, frozen))
        assert [x.unsafe_buffer_pointer() for x in now] == [x.unsafe_buffer_pointer() for x in held]
        assert not any(x.is_deleted() for x in held)
        counts.append(sum(int(np.sum(c)) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))))
    assert counts[0] < counts[1]  # dropout drew again in the second train step


def test_a_step_that_creates_variables_says_so():
    """A compiled step keeps the model's structure: a loss that sows an intermediate gets a clear error."""
    model = ToyLM(nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)

    def sowing(m, batch):
        logits = m(jnp.asarray(batch["input_ids"]))
        m.sow(nnx.Intermediate, "logits", logits)
        return causal_lm_loss(logits, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["loss_mask"]))[0], {}

    with pytest.raises(ValueError, match=r"the step created variables \['logits'\].*nnx.pop"):
        train_step(model, opt, _batch(3), loss_fn=sowing)
