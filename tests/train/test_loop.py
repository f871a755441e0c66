"""The loop trains, logs, evaluates, checkpoints, resumes to the identical curve (past a torn metrics
line), and stops on a non-finite loss without applying it, naming a checkpoint that resumes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.data import DataConfig, load_data
from jaxlora.train.loop import NonFiniteLossError, TrainConfig, read_metrics, train
from jaxlora.train.optim import OptimizerConfig
from tests._models import HAS_MATPLOTLIB

TOK = ByteTokenizer()


class ByteLM(nnx.Module):
    """Embed → dropout → LoRA dense over the byte vocabulary: small, but with an RNG stream to restore."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(TOK.vocab_size, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.proj = nnx.LoRALinear(16, TOK.vocab_size, lora_rank=4, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        return self.proj(self.drop(self.embed(ids)))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(out, jsonl, *, max_steps, resume=False, save_every=0, lr=3e-2, model=None, on_step=None, optim=None, **kw):
    data_cfg = DataConfig(path=str(jsonl), max_seq_len=16, batch_size=4, eval_fraction=0.2, seed=3)
    model = model or ByteLM(nnx.Rngs(params=0, dropout=1))
    return train(
        model,
        load_data(data_cfg, TOK),
        data_cfg=data_cfg,
        optim_cfg=OptimizerConfig(learning_rate=lr, max_steps=max_steps, warmup_steps=2, **(optim or {})),
        train_cfg=TrainConfig(output_dir=str(out), save_every=save_every, eval_every=3, progress=False),
        pad_token_id=TOK.pad_token_id,
        write_adapter=lambda m, path: (path / "marker").write_text("adapter"),
        resume=resume,
        on_step=on_step,
        **kw,
    )


def test_train_logs_evaluates_and_saves(tmp_path, jsonl):
    summary = _run(tmp_path, jsonl, max_steps=9)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 10))
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 9]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert summary["checkpoint"].endswith("checkpoint-000009")
    assert (tmp_path / "checkpoint-000009" / "adapter" / "marker").read_text() == "adapter"
    assert (tmp_path / "loss.png").is_file() == HAS_MATPLOTLIB
    if HAS_MATPLOTLIB:
        assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_gives_the_uninterrupted_curve(tmp_path, jsonl):
    _run(tmp_path / "straight", jsonl, max_steps=8)

    def interrupt(metrics):
        if metrics["step"] == 6:
            raise KeyboardInterrupt  # killed after step 6, with the last checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "split", jsonl, max_steps=8, save_every=4, on_step=interrupt)
    metrics = tmp_path / "split" / "metrics.jsonl"
    assert max(r["step"] for r in read_metrics(metrics)) == 6
    with open(metrics, "a") as f:
        f.write('{"step": 7, "lo')  # torn: killed while writing the next line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: dropped a torn last line"):
        _run(tmp_path / "split", jsonl, max_steps=8, resume=True)
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    key = lambda rows: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]
    assert key(split) == key(straight)


def test_non_finite_loss_stops_and_names_a_checkpoint_that_resumes(tmp_path, jsonl):
    # lr 1e30 with a 2-step warmup: step 1 runs at lr 0 (checkpoint-1 = the initial weights), step 2
    # blows the adapters up (checkpoint-2 holds finite but huge weights), step 3's loss overflows.
    with pytest.raises(NonFiniteLossError, match=r"at step 3: the update was not applied") as err:
        _run(tmp_path, jsonl, max_steps=8, save_every=1, lr=1e30)
    msg = str(err.value)
    assert "checkpoint-000002 holds the weights that produced it" in msg
    assert msg.endswith(f"the last good checkpoint is {tmp_path / 'checkpoint-000001'}: resume from it (e.g. with a lower learning rate)")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002.nonfinite"]
    # The named checkpoint really is good: training continues from it.
    summary = _run(tmp_path, jsonl, max_steps=8, resume=True, lr=3e-2)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in rows)
    assert summary["checkpoint"].endswith("checkpoint-000008")


