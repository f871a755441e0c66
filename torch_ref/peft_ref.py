"""PEFT on whole transformers models, for adapter-file parity tests. Never touches the network.

    hf = hf_ref.load_model(path)                        # or load_4bit_model(path) for QLoRA
    peft_model = load_adapter(hf, adapter_dir)          # what a PEFT user runs on our files
    peft_model = random_adapter(hf, seed=0, r=4)        # nonzero A, B (and DoRA magnitude), to save
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers


def load_adapter(model: transformers.PreTrainedModel, directory: str | os.PathLike):
    """``peft.PeftModel.from_pretrained`` in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory)).eval()


@torch.no_grad()
def random_adapter(model: transformers.PreTrainedModel, *, seed: int = 0, **lora_config):
    """``get_peft_model`` with every adapter tensor redrawn at O(1) effect: A ~ N(0, 1/in), B ~ N(0, 1/r)
    (PEFT's init has B = 0, an adapter that changes nothing), DoRA's magnitude scaled by 1 + N(0, 0.1^2), and
    biases trained under bias="all" / "lora_only" shifted by N(0, 0.1^2), copies of `modules_to_save` by half
    their initial scale."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_config))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(noise / p.shape[1] ** 0.5)
        elif "lora_embedding_" in name:  # LoRA on an embedding: PEFT's A = 0 would change nothing
            p.copy_(0.5 * noise)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * noise)
        elif ".modules_to_save." in name:  # a module trained in full: its copy moves off the original
            p.add_(0.5 * noise / (p.shape[-1] ** 0.5 if p.ndim == 2 and "embed" not in name else 1.0))
        elif name.endswith(".bias") and p.requires_grad:  # bias="all" / "lora_only": the trained base bias moves
            p.add_(0.1 * noise)
    return peft_model.eval()


def load_4bit_model(directory: str | os.PathLike, *, compute_dtype: torch.dtype = torch.float32,
                    double_quant: bool = True) -> transformers.PreTrainedModel:
    """transformers + bitsandbytes NF4 (QLoRA's recipe) on CPU, eval mode, eager attention. The AVX512-BF16
    eval path repacks weights and changes outputs (spec "TRAP"): switched off on every Linear4bit."""
    import bitsandbytes as bnb

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=double_quant,
                                            bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        Path(directory), quantization_config=quant, dtype=torch.float32, attn_implementation="eager",
        local_files_only=True, device_map="cpu",
    ).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
