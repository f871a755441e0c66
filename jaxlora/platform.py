"""The defaults that depend on the accelerator, decided here and nowhere else.

>>> defaults_for("gpu").use_kernel, defaults_for("cpu").use_kernel
(True, False)
>>> defaults_for("gpu", use_kernel=False).use_kernel  # every field can be overridden
False

Library code that needs one of these reads ``defaults()`` (resolved for ``jax.default_backend()``)
when its own argument is left as ``None``; an explicit argument always wins. Readers today:
`QuantConfig` (``use_kernel``, ``bnb_backend``, resolved once when the config is built; quantized
tensors and layers then read their config); ``compute_dtype`` and ``attention_impl`` are for the
model and the CLI to read. "gpu" means an NVIDIA GPU: the kernels are Triton with one PTX instruction
(`jaxlora.kernels.matmul_4bit`), so ROCm would run them interpreted; jaxlora is not tested there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("cpu", "gpu", "tpu")  # jax.default_backend()'s answers


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlatformDefaults:
    """One backend's defaults; build with `defaults` or `defaults_for`, change with `dataclasses.replace`."""

    # The jax backend these were resolved for: "cpu", "gpu" or "tpu".
    backend: str
    # 4-bit matmuls (forward and input gradient) in the fused Pallas kernels where they support the
    # case (jaxlora.kernels.tiling), the jnp path elsewhere. On a GPU they lower to Triton; off it Pallas
    # would interpret them, orders of magnitude slower than the jnp path, so they stay off.
    use_kernel: bool
    # Activations' and dequantized weights' dtype: bf16 where the hardware multiplies it natively
    # (tensor cores, the MXU) and QLoRA trains in it; float32 on CPU, where most cores emulate bf16 and
    # where the parity suite checks exact numbers.
    compute_dtype: np.dtype
    # `jax.nn.dot_product_attention(..., implementation=...)`: cuDNN's fused (flash) attention on a GPU,
    # which never forms the (seq, seq) scores. Its masks: causal, right padding through
    # query/key_value_seq_lengths, a left sliding window; any other mask (left padding, packed
    # segments) goes in as a dense bias, so the attention code chooses "xla" there. cuDNN needs
    # fp16 / bf16 inputs. "xla" elsewhere.
    attention_impl: Literal["xla", "cudnn"]
    # Which bitsandbytes backend's bytes `jaxlora.quant.quantize` reproduces where CPU and CUDA kernels differ:
    # the one of the device that quantizes, so a model quantized on a GPU matches bitsandbytes there.
    bnb_backend: Literal["cpu", "cuda"]

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"PlatformDefaults.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"PlatformDefaults.attention_impl must be 'xla' or 'cudnn', got {self.attention_impl!r}")
        if self.bnb_backend not in ("cpu", "cuda"):
            raise ValueError(f"PlatformDefaults.bnb_backend must be 'cpu' or 'cuda', got {self.bnb_backend!r}")
        object.__setattr__(self, "compute_dtype", np.dtype(self.compute_dtype))


def defaults_for(backend: str, **overrides: Any) -> PlatformDefaults:
    """The defaults of `backend` ("cpu", "gpu", "tpu"), with `overrides` replacing fields by name.

    Also how tests and `benchmarks.gpu` ask for the GPU's defaults on a CPU-only machine (to lower
    the GPU program for CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpu = backend == "gpu"
    base = dict(
        backend=backend,
        use_kernel=gpu,
        compute_dtype=np.dtype(jnp.float32) if backend == "cpu" else np.dtype(jnp.bfloat16),
        attention_impl="cudnn" if gpu else "xla",
        bnb_backend="cuda" if gpu else "cpu",
    )
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown PlatformDefaults fields {unknown}; fields: {sorted(base)}")
    return PlatformDefaults(**(base | overrides))


def defaults(**overrides: Any) -> PlatformDefaults:
    """The defaults of the backend JAX computes on now (``jax.default_backend()``)."""
    return defaults_for(jax.default_backend(), **overrides)
