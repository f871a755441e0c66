"""Test configuration shared by tests/ (JAX only) and parity_tests/ (against the PyTorch reference).

Strict JAX modes, as Equinox's tests set them: a silent upcast or a broadcast between mismatched ranks
is an error here rather than a quiet change of numbers.
"""

import os

import jax

# The training loop turns on a persistent compilation cache under ~/.cache; tests must not write there
# (nor share executables between runs): off for this process and the CLI subprocesses it starts.
# tests/train/test_compile_cache.py turns it on in a temporary directory.
os.environ["JAXLORA_COMPILATION_CACHE"] = "off"
# Every test builds its models locally (tiny configs saved to tmp dirs), so a hub call is a bug: offline for
# this process and its subprocesses. Set before anything imports huggingface_hub, which reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
