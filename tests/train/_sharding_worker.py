"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see test_sharding.py):
QLoRA-trains the same tiny Llama (NF4 + double quant base, LoRA on all linear layers) unsharded and on a
2x2 (data, fsdp) mesh and on a 1x4 one (the CLI's default on 4 devices), and prints the loss curves and
where each kind of array was placed, as JSON. test_sharding.py also reads its stderr: XLA warns there
("Involuntary full rematerialization") when a sharding forces an array to be gathered whole."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxlora
from jaxlora.train.optim import OptimizerConfig, make_optimizer
from jaxlora.train.sharding import make_mesh, shard_batch, shard_model
from jaxlora.train.step import train_step
from tests._models import byte_llama_config

CONFIG = byte_llama_config()


def batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (8, 12)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}


def curve(mesh):
    model = jaxlora.LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    jaxlora.quantize_model(model, jaxlora.QuantConfig(compute_dtype=jnp.float32))
    model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
                                   rngs=nnx.Rngs(1))
    if mesh is not None:
        shard_model(model, mesh)
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=1e-2, max_steps=6)), wrt=nnx.LoRAParam)
    losses = []
    for i in range(6):
        b = batch(i % 2)  # two batches, revisited: the loss must fall
        losses.append(float(train_step(model, opt, b if mesh is None else shard_batch(b, mesh))["loss"]))
    placed = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        for leaf in jax.tree.leaves(var.get_value()):
            kind = f"{type(var).__name__}:{leaf.dtype}"
            placed.setdefault(kind, set()).add(str(getattr(leaf.sharding, "spec", "single-device")))
    return losses, {k: sorted(v) for k, v in placed.items()}


assert jax.device_count() == 4, jax.devices()
one, _ = curve(None)
four, placed = curve(make_mesh(data=2, fsdp=2))
fsdp4, _ = curve(make_mesh(data=1, fsdp=4))
try:
    shard_batch({"input_ids": np.zeros((6, 4), np.int32)}, make_mesh(data=2, fsdp=2))
    err = None
except ValueError as e:
    err = str(e)
json.dump({"one": one, "four": four, "fsdp4": fsdp4, "placed": placed, "error": err}, sys.stdout)
