"""Blockwise quantization as pure jnp: bitsandbytes' NF4 / FP4 / dynamic 8-bit formats."""

from jaxlora.quant.blockwise import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from jaxlora.quant.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from jaxlora.quant.tensor import QuantizedTensor

__all__ = [
    "QuantizedTensor",
    "dequantize_4bit",
    "dequantize_blockwise",
    "from_bnb_state_dict",
    "quantize_4bit",
    "quantize_blockwise",
    "to_bnb_state_dict",
]
