"""Checkpoints restore training exactly, are written atomically, reject files that do not fit, and a
resume skips a damaged newest checkpoint for the previous complete one."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlora.train.checkpoint import (
    clean_leftovers,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_newest,
    save_checkpoint,
)
from jaxlora.train.optim import OptimizerConfig, make_optimizer
from jaxlora.train.step import train_step
from tests._models import ToyLM
from tests._models import toy_batch as _batch


class DropoutLM(ToyLM):
    """ToyLM with dropout, so the model carries an RNG stream that a resume must restore."""

    def __init__(self, rngs):
        super().__init__(rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        return self.proj(self.drop(self.embed(ids)))


def _fresh(dropout_seed=1):
    model = DropoutLM(nnx.Rngs(params=0, dropout=dropout_seed))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=10)), wrt=nnx.LoRAParam)
    return model, opt


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    batches = [_batch(i) for i in range(6)]
    model, opt = _fresh()
    straight = [float(train_step(model, opt, b)["loss"]) for b in batches]

    model, opt = _fresh()
    resumed = [float(train_step(model, opt, b)["loss"]) for b in batches[:3]]
    save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, trainer_state={"data": {"index": 3}})
    # Same frozen base (it is reloaded from its own checkpoint), but another dropout stream and
    # scrambled adapters: everything training changes must come from the file.
    model, opt = _fresh(dropout_seed=7)
    nnx.update(model, jax.tree.map(lambda v: v + 1.0, nnx.state(model, nnx.LoRAParam)))
    meta = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt)
    assert meta == {"step": 3, "data": {"index": 3}}
    resumed += [float(train_step(model, opt, b)["loss"]) for b in batches[meta["data"]["index"]:]]
    np.testing.assert_array_equal(np.array(resumed), np.array(straight))


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    model, opt = _fresh()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, step=4, model=model, optimizer=opt, write_adapter=boom)
    # The failed save left no checkpoint-4 behind.
    assert latest_checkpoint(tmp_path).name == "checkpoint-000003"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]


def test_leftovers_of_killed_saves_are_cleaned(tmp_path):
    model, opt = _fresh()
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    # What kill -9 in the middle of a save leaves: orbax's temporary step directory, jaxlora's
    # temporary adapter / pointer files.
    left = [tmp_path / "checkpoint-000002.orbax-checkpoint-tmp-1733", tmp_path / ".adapter.tmp-x1y2"]
    for d in left:
        (d / "state").mkdir(parents=True)
    (tmp_path / ".metrics.jsonl.tmp-4242").write_text("{}")
    assert sorted(p.name for p in clean_leftovers(tmp_path)) == sorted([*(d.name for d in left), ".metrics.jsonl.tmp-4242"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]


def _damage_state(path):
    # Cut every array data file in half, as a save interrupted mid-write (without orbax's commit) would.
    for f in (path / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_mismatched_or_corrupt_checkpoints_are_rejected(tmp_path):
    model, opt = _fresh()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)

    class Wider(DropoutLM):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.proj = nnx.LoRALinear(8, 17, lora_rank=3, rngs=rngs)

    other = Wider(nnx.Rngs(params=0, dropout=1))
    other_opt = nnx.Optimizer(other, make_optimizer(OptimizerConfig()), wrt=nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"lora_a has shape \(8, 2\)"):
        load_checkpoint(path, model=other, optimizer=other_opt)

    _damage_state(path)
    # tensorstore's message names the damaged file.
    with pytest.raises(ValueError, match=r"truncated or corrupt.*checkpoint-000001/state/.*d/[0-9a-f]+"):
        load_checkpoint(path, model=model, optimizer=opt)
    meta = path / "trainer_state" / "metadata"
    meta.write_text(meta.read_text()[:5])
    with pytest.raises(ValueError, match=r"trainer_state/metadata is unreadable"):
        load_checkpoint(path, model=model, optimizer=opt)
    shutil.rmtree(path / "trainer_state")
    with pytest.raises(FileNotFoundError, match="trainer_state/ is missing"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    model, opt = _fresh()
    good = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, trainer_state={"data": {"index": 1}})
    want = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    train_step(model, opt, _batch(0))
    _damage_state(save_checkpoint(tmp_path, step=2, model=model, optimizer=opt))

    with pytest.warns(UserWarning, match=r"checkpoint-000002/state/.*d/[0-9a-f]+.*moved it to checkpoint-000002\.unreadable"):
        path, meta = restore_newest(tmp_path, model=model, optimizer=opt)
    assert path == good and meta["step"] == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam)), want)
    assert latest_checkpoint(tmp_path) == good and (tmp_path / "checkpoint-000002.unreadable").is_dir()
    # The next save of step 2 (the resumed run) is not blocked by the damaged one.
    assert save_checkpoint(tmp_path, step=2, model=model, optimizer=opt).is_dir()


def test_a_new_checkpoint_is_never_pruned_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    from jaxlora.train.loop import check_output_dir

    model, opt = _fresh()
    save_checkpoint(tmp_path, step=10, model=model, optimizer=opt)
    path = save_checkpoint(tmp_path, step=5, model=model, optimizer=opt, keep=1)  # older step, newer save
    assert path.is_dir() and (tmp_path / "checkpoint-000010").is_dir()
    with pytest.raises(ValueError, match="already holds checkpoints.*resume"):
        check_output_dir(tmp_path, resume=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check_output_dir(tmp_path / "empty", resume=True)
