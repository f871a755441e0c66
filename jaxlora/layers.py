"""NNX layers: `LoRALinear` / `QLoRALinear`, a frozen base plus named adapters.

Trainability is a type: adapter weights are ``nnx.LoRAParam``; a quantized base (`QuantizedLinear`,
jaxlora/qlinear.py) stores `QuantizedWeight` / `FrozenBias`, neither an ``nnx.Param``. A dense base stays
the user's ``nnx.Linear`` (its kernel an ``nnx.Param``), so train with ``wrt=nnx.LoRAParam``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import lora
from jaxlora.adapter import DoraNorm, LoRAAdapter
from jaxlora.mixed import AdapterRows, where_rows
from jaxlora.qlinear import FrozenBias, QuantizedLinear
from jaxlora.quant import QuantConfig, dequantize, quantize

Base = nnx.Linear | QuantizedLinear


def _kernel(base: Base, dtype) -> jax.Array:
    """The base weight as a dense kernel ``(in, out)``."""
    if isinstance(base, QuantizedLinear):
        return base.dequantize(base.weight.get_value().dtype).astype(dtype).T
    return base.kernel.get_value().astype(dtype)


def _set_kernel(base: Base, kernel: jax.Array) -> None:
    if isinstance(base, QuantizedLinear):
        base.requantize(kernel.T)
    else:
        base.kernel.set_value(kernel.astype(base.kernel.get_value().dtype))


def _merged_kernel(base: Base, adapter: LoRAAdapter) -> tuple[jax.Array, jax.Array | None]:
    """The base kernel ``(in, out)`` with `adapter` folded in, and DoRA's weight norm (else None)."""
    kernel = _kernel(base, adapter.dtype)
    a, b = adapter.lora_a.get_value(), adapter.lora_b.get_value()
    if adapter.use_dora:
        return lora.dora_merge(kernel, a, b, adapter.magnitude.get_value(), adapter.scaling)
    return lora.merge(kernel, a, b, adapter.scaling), None


def _bias(base: Base) -> jax.Array | None:
    return None if base.bias is None else base.bias.get_value()


def wide_add(y: jax.Array, extra: jax.Array) -> jax.Array:
    """y + extra in the wider of the two dtypes, rounded to y's (PEFT: (base + lora).to(dtype)). Chosen by
    width, not jnp.promote_types, which refuses bf16 + f32 under strict promotion."""
    wide = max((y.dtype, extra.dtype), key=lambda d: jnp.finfo(d).bits)
    return (y.astype(wide) + extra.astype(wide)).astype(y.dtype)


def set_bias_trainable(base: Base, trainable: bool) -> None:
    """PEFT's ``bias="all"`` / ``"lora_only"``: the base bias trains. Trainability is the variable's type:
    ``nnx.LoRAParam`` (what ``wrt=nnx.LoRAParam`` selects), else the base's frozen type (``nnx.Param`` of a
    dense ``nnx.Linear``, `FrozenBias` of a `QuantizedLinear`). The value is kept, not copied or cast."""
    if base.bias is None:
        return
    kind = nnx.LoRAParam if trainable else FrozenBias if isinstance(base, QuantizedLinear) else nnx.Param
    if type(base.bias) is not kind:
        base.bias = kind(base.bias.get_value())


