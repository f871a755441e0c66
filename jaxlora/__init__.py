"""jaxlora: LoRA and QLoRA for JAX / Flax NNX, byte-compatible with bitsandbytes and PEFT."""

from jaxlora.quant.tensor import QuantizedTensor

__all__ = ["QuantizedTensor"]
