"""The loop trains, logs, evaluates, checkpoints, resumes to the identical curve, and stops on NaN."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.data import DataConfig, load_data
from jaxlora.train.loop import NonFiniteLossError, TrainConfig, read_metrics, train
from jaxlora.train.optim import OptimizerConfig

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


def _run(out, jsonl, *, max_steps, resume=False, save_every=0, lr=3e-2, model=None, on_step=None):
    data_cfg = DataConfig(path=str(jsonl), max_seq_len=16, batch_size=4, eval_fraction=0.2, seed=3)
    model = model or ByteLM(nnx.Rngs(params=0, dropout=1))
    return train(
        model,
        load_data(data_cfg, TOK),
        data_cfg=data_cfg,
        optim_cfg=OptimizerConfig(learning_rate=lr, max_steps=max_steps, warmup_steps=2),
        train_cfg=TrainConfig(output_dir=str(out), save_every=save_every, eval_every=3, progress=False),
        pad_token_id=TOK.pad_token_id,
        write_adapter=lambda m, path: (path.mkdir(), (path / "marker").write_text("adapter")),
        resume=resume,
        on_step=on_step,
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
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_gives_the_uninterrupted_curve(tmp_path, jsonl):
    _run(tmp_path / "straight", jsonl, max_steps=8)

    def interrupt(metrics):
        if metrics["step"] == 6:
            raise KeyboardInterrupt  # killed after step 6, with the last checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "split", jsonl, max_steps=8, save_every=4, on_step=interrupt)
    assert max(r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")) == 6
    _run(tmp_path / "split", jsonl, max_steps=8, resume=True)
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    key = lambda rows: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]
    assert key(split) == key(straight)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, jsonl):
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at step \d+.*checkpoint-000002"):
        _run(tmp_path, jsonl, max_steps=50, save_every=2, lr=1e38)  # adapters overflow float32
    saved = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert saved and (tmp_path / "latest").read_text() == saved[-1]


def test_evaluate_leaves_the_model_mode_alone(tmp_path, jsonl):
    from jaxlora.train.loop import evaluate

    data_cfg = DataConfig(path=str(jsonl), max_seq_len=16, batch_size=4)
    data = load_data(data_cfg, TOK)
    model = ByteLM(nnx.Rngs(params=0, dropout=1))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        first = evaluate(model, data.train, data_cfg, pad_token_id=TOK.pad_token_id)
        assert model.drop.deterministic == (mode == "eval")
        # Dropout is off during evaluation whatever the mode: the loss is deterministic.
        assert evaluate(model, data.train, data_cfg, pad_token_id=TOK.pad_token_id) == first
