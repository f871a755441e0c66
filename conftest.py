"""Test configuration shared by tests/ (JAX only) and parity_tests/ (against the PyTorch reference).

Strict JAX modes, as Equinox's tests set them: a silent upcast or a broadcast between mismatched ranks
is an error here rather than a quiet change of numbers.
"""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
