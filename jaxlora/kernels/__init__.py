"""Fused Pallas kernels: 4-bit dequantize-matmul for the forward pass and the input gradient."""

from jaxlora.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t, supports, supports_t

__all__ = ["nf4_matmul", "nf4_matmul_t", "supports", "supports_t"]
