"""The llama family (Llama, Mistral, Qwen2) in Flax NNX, its Hugging Face checkpoints, and quantization."""

from jaxlora.models.config import LlamaConfig, RopeScaling
from jaxlora.models.hf_files import load_config
from jaxlora.models.llama import KVCache, LlamaForCausalLM
from jaxlora.models.loading import from_config, from_pretrained, save_pretrained, state_dict
from jaxlora.models.quantize import QuantConfig, quantize_model

__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "QuantConfig",
    "RopeScaling",
    "from_config",
    "from_pretrained",
    "load_config",
    "quantize_model",
    "save_pretrained",
    "state_dict",
]
