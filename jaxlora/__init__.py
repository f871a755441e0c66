"""jaxlora: LoRA and QLoRA for JAX / Flax NNX, byte-compatible with bitsandbytes and PEFT."""

from jaxlora import lora
from jaxlora.adapter import LoRAAdapter, TiedAdapter
from jaxlora.generate import generate
from jaxlora.embedding import LoRAEmbedding
from jaxlora.layers import LoRALinear, QLoRALinear, qlora_linear
from jaxlora.lora_config import LoraConfig
from jaxlora.mixed import Active, AdapterRows
from jaxlora.models import (
    LlamaConfig,
    LlamaForCausalLM,
    QuantConfig,
    from_config,
    from_pretrained,
    quantize_model,
    save_pretrained,
)
from jaxlora.peft_model import (
    LoraModel,
    PeftModel,
    adapter_rows,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    get_peft_model,
    load_adapter,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
    set_adapter,
    unload,
)
from jaxlora.qlinear import FrozenBias, QuantizedLinear, QuantizedWeight
from jaxlora.qmatmul import qmatmul
from jaxlora.quant import (
    QuantizedTensor,
    dequantize,
    dequantize_4bit,
    dequantize_blockwise,
    from_bnb_state_dict,
    quantize,
    quantize_4bit,
    quantize_blockwise,
    to_bnb_state_dict,
)

__all__ = [
    "Active",
    "AdapterRows",
    "FrozenBias",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoRAAdapter",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "QLoRALinear",
    "QuantConfig",
    "QuantizedLinear",
    "QuantizedTensor",
    "QuantizedWeight",
    "TiedAdapter",
    "adapter_rows",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "dequantize",
    "dequantize_4bit",
    "dequantize_blockwise",
    "from_bnb_state_dict",
    "from_config",
    "from_pretrained",
    "generate",
    "get_peft_model",
    "load_adapter",
    "lora",
    "merge_and_unload",
    "print_trainable_parameters",
    "qmatmul",
    "qlora_linear",
    "quantize",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_model",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
    "to_bnb_state_dict",
    "unload",
]
