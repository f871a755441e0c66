"""Arrays built so that XLA's scheduler cannot place them where they cost memory.

XLA's CPU scheduler may run an instruction as early as its operands allow. An array that depends on
nothing -- the zeros a loop starts from, a scan's stacked outputs -- can then be allocated at the top of the
whole train step and held through everything before its loop, including the forward pass when the loop is in
the backward. Built from a value of the loop's own inputs, it cannot exist before that value does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def zeros_after(x: jax.Array, like: Any) -> Any:
    """Zeros shaped like the arrays of `like` that XLA cannot create before `x` exists. Plain zeros depend
    on nothing, so XLA's CPU scheduler hoists the zero buffers of a backward's loops to the top of the whole
    step, where they sit through the forward pass (measured: 0.3 GiB of adapter-gradient stacks at
    Llama-2-7B). nan_to_num(x) * 0 is 0 (or -0.0) for every x, NaN and inf included."""
    zero = jnp.nan_to_num(x[(0,) * x.ndim]) * 0  # one element, no reshape (a sharded x needs no gather)
    return jax.tree.map(lambda a: jnp.broadcast_to(zero.astype(a.dtype), a.shape), like)
