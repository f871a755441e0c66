"""Blockwise quantization as pure jnp: bitsandbytes' NF4 / FP4 / dynamic 8-bit formats.

One way in: ``quantize(w, QuantConfig(...)) -> QuantizedTensor``; `quantize_4bit` and friends mirror
``bitsandbytes.functional`` (its parameter names) on top of it.
"""

from jaxlora.quant.blockwise import dequantize, quantize
from jaxlora.quant.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from jaxlora.quant.bnb_functional import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from jaxlora.quant.config import QuantConfig
from jaxlora.quant.tensor import QuantizedTensor

__all__ = [
    "QuantConfig",
    "QuantizedTensor",
    "dequantize",
    "dequantize_4bit",
    "dequantize_blockwise",
    "from_bnb_state_dict",
    "quantize",
    "quantize_4bit",
    "quantize_blockwise",
    "to_bnb_state_dict",
]
