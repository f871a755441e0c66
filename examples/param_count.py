"""Seed 000's first exercise: trainable LoRA parameters and their share for ranks 4-64 on a 4096x4096 layer.

Counts come from the layer itself -- the ``nnx.LoRAParam`` leaves an optimizer with
``wrt=nnx.LoRAParam`` would train -- built abstractly (``nnx.eval_shape``), so nothing is allocated.

    python -m examples.param_count
"""

import math

import jax
from flax import nnx

from jaxlora.layers import LoRALinear

D = 4096  # a typical LLM hidden size (seed 000)


def count(r: int, d: int = D) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of a d x d LoRALinear (no bias) at rank r, alpha = 2r."""
    layer = nnx.eval_shape(lambda: LoRALinear(nnx.Linear(d, d, use_bias=False, rngs=nnx.Rngs(0)),
                                              r=r, lora_alpha=2 * r, rngs=nnx.Rngs(1)))
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(layer, nnx.LoRAParam)))
    frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(layer, nnx.Not(nnx.LoRAParam))))
    return trainable, frozen


def main() -> None:
    print(f"| rank | alpha | trainable (2·d·r) | % of base W ({D}×{D}) | % of all params |")
    print("|---:|---:|---:|---:|---:|")
    for r in (4, 8, 16, 32, 64):
        trainable, frozen = count(r)
        assert trainable == 2 * D * r and frozen == D * D
        print(f"| {r} | {2 * r} | {trainable:,} | {100 * trainable / frozen:.3f}% "
              f"| {100 * trainable / (trainable + frozen):.3f}% |")


if __name__ == "__main__":
    main()
