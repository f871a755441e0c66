"""Fused Pallas kernels: 4-bit dequantize-matmul for the forward pass and the input gradient."""

from jaxlora.kernels.matmul_4bit import matmul_4bit, matmul_4bit_t, supports, supports_t

__all__ = ["matmul_4bit", "matmul_4bit_t", "supports", "supports_t"]