class LoRALinear(nnx.Module):
    """A frozen linear base plus named LoRA adapters; one active at a time.

    ``y = base(x) + scale * (dropout(x) @ A) @ B`` (DoRA rescales per output feature). Knobs are named
    as PEFT's ``LoraConfig``. The sum is formed in the promoted dtype of the base output and the adapter
    (float32) and cast back to the base output's dtype, as PEFT's ``lora.Linear``.
    """

    def __init__(self, base: Base, *, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, init_lora_weights: lora.InitLoraWeights = True,
                 loftq_iter: int = 1, adapter_name: str = "default", param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.base = base
        self.adapters = nnx.Dict()
        self.active_adapter: str | None = adapter_name
        self.disabled = False
        self.merged_adapters: tuple[str, ...] = ()
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init_lora_weights,
                         loftq_iter=loftq_iter, param_dtype=param_dtype, rngs=rngs)

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
                    param_dtype=jnp.float32, rngs: nnx.Rngs) -> LoRAAdapter:
        """Add an adapter (not activated, as PEFT; the constructor's first one is). PiSSA and LoftQ
        rewrite the base weight and need it dense: for a quantized base use `QLoRALinear`."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        adapter = LoRAAdapter(self.in_features, self.out_features, r=r, lora_alpha=lora_alpha,
                              lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                              init_lora_weights=init_lora_weights, param_dtype=param_dtype, rngs=rngs)
        niter = lora.pissa_niter(init_lora_weights)
        if init_lora_weights in ("pissa", "loftq") or niter is not None:
            if not isinstance(self.base, nnx.Linear):
                raise ValueError(f"init_lora_weights={init_lora_weights!r} needs the dense weight; build the "
                                 "layer with QLoRALinear(dense_linear, ...), which quantizes after the init")
            kernel = self.base.kernel.get_value()
            if init_lora_weights == "pissa" or niter is not None:  # the fast SVD draws its sketch from rngs
                key = None if niter is None else rngs.params()
                a, b, kernel = lora.pissa(kernel, r, adapter.scaling, niter=niter, key=key)
            else:  # PEFT's LoftQ quantizes with NF4, blocksize 64, no double quantization
                config = QuantConfig(quant_type="nf4", blocksize=64, double_quant=False)

                def quantize_as_peft(w, dtype=kernel.dtype):
                    return quantize(w.astype(dtype), config)

                qt, a, b = lora.loftq(kernel.T, r, quantize_as_peft, dequantize, num_iter=loftq_iter)
                kernel = dequantize(qt, jnp.float32).T.astype(kernel.dtype)
            self.base.kernel.set_value(kernel)
            adapter.set_weights(a, b)
        if use_dora:
            adapter.init_dora(_kernel(self.base, adapter.dtype))
        self.adapters[name] = adapter
        return adapter

    def _adapter(self, name: str) -> LoRAAdapter:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; have {sorted(self.adapters)}")
        return self.adapters[name]

    def set_adapter(self, name: str) -> None:
        self._adapter(name)
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged; unmerge before switching")
        self.active_adapter = name

    def disable_adapter_layers(self) -> None:
        """Base output only. Unmerges first, as PEFT does."""
        if self.merged_adapters:
            self.unmerge()
        self.disabled = True

    def enable_adapter_layers(self) -> None:
        self.disabled = False

    def delete_adapter(self, name: str) -> None:
        self._adapter(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.adapters[name]
        if self.active_adapter == name:  # PEFT activates the first remaining adapter
            self.active_adapter = next(iter(self.adapters), None)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: lora.CombinationType = "svd", svd_rank: int | None = None) -> None:
        """PEFT's ``add_weighted_adapter`` ("linear", "svd" or "cat"): a new adapter, scale 1 (r = lora_alpha)."""
        sources = [self._adapter(n) for n in adapters]
        if any(s.use_dora for s in sources):
            raise ValueError("DoRA adapters cannot be combined (their magnitude has no weighted sum)")
        triples = [(s.lora_a.get_value(), s.lora_b.get_value(), s.scaling) for s in sources]
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

    def _active(self) -> LoRAAdapter | None:
        if self.disabled or self.merged_adapters or self.active_adapter is None:
            return None
        return self.adapters[self.active_adapter]

    # --- forward --------------------------------------------------------------------------------------

    routes_adapter_rows = True  # jaxlora.mixed.call passes it a mixed batch's rows

    def __call__(self, x: jax.Array, rows: AdapterRows | None = None) -> jax.Array:  # (..., in) -> (..., out)
        """The base plus the active adapter's delta; with `rows` (a mixed batch, x (batch, ..., in)) each row
        gets the delta of its own adapter, or none."""
        y = self.base(x)
        if rows is not None:
            return self._mixed(x, y, rows)
        adapter = self._active()
        if adapter is None:
            return y
        return wide_add(y, self._dora_delta(x, y, adapter) if adapter.use_dora else self._delta(adapter, x))

    def _delta(self, adapter: LoRAAdapter, x: jax.Array) -> jax.Array:
        return adapter(x)

    def _dora_delta(self, x: jax.Array, y: jax.Array, adapter: LoRAAdapter) -> jax.Array:
        h = adapter.dropped(x)
        kernel = _kernel(self.base, adapter.dtype)
        if adapter.dropout_active():  # PEFT recomputes the base term on the dropped-out input
            base_out = h @ jax.lax.stop_gradient(kernel)
        else:
            bias = _bias(self.base)
            base_out = y.astype(adapter.dtype)
            if bias is not None:
                base_out = base_out - jnp.broadcast_to(bias.astype(adapter.dtype), base_out.shape)
        return lora.dora_delta(h, base_out, kernel, adapter.lora_a.get_value(), adapter.lora_b.get_value(),
                               adapter.magnitude.get_value(), adapter.scaling)

    @staticmethod
    def _add_rows(y: jax.Array, extra: jax.Array) -> jax.Array:
        return y + extra.astype(y.dtype)  # PEFT's _mixed_batch_forward: result += lora_output.to(result.dtype)

    def _mixed(self, x: jax.Array, y: jax.Array, rows: AdapterRows) -> jax.Array:
        """PEFT's ``_mixed_batch_forward``; a row whose adapter this layer lacks (or the base) keeps y."""
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged; unmerge before a mixed-adapter batch "
                             "(adapter_names), as PEFT requires")
        if self.disabled:  # PEFT: disabled adapters win over adapter_names
            return y
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

    def merge(self) -> None:
        """Fold the active adapter into the base. A quantized base is re-quantized with its own settings
        (as PEFT does; bitsandbytes' "cpu" bytes, see `QuantizedLinear.requantize`): the merged weight
        carries a fresh quantization error, measured in tests/test_layers.py."""
        if self.merged_adapters:
            raise ValueError(f"adapter {self.merged_adapters[0]!r} is already merged")
        adapter = self._adapter(self.active_adapter)
        kernel, norm = _merged_kernel(self.base, adapter)
        if adapter.use_dora:
            adapter.dora_norm = DoraNorm(norm)
        _set_kernel(self.base, kernel)
        self.merged_adapters = (self.active_adapter,)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            raise ValueError("no adapter is merged")
        adapter = self.adapters[self.merged_adapters[0]]
        kernel = _kernel(self.base, adapter.dtype)
        a, b = adapter.lora_a.get_value(), adapter.lora_b.get_value()
        if adapter.use_dora:
            magnitude, norm = adapter.magnitude.get_value(), adapter.dora_norm.get_value()
            kernel = lora.dora_unmerge(kernel, a, b, magnitude, norm, adapter.scaling)
            adapter.dora_norm = None
        else:
            kernel = lora.unmerge(kernel, a, b, adapter.scaling)
        _set_kernel(self.base, kernel)
        self.merged_adapters = ()

    def unload(self) -> Base:
        """The base layer without adapters (nothing merged into it)."""
        if self.merged_adapters:
            self.unmerge()
        return self.base

    def merge_and_unload(self, *, requantize: bool = False) -> Base:
        """The base with the active adapter folded in, the same whether or not `merge` ran first.

        A dense base is merged in place and returned. A quantized base becomes an ``nnx.Linear``
        holding dequantize(W) + delta in W's original dtype: no new quantization error (if `merge`
        already ran, W holds the merged weight and is only dequantized). ``requantize=True`` keeps
        the `QuantizedLinear` and re-quantizes W + delta, as PEFT's bitsandbytes merge does.
        """
        if not isinstance(self.base, QuantizedLinear) or requantize:
            if not self.merged_adapters:
                self.merge()
            return self.base
        dtype = self.base.weight.get_value().dtype
        if self.merged_adapters:  # the delta is already in W
            kernel = _kernel(self.base, dtype)
        else:
            kernel, _ = _merged_kernel(self.base, self._adapter(self.active_adapter))
        dense = nnx.Linear(self.in_features, self.out_features, use_bias=self.base.bias is not None,
                           param_dtype=dtype, rngs=nnx.Rngs(0))
        dense.kernel.set_value(kernel.astype(dtype))
        if self.base.bias is not None:
            dense.bias.set_value(self.base.bias.get_value().astype(dtype))
        return dense

    # --- PEFT layout ----------------------------------------------------------------------------------

    def peft_state(self, name: str | None = None) -> dict[str, jax.Array]:
        """``{"lora_A.weight": (r, in), "lora_B.weight": (out, r)[, "lora_magnitude_vector": (out,)]}``."""
        return self._adapter(name or self.active_adapter).to_peft()

    def load_peft_state(self, tensors: dict[str, jax.Array], name: str | None = None) -> None:
        self._adapter(name or self.active_adapter).load_peft(tensors)


