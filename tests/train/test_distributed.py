"""Two processes on this machine (`jax.distributed` on localhost, gloo CPU collectives), each with 2
simulated devices, QLoRA-train a tiny Llama through `jaxlora train` on a 2 x 2 (data, fsdp) mesh that
spans both: the loss curve is the 1-process one; both are killed with SIGKILL after checkpoint 10 and
resume across 2 processes to the same curve; files are written once; a checkpoint written by the 2
processes restores on 1 device."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from jaxlora.cli import ModelConfig, load_model, main
from jaxlora.lora_config import LoraConfig
from jaxlora.models.quantize import QuantConfig
from jaxlora.peft_model import get_peft_model, save_adapter
from jaxlora.tokenizer import ByteTokenizer
from jaxlora.train.checkpoint import load_checkpoint
from jaxlora.train.lock import LOCK_NAME
from jaxlora.train.loop import read_metrics
from jaxlora.train.optim import OptimizerConfig, make_optimizer
from tests._models import HAS_MATPLOTLIB

ROOT = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
STEPS, KILL_AFTER = 20, 10



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(base_dir, data_file, out, *, processes, resume=False):
    """`jaxlora train` in `processes` processes of 2 simulated devices each (1 process: 1 device)."""
    args = ["train", "--model", base_dir, "--data", data_file, "--output-dir", str(out), "--model.tokenizer", "byte",
            "--data.max_seq_len", "16", "--data.batch_size", "8", "--optim.learning_rate", "1e-2",
            "--optim.warmup_steps", "2", "--quantization.compute_dtype", "float32", "--train.progress", "false",
            "--max-steps", str(STEPS), "--save-every", "5", "--lora.lora_dropout", "0.1",
            "--train.mesh_data", "2" if processes > 1 else "1", *(["--resume"] if resume else [])]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs, port = [], _free_port()
    for i in range(processes):
        if processes > 1:
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAXLORA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAXLORA_NUM_PROCESSES=str(processes), JAXLORA_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxlora.cli", *args], cwd=ROOT, env=dict(env),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=240):
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
    return out


def _losses(out):
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step logged once, by process 0
    return np.array([r["loss"] for r in rows])


def test_two_processes_train_resume_and_match_one(tmp_path, base_dir, data_file, capsys):
    t0 = time.time()
    one = _launch(base_dir, data_file, tmp_path / "one", processes=1)
    victims = _launch(base_dir, data_file, tmp_path / "two", processes=2)
    deadline = time.time() + 240
    while not (tmp_path / "two" / f"checkpoint-{KILL_AFTER:06d}").is_dir():
        assert all(p.poll() is None for p in victims) and time.time() < deadline, [
            p.communicate()[1][-2000:] for p in victims if p.poll() is not None
        ]
        time.sleep(0.02)
    for p in victims:
        p.send_signal(signal.SIGKILL)
    for p in victims:
        p.wait()
    assert (tmp_path / "two" / LOCK_NAME).exists()  # left behind by the kill: stale, to be taken over
    t_killed = time.time()
    resumed = _launch(base_dir, data_file, tmp_path / "two", processes=2, resume=True)
    _finish(one)
    stdout = _finish(resumed)
    summary = json.loads(stdout[stdout.index("\n{\n") :])  # gloo itself prints "[Gloo] Rank 1 is connected" lines
    print(f"timing: killed after {t_killed - t0:.0f}s, resumed in {time.time() - t_killed:.0f}s", file=sys.stderr)

    straight = _losses(tmp_path / "one")
    assert straight[-1] < straight[0]
    # Float tolerance: the sharded runs sum partial matmuls and gradients in another order.
    np.testing.assert_allclose(_losses(tmp_path / "two"), straight, rtol=2e-5)

    run = tmp_path / "two"
    assert summary["checkpoint"].endswith(f"checkpoint-{STEPS:06d}") and not (run / LOCK_NAME).exists()
    names = sorted(p.name for p in run.iterdir())  # no temporary directories left, nothing twice
    assert names == sorted(["adapter", "checkpoint-000010", "checkpoint-000015", "checkpoint-000020",
                            "metrics.jsonl", "run_config.json"] + (["loss.png"] if HAS_MATPLOTLIB else [])), names
    ckpt = run / "checkpoint-000020"
    # The checkpoint's adapter is the final one, and carries the tokenizer: `eval --adapter` takes it alone.
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == want.keys() and all(np.array_equal(final[k], want[k]) for k in want)
    assert main(["eval", "--model", base_dir, "--adapter", str(ckpt / "adapter"), "--data", data_file,
                 "--max-seq-len", "16"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["eval_loss"])

    # Written by 2 processes x 2 devices, restored here on 1 device: the same adapter.
    model = load_model(base_dir, ModelConfig(name_or_path=base_dir, tokenizer="byte"),
                       QuantConfig(compute_dtype=jnp.float32))
    model = get_peft_model(model, LoraConfig(lora_dropout=0.1), rngs=nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=STEPS, warmup_steps=2)),
                        wrt=nnx.LoRAParam)
    assert load_checkpoint(ckpt, model=model, optimizer=opt)["step"] == STEPS
    save_adapter(model, tmp_path / "restored")
    got = load_file(str(tmp_path / "restored" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
