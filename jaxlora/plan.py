"""Memory planning on paper: one QLoRA train step of a model built abstractly, compiled, never allocated.

    from jaxlora.plan import plan_step
    report = plan_step(LlamaConfig(...), seq=2048, batch=1)  # compiled argument / temp bytes + the floor

`abstract_qlora` builds model, adapters and optimizer under `nnx.eval_shape` (every array a
``jax.ShapeDtypeStruct``), so a 70B step is planned on a laptop; `compiled_step` compiles the Trainer's own
step (`jaxlora.train.step.donating_train_step`) for it with XLA on this backend (`lowered_step` lowers for
any platform, e.g. "cuda") and reads
``memory_analysis()`` and ``cost_analysis()``. The trained state (adapters, optimizer state) is donated, as the
Trainer's step does, so argument + temp is the step's device footprint.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.peft_model import get_peft_model
from jaxlora.lora_config import LoraConfig
from jaxlora.models.config import LlamaConfig
from jaxlora.models.loading import from_config
from jaxlora.models.quantize import QuantConfig
from jaxlora.train.optim import OptimizerConfig, make_optimizer
from jaxlora.train.step import donating_train_step, split_state

GiB = 2**30


def abstract_qlora(config: LlamaConfig, *, quantization: QuantConfig | None = QuantConfig(),
                   lora: LoraConfig = LoraConfig(r=16, lora_alpha=32), optim: OptimizerConfig = OptimizerConfig(),
                   dtype=jnp.bfloat16, remat: bool | str = "full", attention: str = "auto"):
    """(model, optimizer) of `config` with adapters, every array abstract: nothing is allocated."""

    def build():
        model = from_config(config, dtype=dtype, compute_dtype=dtype, remat=remat, attention=attention,
                            quantization=quantization)
        model = get_peft_model(model, lora, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, make_optimizer(optim), wrt=model.trainable)  # the Trainer's

    return nnx.eval_shape(build)


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Bytes of one compiled train step (XLA's memory_analysis) beside the analytic floor."""

    argument: int  # weights, adapters, optimizer state, batch
    temp: int  # everything the step allocates besides its arguments and outputs
    output: int  # outputs not aliased to a donated argument
    frozen: int  # quantized weights + dense embeddings, head and norms (part of argument)
    trained: int  # adapters + optimizer state (part of argument)
    activations: int  # the floor's saved activations: each layer's input (bf16 boundaries)
    flops: float  # XLA's cost_analysis of the step
    compile_s: float

    @property
    def total(self) -> int:
        return self.argument + self.temp

    @property
    def floor(self) -> int:
        return self.frozen + self.trained + self.activations


def lowered_step(model, optimizer, *, seq: int, batch: int = 1, platform: str | None = None):
    """The Trainer's step (`donating_train_step`: the trained state donated) for the abstract (model,
    optimizer) traced and lowered (for `platform`, default this machine's backend). Returns (lowered,
    (trained, opt_state, frozen))."""
    _, trained, opt_state, frozen = split_state(model, optimizer)  # what the step takes
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = dict(input_ids=tokens, attention_mask=tokens, loss_mask=jax.ShapeDtypeStruct((batch, seq), bool))
    return donating_train_step.lower(model, optimizer, data, platform=platform), (trained, opt_state, frozen)


def compiled_step(model, optimizer, *, seq: int, batch: int = 1) -> StepPlan:
    """Lower and compile `train_step` for the abstract (model, optimizer) on this backend; nothing runs."""
    t0 = time.perf_counter()
    lowered, (trained, opt_state, frozen) = lowered_step(model, optimizer, seq=seq, batch=batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hidden = model.config.hidden_size
    return StepPlan(
        argument=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
        output=max(0, mem.output_size_in_bytes - mem.alias_size_in_bytes),
        frozen=_nbytes(frozen), trained=_nbytes(trained) + _nbytes(opt_state),
        activations=model.config.num_hidden_layers * batch * seq * hidden * 2,
        flops=float((cost or {}).get("flops", 0.0)), compile_s=compile_s,
    )


def plan_step(config: LlamaConfig, *, seq: int, batch: int = 1, remat: bool | str = "full", **build) -> StepPlan:
    """`compiled_step` of `abstract_qlora(config, ...)`."""
    model, optimizer = abstract_qlora(config, remat=remat, **build)
    return compiled_step(model, optimizer, seq=seq, batch=batch)


__all__ = ["GiB", "StepPlan", "abstract_qlora", "compiled_step", "lowered_step", "plan_step"]
