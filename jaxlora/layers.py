"""NNX layers: `LoRALinear`, a frozen base plus named adapters, and `qlora_linear`, which builds one over 4 bits.

The layer reads its base only through `jaxlora.base.LinearBase` (dense kernel, unbiased product, bias,
set-kernel, the dense layer `merge_and_unload` returns): an ``nnx.Linear`` through `DenseBase`, a
`QuantizedLinear` by itself. Trainability is a type: adapter weights are ``nnx.LoRAParam``; a quantized base
stores `QuantizedWeight` / `FrozenBias`, neither an ``nnx.Param``; a dense base's kernel is an ``nnx.Param``.
Train with ``wrt=nnx.LoRAParam``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import inits, lora
from jaxlora.adapter import Adapter, LoRAAdapter, TiedAdapter
from jaxlora.base import DenseBase, LinearBase, as_base
from jaxlora.mixed import Active, AdapterRows, Selection, only, where_rows
from jaxlora.qlinear import QuantizedLinear
from jaxlora.quant.config import QuantConfig


def wide_add(y: jax.Array, extra: jax.Array) -> jax.Array:
    """y + extra in the wider of the two dtypes, rounded to y's (PEFT: (base + lora).to(dtype)). Chosen by
    width, not jnp.promote_types, which refuses bf16 + f32 under strict promotion."""
    wide = max((y.dtype, extra.dtype), key=lambda d: jnp.finfo(d).bits)
    return (y.astype(wide) + extra.astype(wide)).astype(y.dtype)


def set_bias_trainable(base: nnx.Module, trainable: bool) -> None:
    """PEFT's ``bias="all"`` / ``"lora_only"``: the base bias trains. Trainability is the variable's type:
    ``nnx.LoRAParam`` (what ``wrt=nnx.LoRAParam`` selects), else the base's frozen type (its ``frozen_bias``:
    `FrozenBias` for a `QuantizedLinear`; ``nnx.Param`` for a dense layer, adapted or not). The value is kept."""
    if base.bias is None:
        return
    kind = nnx.LoRAParam if trainable else getattr(base, "frozen_bias", nnx.Param)
    if type(base.bias) is not kind:
        base.bias = kind(base.bias.get_value())


class LoRALinear(nnx.Module):
    """A frozen linear base plus named LoRA adapters. Which one runs is the caller's choice, passed with each
    call (`jaxlora.mixed.Selection`: a `jaxlora.PeftModel` owns the active adapter); on its own a layer with
    one adapter runs it. The layer owns only its adapters and which of them is merged into its base.

    ``y = base(x) + scale * (dropout(x) @ A) @ B`` (DoRA rescales per output feature). Knobs are named
    as PEFT's ``LoraConfig``. The sum is formed in the promoted dtype of the base output and the adapter
    (float32) and cast back to the base output's dtype, as PEFT's ``lora.Linear``. `base` is an
    ``nnx.Linear`` (held as a `DenseBase` with copies of its variables: the caller's layer is not edited) or
    any `LinearBase` (a `QuantizedLinear`), kept at ``.base``. ``init_lora_weights`` may also be a
    `jaxlora.inits.BaseInit`.
    """

    base_kind = LinearBase  # what `base` must implement (jaxlora.base)

    def __init__(self, base: nnx.Module, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, init_lora_weights: lora.InitLoraWeights = True,
                 loftq_iter: int = 1, adapter_name: str = "default", param_dtype=jnp.float32,
                 tied: LoRAAdapter | None = None, rngs: nnx.Rngs):
        self.base = as_base(base)
        if not isinstance(self.base, self.base_kind):
            raise TypeError(f"{type(self).__name__} cannot adapt a {type(base).__name__}: it needs a "
                            f"{self.base_kind.__name__} (jaxlora.base)")
        self.adapters = nnx.Dict()
        self.merged_adapters: tuple[str, ...] = ()
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init_lora_weights,
                         loftq_iter=loftq_iter, param_dtype=param_dtype, tied=tied, rngs=rngs)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # --- adapters -------------------------------------------------------------------------------------

    def add_adapter(self, name: str, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init_lora_weights: lora.InitLoraWeights = True, loftq_iter: int = 1,
                    param_dtype=jnp.float32, tied: LoRAAdapter | None = None, rngs: nnx.Rngs) -> Adapter:
        """Add an adapter (which adapter runs is the caller's choice, see `_selected`). `tied`: a tied
        embedding's adapter this layer (a tied head) reads instead of drawing its own (`TiedAdapter`: its
        weights, init and dtype are the embedding's; `r` must be the embedding's, no DoRA)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        if tied is None:
            adapter = self._new_adapter(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                        use_rslora=use_rslora, use_dora=use_dora,
                                        init_lora_weights=init_lora_weights, loftq_iter=loftq_iter,
                                        param_dtype=param_dtype, rngs=rngs)
        else:
            adapter = self._tied_adapter(tied, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                         use_rslora=use_rslora, use_dora=use_dora, rngs=rngs)
        self.adapters[name] = adapter
        return adapter

    def _tied_adapter(self, source: LoRAAdapter, *, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                      rngs) -> TiedAdapter:
        """A `TiedAdapter` over `source`, the adapter of the embedding whose table this layer's base (a tied
        head, `shared_weight`) reads transposed."""
        if not self.base.shared_weight:
            raise ValueError(f"a tied adapter reads an embedding's adapter for a tied output head "
                             f"(jaxlora.models.tied.TiedHead); this layer's base is a {type(self.base).__name__}")
        if (source.in_features, source.out_features) != (self.out_features, self.in_features):
            raise ValueError(f"a tied head ({self.in_features} -> {self.out_features}) reads an embedding's adapter "
                             f"transposed, ({self.out_features} -> {self.in_features}); this source adapter is "
                             f"({source.in_features} -> {source.out_features})")
        if r != source.r or use_dora:
            raise ValueError(f"a tied head's adapter is the embedding's: it takes the embedding's r={source.r} "
                             f"and no DoRA (got r={r}, use_dora={use_dora})")
        return TiedAdapter(source, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                           rngs=rngs)

    def _new_adapter(self, *, r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights, loftq_iter,
                     param_dtype, rngs) -> LoRAAdapter:
        """PiSSA and LoftQ (`jaxlora.inits`) rewrite the base weight and need it dense: for a quantized base
        build the layer with `qlora_linear(dense_linear, ...)`, which quantizes after the init. DoRA's
        magnitude is taken from the base as it then is (quantized, for QLoRA: as PEFT)."""
        adapter = LoRAAdapter(self.in_features, self.out_features, r=r, lora_alpha=lora_alpha,
                              lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                              init_lora_weights=init_lora_weights, param_dtype=param_dtype, rngs=rngs)
        init = inits.resolve(init_lora_weights, loftq_iter=loftq_iter)
        if init is not None:
            if not isinstance(self.base, DenseBase):
                raise ValueError(f"init_lora_weights={init_lora_weights!r} needs the dense weight; build the "
                                 "layer with qlora_linear(dense_linear, ...), which quantizes after the init")
            a, b, self.base = init(self.base, r, adapter.scaling, rngs)
            adapter.set_weights(a, b)
        if use_dora:
            adapter.init_dora(self.base.dense_kernel(adapter.dtype))
        return adapter

    def _adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; have {sorted(self.adapters)}")
        return self.adapters[name]

    def _only(self) -> str:
        return only(self.adapters)

    def delete_adapter(self, name: str) -> None:
        self._adapter(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.adapters[name]

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: lora.CombinationType = "svd", svd_rank: int | None = None) -> None:
        """PEFT's ``add_weighted_adapter`` ("linear", "svd" or "cat"): a new adapter, scale 1 (r = lora_alpha)."""
        sources = [self._adapter(n) for n in adapters]
        if any(s.use_dora for s in sources):
            raise ValueError("DoRA adapters cannot be combined (their magnitude has no weighted sum)")
        if any(s.shares_delta for s in sources):
            raise ValueError(f"adapters {adapters} include a tied head's adapter (ensure_weight_tying): its weights "
                             "are the embedding's, and a combination of them would be trained and merged apart")
        triples = [(*s.weights(), s.scaling) for s in sources]
        if combination_type == "linear" or len(adapters) == 1:  # PEFT: one adapter always combines linearly
            a, b = lora.combine_linear(triples, weights)
        elif combination_type == "svd":
            a, b = lora.combine_svd(triples, weights, svd_rank)
        elif combination_type == "cat":
            a, b = lora.combine_cat(triples, weights)
        else:
            raise ValueError(f"combination_type={combination_type!r}; expected 'linear', 'svd' or 'cat'")
        rank = a.shape[1]
        new = self.add_adapter(adapter_name, r=rank, lora_alpha=rank, init_lora_weights=False,
                               param_dtype=sources[0].dtype, rngs=nnx.Rngs(0))
        new.set_weights(a, b)

    def _selected(self, adapters: Active | None) -> Adapter | None:
        """The adapter whose delta this call adds: the named one (None if this layer lacks it or the name is
        None), this layer's only one when nothing is named; none while an adapter is merged into the base."""
        name = self._only() if adapters is None else adapters.name
        if self.merged_adapters:
            if name not in self.merged_adapters:
                raise ValueError(f"adapter {self.merged_adapters[0]!r} is merged into the base, but {name!r} was "
                                 "asked to run; unmerge first")
            return None
        return self.adapters[name] if name is not None and name in self.adapters else None

    # --- forward --------------------------------------------------------------------------------------

    selects_adapters = True  # jaxlora.mixed.call passes it the selection

    def __call__(self, x: jax.Array, adapters: Selection = None) -> jax.Array:  # (..., in) -> (..., out)
        """The base plus the selected adapter's delta; with `AdapterRows` (a mixed batch, x (batch, ..., in))
        each row gets the delta of its own adapter, or none."""
        y = self.base(x)
        if isinstance(adapters, AdapterRows):
            return self._mixed(x, y, adapters)
        adapter = self._selected(adapters)
        if adapter is None:
            return y
        return wide_add(y, self._dora_delta(x, adapter) if adapter.use_dora else self._delta(adapter, x))

    def _delta(self, adapter: Adapter, x: jax.Array) -> jax.Array:
        return adapter(x)

    def _dora_delta(self, x: jax.Array, adapter: Adapter) -> jax.Array:
        h = adapter.dropped(x)
        kernel = self.base.dense_kernel(adapter.dtype)
        if adapter.dropout_active():  # PEFT recomputes the base term on the dropped-out input
            base_out = h @ jax.lax.stop_gradient(kernel)
        else:  # the base's own product without its bias (PEFT subtracts the bias from the output instead)
            base_out = self.base.matmul(x).astype(adapter.dtype)
        return lora.dora_delta(h, base_out, kernel, *adapter.weights(), adapter.magnitude.get_value(),
                               adapter.scaling)

    @staticmethod
    def _add_rows(y: jax.Array, extra: jax.Array) -> jax.Array:
        return y + extra.astype(y.dtype)  # PEFT's _mixed_batch_forward: result += lora_output.to(result.dtype)

    def _mixed(self, x: jax.Array, y: jax.Array, rows: AdapterRows) -> jax.Array:
        """PEFT's ``_mixed_batch_forward``; a row whose adapter this layer lacks (or the base) keeps y."""
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged; unmerge before a mixed-adapter batch "
                             "(adapter_names), as PEFT requires")
        out = y
        for name, adapter in self.adapters.items():
            mask = rows.mask(name)
            if mask is None:
                continue
            if adapter.use_dora:
                raise ValueError(f"adapter {name!r} uses DoRA, which mixed-adapter batches do not support (as PEFT); "
                                 "build the rows with jaxlora.adapter_rows, which refuses a DoRA adapter's name")
            out = where_rows(mask, self._add_rows(out, self._delta(adapter, x)), out)
        return out

    # --- merging --------------------------------------------------------------------------------------

    def _merged_kernel(self, adapter: Adapter) -> tuple[jax.Array, jax.Array | None]:
        """The base kernel ``(in, out)`` with `adapter` folded in (adapter dtype), and DoRA's weight norm."""
        kernel = self.base.dense_kernel(adapter.dtype)
        a, b = adapter.weights()
        if adapter.use_dora:
            return lora.dora_merge(kernel, a, b, adapter.magnitude.get_value(), adapter.scaling)
        return lora.merge(kernel, a, b, adapter.scaling), None

    def merge(self, name: str | None = None) -> None:
        """Fold adapter `name` (default: the only one) into the base (`set_kernel`). A quantized base is
        re-quantized with the config its weight records (as PEFT does; `QuantizedLinear.requantize`): the
        merged weight carries a fresh quantization error, measured in tests/test_layers.py. A tied head's
        adapter (`TiedAdapter`) writes nothing: its delta is the embedding's, which that layer's merge writes
        into the table this head reads (merge both, as `jaxlora.PeftModel.merge_adapter` does)."""
        if self.merged_adapters:
            raise ValueError(f"adapter {self.merged_adapters[0]!r} is already merged")
        name = self._only() if name is None else name
        adapter = self._adapter(name)
        if not adapter.shares_delta:
            kernel, norm = self._merged_kernel(adapter)
            if adapter.use_dora:  # unmerging divides by the norm the merge used
                adapter.dora_norm.set_value(norm)
            self.base.set_kernel(kernel)
        self.merged_adapters = (name,)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            raise ValueError("no adapter is merged")
        adapter = self.adapters[self.merged_adapters[0]]
        if adapter.shares_delta:  # the embedding's unmerge takes the delta out of the shared table
            self.merged_adapters = ()
            return
        kernel = self.base.dense_kernel(adapter.dtype)
        a, b = adapter.weights()
        if adapter.use_dora:
            norm = adapter.dora_norm.get_value()
            kernel = lora.dora_unmerge(kernel, a, b, adapter.magnitude.get_value(), norm, adapter.scaling)
            adapter.dora_norm.set_value(jnp.zeros_like(norm))
        else:
            kernel = lora.unmerge(kernel, a, b, adapter.scaling)
        self.base.set_kernel(kernel)
        self.merged_adapters = ()

    def unload(self) -> nnx.Module:
        """The base layer without adapters (nothing merged into it): a plain ``nnx.Linear`` / ``nnx.Embed``,
        or the `QuantizedLinear` itself."""
        if self.merged_adapters:
            self.unmerge()
        return self.base.unwrap()

    def merge_and_unload(self, name: str | None = None, *, requantize: bool = False) -> nnx.Module:
        """The base with adapter `name` (default: the merged one, else the only one) folded in, the same
        whether or not `merge` ran first.

        By default a plain dense layer (``nnx.Linear``, or ``nnx.Embed``) holding W + delta in W's dtype: a
        dense base's exact merge; a quantized base's dequantize(W) + delta, no new quantization error (if
        `merge` already ran, W holds the merged weight and is only dequantized). ``requantize=True`` keeps a
        `QuantizedLinear` and re-quantizes W + delta, as PEFT's bitsandbytes merge does. This layer is left
        as it was, unless ``requantize=True`` merges it, or the base's weight is shared (an embedding's
        table, a tied head): then it is merged, so every reader of the weight sees the merged matrix.
        """
        if requantize or self.base.shared_weight:
            if not self.merged_adapters:
                self.merge(name)
            return self.base.unwrap()
        if self.merged_adapters:  # the delta is already in W
            return self.base.to_dense()
        kernel, _ = self._merged_kernel(self._adapter(self._only() if name is None else name))
        return self.base.to_dense(kernel)

    # --- PEFT layout ----------------------------------------------------------------------------------

    def peft_state(self, name: str | None = None) -> dict[str, jax.Array]:
        """``{"lora_A.weight": (r, in), "lora_B.weight": (out, r)[, "lora_magnitude_vector": (out,)]}``."""
        return self._adapter(name or self._only()).to_peft()

    def load_peft_state(self, tensors: dict[str, jax.Array], name: str | None = None) -> None:
        self._adapter(name or self._only()).load_peft(tensors)


