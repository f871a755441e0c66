"""report_to backends, read back by their own readers; the progress display on a terminal and in a log."""

import io
import json

import jax
import numpy as np
import pytest

from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.data import DataConfig, load_data
from jaxlora.train.loop import TrainConfig, read_metrics, train
from jaxlora.train.optim import OptimizerConfig
from jaxlora.train.report import Progress, Reporter, TensorBoardWriter, device_memory_mb, parse_report_to

TOK = ByteTokenizer()


def scalars(logdir):
    """{tag: [(step, value)]} as TensorBoard itself reads the event files (purges included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.mark.parametrize(
    "value, want",
    [("none", ()), ("tensorboard", ("tensorboard",)), (["wandb", "tensorboard"], ("wandb", "tensorboard")),
     (("tensorboard", "tensorboard"), ("tensorboard",))],
)
def test_parse_report_to(value, want):
    assert parse_report_to(value) == want


def test_report_to_checked():
    with pytest.raises(ValueError, match=r"report_to: unknown \['mlflow'\]; valid: \['none', 'tensorboard', 'wandb'\]"):
        TrainConfig(report_to="mlflow")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        TrainConfig(report_to=("none", "wandb"))


def test_training_writes_tensorboard_events(tmp_path, byte_dense):
    pytest.importorskip("tensorboardX")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}-{b}=", "completion": str(a - b)}) + "\n"
                            for a in range(6) for b in range(5)))
    data_cfg = DataConfig(path=str(path), max_seq_len=16, batch_size=4, eval_fraction=0.2)
    out = tmp_path / "run"
    train(byte_dense(1), load_data(data_cfg, TOK), data_cfg=data_cfg,
          optim_cfg=OptimizerConfig(learning_rate=1e-2, max_steps=6, warmup_steps=2),
          train_cfg=TrainConfig(output_dir=str(out), eval_every=3, progress=False, report_to="tensorboard"),
          pad_token_id=TOK.pad_token_id, run_info={"note": "test"})
    got = scalars(out / "tensorboard")
    rows = read_metrics(out / "metrics.jsonl")
    want = {"train/loss": "loss", "train/learning_rate": "lr", "train/grad_norm": "grad_norm",
            "train/tokens_per_s": "tokens_per_s", "system/host_peak_rss_mb": "rss_mb", "eval/loss": "eval_loss"}
    for tb_tag, key in want.items():
        jsonl = [(r["step"], r[key]) for r in rows if key in r]
        assert len(jsonl) == (2 if key == "eval_loss" else 6)
        # Event files store float32: the same numbers, rounded once.
        assert got[tb_tag] == [(s, float(np.float32(v))) for s, v in jsonl], tb_tag


def test_tensorboard_resume_hides_what_followed_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX")
    first = TensorBoardWriter(tmp_path)
    for step in range(1, 7):
        first.write(step, {"loss": 10.0 + step})  # the interrupted run reached step 6
    first.close()
    resumed = TensorBoardWriter(tmp_path, start_step=4)  # its last checkpoint was step 4
    for step in range(5, 9):
        resumed.write(step, {"loss": float(step)})
    resumed.close()
    assert scalars(tmp_path)["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 5.0), (6, 6.0),
                                               (7, 7.0), (8, 8.0)]
    fresh = TensorBoardWriter(tmp_path)  # a new run in the same directory starts a clean curve
    fresh.write(1, {"loss": 1.0})
    fresh.close()
    assert scalars(tmp_path)["train/loss"] == [(1, 1.0)]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reporter = Reporter.create("wandb", tmp_path, total=2, progress=False, config={"lr": 1e-3})
    reporter.log(1, {"loss": 2.0, "lr": 1e-3})
    reporter.log(2, {"eval_loss": 1.5})
    reporter.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


class Recorder:
    def __init__(self):
        self.calls = []

    def write(self, step, metrics):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.calls.append("closed")


def test_reporter_cadence_and_jsonl(tmp_path):
    rec = Recorder()
    reporter = Reporter(Reporter.create("none", tmp_path, total=7, progress=False).writers + [rec], total=7,
                        log_every=3)
    for step in range(1, 8):
        reporter.log(step, {"step": step, "loss": 1.0 / step})
        if step == 2:
            reporter.log(step, {"eval_loss": 0.5})  # evaluations are always written
    reporter.close()
    assert [c[0] for c in rec.calls[:-1]] == [2, 3, 6, 7] and rec.calls[-1] == "closed"
    assert rec.calls[0][1] == {"eval_loss": 0.5} and "step" not in rec.calls[1][1]
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 2, "eval_loss": 0.5}, {"step": 3, "loss": 1 / 3}, {"step": 6, "loss": 1 / 6}, {"step": 7, "loss": 1 / 7}
    ]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _drive(stream, total=40):
    clock = iter(np.arange(100.0, 1000.0, 2.0))  # 2 s per step after the first
    progress = Progress(total, stream=stream, clock=lambda: next(clock))
    for step in range(1, total + 1):
        progress.write(step, {"loss": 1.0, "tokens_per_s": 1234.5, "rss_mb": 2048.0})
        if step == 10:
            progress.write(step, {"eval_loss": 0.75})
    progress.close()
    return stream.getvalue()


def test_progress_in_a_log_file():
    lines = _drive(io.StringIO()).splitlines()
    assert lines[0] == "step 1/40  loss 1.0000  1,234 tok/s  rss 2,048 MiB  ETA ?"  # the first step includes compiling
    assert [ln.split()[1] for ln in lines] == ["1/40", "2/40", "4/40", "6/40", "8/40", "10/40", "10/40", *(
        f"{s}/40" for s in range(12, 41, 2))]
    assert lines[6] == "step 10/40  eval loss 0.7500"
    assert lines[7].startswith("step 12/40  loss 1.0000  eval 0.7500") and lines[7].endswith("ETA 0:56")  # 28 x 2 s
    assert "\r" not in "".join(lines)


def test_progress_on_a_terminal():
    text = _drive(Terminal())
    frames = text.split("\r")[1:]
    assert len(frames) == 40 and text.endswith("\n") and text.count("\n") == 1
    assert frames[-1] == "step 40/40  loss 1.0000  eval 0.7500  1,234 tok/s  rss 2,048 MiB  ETA 0:00\x1b[K\n"


def test_device_memory():
    mem = device_memory_mb()
    if jax.default_backend() == "cpu":
        assert mem == {}  # the CPU backend keeps no memory statistics
    else:
        assert 0 < mem["device_mb"] <= mem["device_peak_mb"]
