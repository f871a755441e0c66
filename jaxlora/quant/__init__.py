"""Blockwise quantization as pure jnp: bitsandbytes' NF4 / FP4 / dynamic 8-bit formats."""
