"""`jaxlora train | eval | generate | export` end to end on a tiny model, config errors, and a run killed
mid-way that resumes to the identical loss curve."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxlora.cli import main
from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.loop import read_metrics
from tests._models import HAS_MATPLOTLIB

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()



def _train_args(base_dir, data_file, out, *extra):
    return ["train", "--model", base_dir, "--data", data_file, "--output-dir", str(out), "--model.tokenizer", "byte",
            "--data.max_seq_len", "16", "--data.batch_size", "8", "--optim.learning_rate", "1e-2",
            "--optim.warmup_steps", "2", "--quantization.compute_dtype", "float32", "--train.progress", "false",
            *extra]


def test_train_eval_generate_export(tmp_path, base_dir, data_file, capsys):
    # The adapter has dropout: evaluation and generation must run it in eval mode.
    out = tmp_path / "run"
    assert main(_train_args(base_dir, data_file, out, "--max-steps", "6", "--eval-every", "3",
                            "--data.eval_fraction", "0.25", "--lora.r", "4", "--lora.target_modules",
                            "q_proj,v_proj", "--lora.lora_dropout", "0.1")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] == 2 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))  # 2 layers x (q + v), r=4
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted({m.split(".")[-1] for m in config["target_modules"]}) == ["q_proj", "v_proj"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").is_file() == HAS_MATPLOTLIB

    assert main(["eval", "--model", base_dir, "--adapter", str(out / "adapter"), "--data", data_file,
                 "--max-seq-len", "16", "--accuracy"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 64 and 0.0 <= result["accuracy"] <= 1.0 and result["eval_loss"] > 0
    assert main(["generate", "--model", base_dir, "--adapter", str(out / "adapter"), "--prompt", "3+4=",
                 "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "3+4="
    assert main(["export", "--model", base_dir, "--adapter", str(out / "adapter"), "--merged",
                 str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_config_file_errors_name_the_key(tmp_path, base_dir, data_file, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"lora": {"r": 4, "rank": 8}}))
    assert main(_train_args(base_dir, data_file, tmp_path / "a", "--config", str(cfg))) == 2
    assert "lora: unknown key(s) ['rank']" in capsys.readouterr().err
    cfg.write_text(json.dumps({"optimizer": {}}))
    assert main(_train_args(base_dir, data_file, tmp_path / "b", "--config", str(cfg))) == 2
    assert "unknown section(s) ['optimizer']" in capsys.readouterr().err
    assert main(_train_args(base_dir, data_file, tmp_path / "c", "--optim.learning_rate", "fast")) == 2
    assert "optim.learning_rate='fast' is not a number" in capsys.readouterr().err
    assert main(_train_args(base_dir, data_file, tmp_path / "d", "--data.max_seq_len", "1000")) == 2
    assert "max_position_embeddings=64" in capsys.readouterr().err


def test_killed_run_resumes_to_the_identical_curve(tmp_path, base_dir, data_file):
    def cli(out, *extra):
        cmd = [sys.executable, "-m", "jaxlora.cli", *_train_args(base_dir, data_file, out, "--max-steps", "12",
                                                                  "--save-every", "4", "--lora.lora_dropout", "0.1",
                                                                  *extra)]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight = cli(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]

    victim = cli(tmp_path / "killed")
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-000008").is_dir():  # killed after its 2nd checkpoint
        assert victim.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = cli(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    key = lambda rows: [(r["step"], r.get("loss")) for r in rows]  # noqa: E731
    assert key(read_metrics(tmp_path / "killed" / "metrics.jsonl")) == key(read_metrics(tmp_path / "straight" / "metrics.jsonl"))


def test_importing_the_library_starts_no_jax_backend():
    # jax.distributed.initialize must come before any backend call, and `jaxlora train` initializes after its
    # imports: a module-level QuantConfig (which resolves the platform's defaults) broke every 2-process run.
    code = ("import importlib, jax._src.xla_bridge as xb\n"
            "for m in ('jaxlora', 'jaxlora.cli', 'jaxlora.train.loop', 'jaxlora.peft_model', 'jaxlora.inits'):\n"
            "    importlib.import_module(m)\n"
            "print(bool(xb._backends))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
