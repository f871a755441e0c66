"""`LlamaConfig`: the fields of a Hugging Face llama / mistral / qwen2 ``config.json`` that the model uses.

`from_hf_dict` reads both config formats in the wild: transformers 4's ``rope_theta`` + ``rope_scaling``
and transformers 5's ``rope_parameters``. `to_hf_dict` writes the transformers 4 form, which both
versions read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jaxlora.checks import number

ModelType = Literal["llama", "mistral", "qwen2"]
MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# RoPE variants implemented in `attention.rope_inv_freq`; transformers' modeling_rope_utils has more.
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling (transformers' ``rope_scaling`` / ``rope_parameters`` minus ``rope_theta``)."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # "linear" and "llama3": divide (low) frequencies by this
    low_freq_factor: float = 1.0  # "llama3" only (Llama 3.1 uses 1)
    high_freq_factor: float = 4.0  # "llama3" only (Llama 3.1 uses 4)
    original_max_position_embeddings: int | None = None  # "llama3": the pre-training context length

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            number(f"rope_scaling.{name}", getattr(self, name), gt=0)
        number("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
               integer=True, gt=0, none=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """A llama-family architecture; field names and defaults are transformers' ``LlamaConfig``'s."""

    model_type: ModelType = "llama"  # "qwen2" adds q/k/v biases; "mistral" a sliding window
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None means = num_attention_heads
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # llama: bias on q/k/v/o (qwen2 always has q/k/v biases, never o)
    mlp_bias: bool = False  # llama: bias on gate/up/down
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' matrix
    sliding_window: int | None = None  # attend to the last `sliding_window` keys on sliding layers
    # Per layer "full_attention" or "sliding_attention"; None means every layer slides iff sliding_window.
    layer_types: tuple[str, ...] | None = None
    initializer_range: float = 0.02  # std of the normal init of a freshly built model
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        # Types and ranges first: a bad value here otherwise surfaces as a deep jax error or NaN logits.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            number(name, getattr(self, name), integer=True, gt=0)
        for name in ("num_key_value_heads", "head_dim", "sliding_window"):
            number(name, getattr(self, name), integer=True, gt=0, none=True)
        number("rms_norm_eps", self.rms_norm_eps, gt=0)
        number("rope_theta", self.rope_theta, gt=0)
        number("initializer_range", self.initializer_range, ge=0)
        number("bos_token_id", self.bos_token_id, integer=True, ge=0, none=True)
        number("pad_token_id", self.pad_token_id, integer=True, none=True)  # some llama configs say -1
        for eos in self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,):
            number("eos_token_id", eos, integer=True, ge=0, none=True)
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                             f"{self.num_attention_heads} (and no head_dim is given)")
        # Resolve transformers' "None means derived" fields once, so equal architectures compare equal.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_scaling.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "llama3":
            if self.rope_scaling.original_max_position_embeddings is None:
                raise ValueError("rope_type 'llama3' needs original_max_position_embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is not None and not set(self.layer_types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"layer_types={list(self.layer_types)!r}: each must be 'full_attention' or "
                             "'sliding_attention'")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Reads a ``config.json`` dict; unknown keys are ignored, unsupported values raise ValueError
        naming the key."""
        if not isinstance(d, dict):
            raise ValueError(f"a config.json must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; the llama family uses 'silu'")
        if d.get("pretraining_tp", 1) != 1:
            raise ValueError("pretraining_tp != 1 is not supported")
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling", "layer_types"}
        kw: dict[str, Any] = {k: d[k] for k in fields if k in d}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        # transformers 5 folds rope_theta into rope_parameters; 4 keeps rope_scaling beside rope_theta.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_scaling / rope_parameters={rope!r} must be an object or null")
        rope = dict(rope)
        theta = number("rope_theta", rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0, gt=0)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        known = {f.name for f in dataclasses.fields(RopeScaling)}
        extra = set(rope) - known
        if rope_type not in ROPE_TYPES or extra - {"attention_factor"}:
            raise ValueError(f"unsupported rope scaling {d.get('rope_parameters') or d.get('rope_scaling')}; "
                             f"supported rope_type: {', '.join(ROPE_TYPES)}")
        rope.pop("attention_factor", None)
        kw["rope_theta"] = float(theta)
        kw["rope_scaling"] = None if rope_type == "default" else RopeScaling(rope_type=rope_type, **rope)
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            kw["sliding_window"] = None  # qwen2 configs carry a window that is off unless use_sliding_window
        if kw.get("sliding_window") is not None and d.get("layer_types") is not None:
            if not isinstance(d["layer_types"], list):
                raise ValueError(f"layer_types={d['layer_types']!r} must be a list, one entry per layer")
            kw["layer_types"] = tuple(d["layer_types"])
        elif kw.get("sliding_window") is not None and model_type == "qwen2":
            first = d.get("max_window_layers", 28)  # transformers' Qwen2Config: layers >= this slide
            number("max_window_layers", first, integer=True, ge=0)
            n = number("num_hidden_layers", kw.get("num_hidden_layers", 32), integer=True, gt=0)
            kw["layer_types"] = tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers 4 and 5 read back into the same architecture."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["hidden_act"] = "silu"
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["rope_scaling"] = None if self.rope_scaling is None else dataclasses.asdict(self.rope_scaling)
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        else:
            del d["layer_types"]
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            del d["attention_bias"], d["mlp_bias"]
        return d
