"""`LoraConfig`: PEFT's ``LoraConfig`` fields that jaxlora implements, validated once, plus PEFT's matching rules.

Field names, defaults (except ``target_modules``) and matching semantics are peft 0.21's
(``tuners/lora/config.py``, ``tuners/tuners_utils.check_target_module_exists``,
``utils/other.get_pattern_key``), so an ``adapter_config.json`` means the same thing on both sides.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from jaxlora.checks import number
from jaxlora.lora import pissa_niter

ALL_LINEAR = "all-linear"
INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "pissa_niter_[n]", "loftq")
TaskType = Literal["CAUSAL_LM"]
Bias = Literal["none", "all", "lora_only"]
BIAS: tuple[str, ...] = ("none", "all", "lora_only")

# adapter_config.json keys that carry no behaviour jaxlora must reproduce (bookkeeping).
_INFORMATIONAL = frozenset({
    "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping", "megatron_core",
    "qalora_group_size",
})
# Every field of peft 0.21's LoraConfig. A key outside this set comes from a newer PEFT: PEFT itself warns
# and drops such keys (PeftConfig.from_peft_type), and so does `from_peft_dict`. A key inside it that
# jaxlora does not implement changes the numbers when set, so it is refused unless at its off value.
PEFT_LORA_FIELDS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
    "bias", "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
    "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
})


class FrozenMapping(Mapping):
    """A read-only dict that hashes, pickles and deep-copies (``types.MappingProxyType`` does not pickle)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping | None = None):
        object.__setattr__(self, "_items", dict(items or {}))

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name, value):
        raise AttributeError("FrozenMapping is read-only")

    def __reduce__(self):
        return FrozenMapping, (self._items,)

    def __hash__(self):  # the values are numbers: a LoraConfig hashes as the frozen dataclass it is
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def _layer_indexes(value) -> int | tuple[int, ...] | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise TypeError(f"layers_to_transform must be None, an int or a list of ints, got {value!r}")


def _layer_patterns(value) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"layers_pattern must be None, a str or a list of str, got {value!r}")


def _frozen_mapping(value: Mapping | None, what: str, check) -> FrozenMapping:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict of regex -> value, got {type(value).__name__}")
    for key, v in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be str (regexes), got {key!r}")
        _compile(key, what)
        check(key, v)
    return FrozenMapping(value)


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: {pattern!r} is not a valid regex ({e})") from e