def qlora_linear(base: nnx.Linear | QuantizedLinear, quantization: QuantConfig | None = None, *,
                 init_lora_weights: lora.InitLoraWeights = True, loftq_iter: int = 1, **lora_kwargs) -> LoRALinear:
    """QLoRA: a `LoRALinear` over a `QuantizedLinear`, quantized as `quantization` says.

    Given an ``nnx.Linear`` it quantizes explicitly (None: ``QuantConfig()``, NF4 + double quantization,
    blocksize 64, bfloat16 compute -- QLoRA's recipe); PiSSA runs on the dense weight and the base stores the
    quantized residual; LoftQ quantizes with this config and keeps its own last quantization (no second
    rounding). Given a `QuantizedLinear` it adapts that layer as it is: a `quantization` other than the one
    its weight records is a ValueError naming the fields (it is never re-quantized nor edited). DoRA's
    magnitude is taken from the quantized weight, as PEFT does. The caller's layer is never modified.
    """
    if quantization is not None and not isinstance(quantization, QuantConfig):
        raise TypeError(f"quantization must be a jaxlora QuantConfig, got {quantization!r}")
    if isinstance(base, QuantizedLinear):
        have = base.config
        wrong = {} if quantization is None else {
            f.name: (getattr(have, f.name), getattr(quantization, f.name)) for f in dataclasses.fields(QuantConfig)
            if f.name != "skip_modules" and getattr(have, f.name) != getattr(quantization, f.name)}
        if wrong:
            shown = ", ".join(f"{k}={getattr(v, 'name', v)!r} (asked {getattr(a, 'name', a)!r})"
                              for k, (v, a) in wrong.items())
            raise ValueError(f"qlora_linear: the base is already quantized with {shown}; pass a dense nnx.Linear to "
                             "quantize it, or quantization=None to take the base as it is")
        return LoRALinear(base, init_lora_weights=init_lora_weights, loftq_iter=loftq_iter, **lora_kwargs)
    quantization = QuantConfig() if quantization is None else quantization
    init = inits.resolve(init_lora_weights, loftq_iter=loftq_iter, quantization=quantization)
    if init is None:  # A and B are drawn: the base is quantized now
        qbase = QuantizedLinear.from_linear(base, quantization)
        return LoRALinear(qbase, init_lora_weights=init_lora_weights, **lora_kwargs)
    return LoRALinear(base, init_lora_weights=init, **lora_kwargs)  # the init returns the quantized base


QLoRALinear = qlora_linear  # its name when it was a class, kept importable (README Changelog, 2026-12-02)
