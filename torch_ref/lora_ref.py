"""PyTorch references for LoRA: the seed's `LoRALayer`, PEFT's LoRA Linear (dense and over a
bitsandbytes Linear4bit), and PEFT's LoftQ loop runnable on CPU. Built through public APIs
(``get_peft_model``), so the parity tests exercise what a PEFT user runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LoRALayer(nn.Module):
    """LoRA adapter from seed 000 ("Day 19: Understanding LoRA and QLoRA"): freeze the original
    weights, train only the low-rank matrices. Kept as the seed wrote it (kaiming-normal A)."""

    def __init__(self, original_layer, rank=8, alpha=16):
        super().__init__()
        in_features = original_layer.in_features
        out_features = original_layer.out_features
        self.original = original_layer
        self.original.weight.requires_grad = False
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_normal_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.original(x) + self.lora_B(self.lora_A(x)) * self.scaling


class _Wrap(nn.Module):
    """A one-layer model for get_peft_model to target (``target_modules=["proj"]``)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def dense_linear(weight, bias=None) -> nn.Linear:
    """nn.Linear from an (out, in) weight and an optional (out,) bias, float32."""
    out_f, in_f = np.shape(weight)
    lin = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(_t(weight))
        if bias is not None:
            lin.bias.copy_(_t(bias))
    return lin


def peft_model(base: nn.Module, *, loaded_in_4bit: bool = False, adapter_name: str = "default", **lora_config):
    """PEFT model around one layer; returns (peft_model, lora_layer). ``lora_config`` is LoraConfig's."""
    from peft import LoraConfig, get_peft_model

    wrap = _Wrap(base)
    wrap.is_loaded_in_4bit = loaded_in_4bit  # what transformers sets; selects PEFT's bnb Linear4bit class
    model = get_peft_model(wrap, LoraConfig(target_modules=["proj"], **lora_config), adapter_name=adapter_name)
    return model, model.base_model.model.proj


def linear4bit(weight, bias=None, *, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
               blocksize=64):
    """bnb.nn.Linear4bit quantized on CPU from an (out, in) float32 weight.

    The AVX512-BF16 eval-mode repacking path is switched off (spec "TRAP"), so outputs and the
    state dict stay those of the standard format.
    """
    import bitsandbytes as bnb

    out_f, in_f = np.shape(weight)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=compress_statistics, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(_t(weight), requires_grad=False, compress_statistics=compress_statistics,
                                     quant_type=quant_type, blocksize=blocksize)
    if bias is not None:
        layer.bias = nn.Parameter(_t(bias), requires_grad=False)
    layer = layer.to("cpu")  # quantizes (bitsandbytes quantizes on device moves)
    layer.support_avx512bf16_for_cpu = False
    return layer


def loftq_cpu(weight, *, r: int, num_iter: int = 1):
    """PEFT's ``loftq_utils.loftq_init`` loop, on CPU: that function hard-codes a "cuda"/"xpu" compute
    device. Same calls otherwise: Params4bit NF4 (blocksize 64, no double quantization),
    ``dequantize_4bit``, and PEFT's own ``_low_rank_decomposition``. Returns (deq Q, lora_A, lora_B)."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    w = _t(weight)
    res = w.clone()
    for i in range(num_iter):
        q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        res = w - deq
        out = _low_rank_decomposition(res, reduced_rank=r)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = w - torch.mm(L, R)
    return deq, R, L