def _names(value, what: str) -> str | tuple[str, ...] | None:
    """None, a regex string, or module names (a list in PEFT; kept as a tuple so the config hashes)."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _compile(value, what)
        return value
    if isinstance(value, Sequence | set | frozenset) and all(isinstance(v, str) for v in value):
        return tuple(sorted(value)) if isinstance(value, set | frozenset) else tuple(value)
    raise TypeError(f"{what} must be None, a regex string or a list of module names, got {value!r}")


def _positive_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"rank_pattern[{key!r}]={v!r} must be a positive int")


def _positive_number(key, v):
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
        raise ValueError(f"alpha_pattern[{key!r}]={v!r} must be a positive number")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which linear layers get an adapter, and the adapter's settings (PEFT's names and meanings).

    >>> config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    >>> config.r_for("model.layers.0.self_attn.v_proj"), config.scaling_for("model.layers.0.self_attn.q_proj")
    (4, 2.0)
    """

    r: int = 8  # rank
    lora_alpha: float = 8  # scaling = lora_alpha / r (PEFT's default alpha is 8)
    lora_dropout: float = 0.0  # dropout on the adapter's input only
    # "all-linear" (every linear layer but the output head ``lm_head``, as PEFT), module names (a name
    # matches a path equal to it or ending in "." + it) or one regex full-matched against the path.
    # Default "all-linear", not PEFT's per-architecture q_proj/v_proj: seed 003 reports that adapting
    # all linear layers beats attention-only adapters (5x the parameters, clearly better results).
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    exclude_modules: str | tuple[str, ...] | None = None  # same matching as target_modules; wins over it
    # Only layers with these indices, the first number after a `layers_pattern` segment of the path
    # ("layers" in model.layers.3.mlp.up_proj; any segment when None); needs module names in target_modules.
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # regex -> r, see `r_for`
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # regex -> lora_alpha
    use_rslora: bool = False  # scaling = lora_alpha / sqrt(r) (Kalajdzievski 2023)
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024)
    # True (B = 0), False (random B), "gaussian", "pissa", "pissa_niter_<n>" (randomized SVD), "loftq"
    init_lora_weights: bool | str = True
    loftq_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # {"loftq_iter": n} for "loftq"
    # Which base biases train beside the adapter (PEFT's names): "none", "all" (every linear layer's) or
    # "lora_only" (those of the adapted layers). They are written to the adapter file under their base names.
    bias: Bias = "none"
    # Modules trained in full beside the adapters (a copy per adapter), e.g. ["lm_head"] or ["embed_tokens"]:
    # a name matches a module path ending in it (PEFT's rule). Saved under the module's own tensor names.
    modules_to_save: tuple[str, ...] | None = None
    # On a tied model (lm_head reads embed_tokens' matrix), naming either in modules_to_save trains one copy
    # that both read, and the model stays tied after unloading (PEFT's ensure_weight_tying; README "Tied
    # embeddings"). False (PEFT's default): the named layer trains apart from the other.
    ensure_weight_tying: bool = False
    task_type: TaskType | None = "CAUSAL_LM"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive int")
        number("lora_alpha", self.lora_alpha, gt=0)
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        target = self.target_modules
        if isinstance(target, str) and target.lower() == ALL_LINEAR:
            target = ALL_LINEAR
        elif target is None:
            raise ValueError("target_modules=None: give 'all-linear', module names or a regex")
        object.__setattr__(self, "target_modules", _names(target, "target_modules"))
        object.__setattr__(self, "exclude_modules", _names(self.exclude_modules, "exclude_modules"))
        object.__setattr__(self, "rank_pattern", _frozen_mapping(self.rank_pattern, "rank_pattern", _positive_int))
        alpha_pattern = _frozen_mapping(self.alpha_pattern, "alpha_pattern", _positive_number)
        object.__setattr__(self, "alpha_pattern", alpha_pattern)
        object.__setattr__(self, "loftq_config", FrozenMapping(self.loftq_config or {}))
        for name in ("use_rslora", "use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in INIT_LORA_WEIGHTS or pissa_niter(init) is not None):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is not supported; jaxlora implements "
                             f"{', '.join(map(repr, INIT_LORA_WEIGHTS))}")
        if self.bias not in BIAS:
            raise ValueError(f"bias={self.bias!r}; expected one of {BIAS}")
        saved = self.modules_to_save
        if saved is not None and (isinstance(saved, str) or not isinstance(saved, Sequence)
                                  or not all(isinstance(n, str) and n for n in saved)):
            raise TypeError(f"modules_to_save must be None or a list of module names, got {saved!r}")
        object.__setattr__(self, "modules_to_save", None if saved is None else tuple(saved))
        object.__setattr__(self, "layers_to_transform", _layer_indexes(self.layers_to_transform))
        object.__setattr__(self, "layers_pattern", _layer_patterns(self.layers_pattern))
        if isinstance(self.target_modules, str) and (self.layers_to_transform, self.layers_pattern) != (None, None):
            raise ValueError(f"layers_to_transform / layers_pattern cannot be used when target_modules is a str "
                             f"({self.target_modules!r}); list module names instead (as PEFT requires)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform as well")
        if self.task_type not in ("CAUSAL_LM", None):
            raise ValueError(f"task_type={self.task_type!r} is not supported; jaxlora has causal LMs ('CAUSAL_LM')")
        unknown = set(self.loftq_config) - {"loftq_bits", "loftq_iter"}
        if unknown or self.loftq_config.get("loftq_bits", 4) != 4:
            raise ValueError(f"loftq_config={dict(self.loftq_config)!r}: jaxlora's LoftQ is 4-bit NF4 and takes "
                             "only loftq_bits=4 and loftq_iter")
        number("loftq_config['loftq_iter']", self.loftq_config.get("loftq_iter", 1), integer=True, ge=1)

    # --- what each module gets -------------------------------------------------------------------------

    def r_for(self, path: str) -> int:
        """The rank of the module at `path`: the first ``rank_pattern`` key matching (PEFT's get_pattern_key)."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, path), self.r)

    def alpha_for(self, path: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, path), self.lora_alpha)

    def scaling_for(self, path: str) -> float:
        r, alpha = self.r_for(path), self.alpha_for(path)
        return alpha / r**0.5 if self.use_rslora else alpha / r

    def excludes(self, path: str) -> bool:
        """Whether `exclude_modules` names `path` (then it gets no adapter, whatever target_modules says)."""
        return bool(self.exclude_modules) and _matches(self.exclude_modules, path)

    def saves(self, path: str) -> bool:
        """Whether the module at `path` is in `modules_to_save` (PEFT's ``_set_trainable``: a plain suffix)."""
        return any(path.endswith(name) for name in self.modules_to_save or ())

    def targets(self, path: str, *, is_output_head: bool = False) -> bool:
        """Whether the linear layer at `path` gets an adapter: PEFT's check_target_module_exists,
        `layers_to_transform` / `layers_pattern` included, decided from the module name alone."""
        if self.excludes(path):
            return False
        if self.target_modules == ALL_LINEAR:
            return not is_output_head
        if isinstance(self.target_modules, str) or path in self.target_modules:
            return _matches(self.target_modules, path)  # a name given in full is not filtered by layer (PEFT)
        if not _matches(self.target_modules, path):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        index = _layer_index(path, self.layers_pattern)
        if index is None:
            return False
        wanted = self.layers_to_transform
        return index == wanted if isinstance(wanted, int) else index in wanted

    # --- adapter_config.json ---------------------------------------------------------------------------

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` dict that ``peft.PeftConfig.from_pretrained`` reads."""
        names = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {
            "peft_type": "LORA", "task_type": self.task_type, "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "target_modules": names(self.target_modules),
            "exclude_modules": names(self.exclude_modules), "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern), "use_rslora": self.use_rslora, "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights, "loftq_config": dict(self.loftq_config), "bias": self.bias,
            "fan_in_fan_out": False, "modules_to_save": names(self.modules_to_save),
            "ensure_weight_tying": self.ensure_weight_tying,
            "layers_to_transform": list(self.layers_to_transform) if isinstance(self.layers_to_transform, tuple)
            else self.layers_to_transform,
            "layers_pattern": names(self.layers_pattern),
            "base_model_name_or_path": None, "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """Reads an ``adapter_config.json`` dict. Keys peft 0.21 does not know (from a newer PEFT) are
        ignored with a warning, as PEFT ignores them; a peft 0.21 field jaxlora does not implement, set
        to anything but its off value (None, False, {} or []), raises ValueError naming it."""
        if not isinstance(d, Mapping):
            raise TypeError(f"an adapter config must be a JSON object of LoraConfig fields, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type={d.get('peft_type')!r}: jaxlora reads LoRA adapters only ('LORA')")
        fields = {f.name for f in dataclasses.fields(cls)}
        newer = sorted(set(d) - PEFT_LORA_FIELDS - fields)
        if newer:
            warnings.warn(f"adapter config keys {newer} are unknown to peft 0.21's LoraConfig (a newer PEFT wrote "
                          "them?); they are ignored, as PEFT ignores them", UserWarning, stacklevel=2)
        for key, value in d.items():
            if key in fields or key in _INFORMATIONAL or key == "peft_type" or key in newer:
                continue
            if value not in (None, False, {}, []):
                raise ValueError(f"adapter config field {key}={value!r} is not supported by jaxlora")
        kw = {k: d[k] for k in fields if k in d}
        if kw.get("target_modules") is None:
            raise ValueError("adapter config has target_modules=None (PEFT's per-architecture default); "
                             "jaxlora needs explicit target_modules")
        return cls(**kw)


def _matches(names: str | tuple[str, ...], path: str) -> bool:
    if isinstance(names, str):  # one regex, full-matched against the whole path
        return re.fullmatch(names, path) is not None
    return path in names or any(path.endswith(f".{n}") for n in names)


def _layer_index(path: str, layers_pattern: str | tuple[str, ...] | None) -> int | None:
    """The layer index PEFT reads from a module name: the first number after a `layers_pattern` segment
    (after any segment when it is empty); lazy, so an MoE expert index ("layers.1.experts.0") is skipped."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def _pattern_key(patterns: Mapping[str, Any], path: str) -> str:
    """PEFT's get_pattern_key: the first key k with ``re.match(rf"(.*\\.)?({k})$", path)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return path