def test_a_non_finite_step_leaves_weights_and_optimizer_untouched():
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.step import train_step

    model = ByteLM(nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)
    ids = np.random.default_rng(0).integers(0, TOK.vocab_size, (2, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}
    assert bool(train_step(model, opt, batch)["finite"])
    model.proj.lora.lora_b.set_value(model.proj.lora.lora_b.get_value().at[0, 0].set(jnp.inf))
    before = jax.tree.map(np.asarray, nnx.state((model, opt), nnx.Any(nnx.LoRAParam, nnx.OptState)))
    res = train_step(model, opt, batch)
    assert not bool(res["finite"]) and not np.isfinite(float(res["loss"]))
    after = jax.tree.map(np.asarray, nnx.state((model, opt), nnx.Any(nnx.LoRAParam, nnx.OptState)))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # bit for bit: nothing applied, step count too


def test_eval_loss_leaves_the_model_mode_alone(tmp_path, jsonl):
    from jaxlora.evaluate import eval_loss

    data_cfg = DataConfig(path=str(jsonl), max_seq_len=16, batch_size=4)
    data = load_data(data_cfg, TOK)
    model = ByteLM(nnx.Rngs(params=0, dropout=1))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        first = eval_loss(model, data.train, data_cfg, pad_token_id=TOK.pad_token_id)
        assert model.drop.deterministic == (mode == "eval")
        # Dropout is off during evaluation whatever the mode: the loss is deterministic.
        assert eval_loss(model, data.train, data_cfg, pad_token_id=TOK.pad_token_id) == first


def test_an_injected_loss_and_hook(tmp_path, jsonl):
    """train(loss_fn=...) trains and evaluates that loss; train(hooks=[...]) runs a hook after the built-in
    ones, which see each step first (the checkpoint of a save step exists when the hook runs)."""
    from jaxlora.train.hooks import Hook
    from jaxlora.train.step import lm_loss

    def tripled(m, batch):
        loss, aux = lm_loss(m, batch)
        return 3.0 * loss, aux

    class Record(Hook):
        def __init__(self):
            self.seen, self.ended = [], None

        def after_step(self, state, metrics, final):
            saved = (tmp_path / "tripled" / f"checkpoint-{state.step:06d}").is_dir()
            self.seen.append((state.step, "eval_loss" in metrics, saved, final))

        def at_end(self, state, summary):
            self.ended = dict(summary)

    plain = _run(tmp_path / "plain", jsonl, max_steps=3)
    record = Record()
    summary = _run(tmp_path / "tripled", jsonl, max_steps=3, save_every=2, loss_fn=tripled, hooks=[record])
    rows = read_metrics(tmp_path / "tripled" / "metrics.jsonl")
    first_plain = read_metrics(tmp_path / "plain" / "metrics.jsonl")[0]["loss"]
    # Step 1 runs at learning rate 0 (warm-up), so both runs' first loss comes from the same weights.
    np.testing.assert_allclose(rows[0]["loss"], 3 * first_plain, rtol=1e-6)
    assert plain["eval_loss"] < summary["eval_loss"]  # tripled
    assert record.seen == [(1, False, False, False), (2, False, True, False), (3, True, True, True)]
    assert record.ended["checkpoint"].endswith("checkpoint-000003") and record.ended["loss_plot"]


def test_the_trainers_step_reuses_the_trained_state_buffers(tmp_path, jsonl):
    """The Trainer's step donates model and optimizer (donating_train_step): the arrays of the step before are
    consumed, so the new adapters and AdamW moments are written where the old ones were instead of beside
    them (jaxlora.plan's figures assume it); train_step, which a caller may hold arrays for, does not."""
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.step import train_step

    model = ByteLM(nnx.Rngs(params=0, dropout=1))
    seen = []
    _run(tmp_path / "run", jsonl, max_steps=3, model=model,
         on_step=lambda metrics: seen.append(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    assert all(leaf.is_deleted() for leaf in seen[0])  # consumed by the next step
    assert not any(leaf.is_deleted() for leaf in seen[-1])  # the model's current adapters

    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)
    ids = np.random.default_rng(0).integers(0, TOK.vocab_size, (2, 8)).astype(np.int32)
    held = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    train_step(model, opt, {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)})
    assert not any(leaf.is_deleted() for leaf in held)


def test_the_trainers_step_runs_a_model_with_modules_to_save(name="lm_head"):
    """A modules_to_save copy owns its arrays: the donating step gets no buffer twice (XLA refuses that), and
    it trains the copy as train_step does."""
    from jaxlora import LoraConfig, get_peft_model
    from jaxlora.train.loop import _step_for
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.step import donating_train_step, train_step
    from tests._models import RANDOM, tiny, tokens

    ids = np.asarray(tokens())
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}
    losses = []
    for step in (train_step, donating_train_step):
        model = get_peft_model(tiny(), LoraConfig(**RANDOM, target_modules=["q_proj"], modules_to_save=[name]),
                               rngs=nnx.Rngs(1))
        opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=4)), wrt=nnx.LoRAParam)
        assert _step_for(model, opt) is donating_train_step
        run = step.bind(model, opt)
        losses.append([float(run(batch)["loss"]) for _ in range(3)])
    np.testing.assert_array_equal(losses[1], losses[0])
    assert losses[0][2] < losses[0][0]


def test_the_trainer_trains_the_active_adapter_only(tmp_path, jsonl):
    """A PeftModel holding two adapters: train() moves the active adapter's variables and leaves the other's
    as they were, weight decay included (PEFT's set_adapter freezes the inactive one); the trainable count
    is the active adapter's (PEFT's requires_grad count)."""
    from jaxlora import LlamaForCausalLM, LoraConfig, get_peft_model
    from tests._models import byte_llama_config

    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(byte_llama_config(), rngs=nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    trainable, _ = model.get_nb_trainable_parameters()
    model.add_adapter("other", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), rngs=nnx.Rngs(2))
    assert model.get_nb_trainable_parameters()[0] == trainable  # the active adapter's only
    other = nnx.All(nnx.LoRAParam, nnx.PathContains("other"))
    frozen = jax.tree.map(np.array, nnx.state(model, other))
    active = jax.tree.map(np.array, nnx.state(model, model.trainable))
    assert len(jax.tree.leaves(frozen)) == 4 and len(jax.tree.leaves(active)) == 2  # A and B, over stacked layers
    _run(tmp_path, jsonl, max_steps=3, model=model, optim={"weight_decay": 0.1})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model, other)), frozen)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), nnx.state(model, model.trainable), active)
    assert all(jax.tree.leaves(moved))

    from jaxlora.train.loop import Trainer
    from jaxlora.train.optim import OptimizerConfig as Optim
    from jaxlora.train.state import TrainState

    state = TrainState.create(model, Optim(learning_rate=1e-2, max_steps=1))  # follows model.trainable
    model.set_adapter("other")  # the optimizer still holds "default"'s variables: refused, not run
    with pytest.raises(ValueError, match="active adapter changed since its optimizer was built"):
        Trainer(state).fit(iter(()), max_steps=1)
