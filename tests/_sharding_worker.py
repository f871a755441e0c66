"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see test_sharding.py):
trains the same toy model unsharded and on a 2x2 (data, fsdp) mesh, prints both loss curves as JSON."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from jaxlora.train.optim import OptimizerConfig, make_optimizer
from jaxlora.train.sharding import make_mesh, shard_batch, shard_model
from jaxlora.train.step import train_step
from tests.test_train_step import ToyLM, _batch


def curve(mesh):
    model = ToyLM(nnx.Rngs(0))
    if mesh is not None:
        shard_model(model, mesh)
    opt = nnx.Optimizer(model, make_optimizer(OptimizerConfig(learning_rate=3e-2, max_steps=8)), wrt=nnx.LoRAParam)
    losses = []
    for i in range(8):
        batch = _batch(i % 2, b=8, s=8)  # two batches, revisited: the loss must fall
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        losses.append(float(train_step(model, opt, batch)["loss"]))
    shardings = {str(p): str(getattr(v.get_value().sharding, "spec", "single-device")) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return losses, shardings


assert jax.device_count() == 4, jax.devices()
one, _ = curve(None)
four, specs = curve(make_mesh(data=2, fsdp=2))
try:
    shard_batch(_batch(0, b=6), make_mesh(data=2, fsdp=2))
    err = None
except ValueError as e:
    err = str(e)
json.dump({"one": one, "four": four, "specs": specs, "error": err}, sys.stdout)