class QLoRALinear(LoRALinear):
    """LoRA over a 4-bit base. Given an ``nnx.Linear`` it quantizes explicitly (NF4 + double
    quantization by default, QLoRA's recipe). PiSSA runs on the dense weight and the base stores the
    quantized residual; LoftQ quantizes with this layer's settings and keeps its own last quantization
    (no second rounding); DoRA's magnitude is taken from the quantized weight, as PEFT does.

    ``compute_dtype`` (None: bfloat16 for a dense base) is the base matmul's dtype. Given an already
    quantized base, None keeps the base's own; a dtype is applied to that base (which this layer then
    owns). The quantization settings apply only when quantizing a dense base."""

    def __init__(self, base: Base, *, r: int = 8, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, compute_dtype=None,
                 init_lora_weights: lora.InitLoraWeights = True, use_dora: bool = False, loftq_iter: int = 1,
                 **lora_kwargs):
        if isinstance(base, QuantizedLinear):
            if compute_dtype is not None:
                base.weight.set_value(base.weight.get_value().with_config(compute_dtype=jnp.dtype(compute_dtype)))
            super().__init__(base, r=r, init_lora_weights=init_lora_weights, use_dora=use_dora, **lora_kwargs)
            return
        config = QuantConfig(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                             compute_dtype=jnp.bfloat16 if compute_dtype is None else compute_dtype)
        if init_lora_weights == "loftq":
            kernel = base.kernel.get_value()
            qt, a, b = lora.loftq(kernel.T, r, lambda w: quantize(w.astype(kernel.dtype), config), dequantize,
                                  num_iter=loftq_iter)
            qbase = QuantizedLinear(qt, _bias(base))
            super().__init__(qbase, r=r, init_lora_weights=True, **lora_kwargs)
            self.adapters[self.active_adapter].set_weights(a, b)
        else:  # PiSSA (if asked) rewrites the dense kernel; the residual is what gets quantized
            super().__init__(base, r=r, init_lora_weights=init_lora_weights, **lora_kwargs)
            self.base = QuantizedLinear.from_linear(base, config)
        if use_dora:
            adapter = self.adapters[self.active_adapter]
            adapter.use_dora = True
            adapter.init_dora(_kernel(self.base, adapter.dtype))

    @classmethod
    def from_linear(cls, linear: nnx.Linear, **kwargs) -> QLoRALinear:
        """``QLoRALinear(linear, **kwargs)``: quantize an ``nnx.Linear`` and attach an adapter."""
        return cls(linear, **kwargs)
