"""`LoRAAdapter`: one named adapter's trainable state -- A, B, DoRA's magnitude -- and its settings; and
`TiedAdapter`, a tied output head's adapter that reads the embedding's.

A `LoRALinear` holds several of these in an ``nnx.Dict``; each is a module, not a dict of settings.
Weights are ``nnx.LoRAParam`` (float32 by default, as PEFT keeps them), so
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` moves them and nothing else. A layer reads an adapter's
A and B only through `Adapter.weights` and writes them through `Adapter.set_weights`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import lora


class DoraNorm(nnx.Variable):
    """The weight norm ``(out,)`` DoRA used when merging (zeros while unmerged); unmerging divides by the
    same norm. Not trainable."""


class Adapter(nnx.Module):
    """What a LoRA layer reads of an adapter: ``scale * (dropout(x) @ a) @ b`` with a ``(in, r)``, b ``(r, out)``
    (`weights`), its settings, and PEFT's layout. `LoRAAdapter` owns its A and B; `TiedAdapter` reads another
    adapter's. Subclasses set in_features, out_features, r, lora_alpha, use_rslora, use_dora, scaling,
    magnitude, dropout and implement `weights`, `set_weights` and `dtype`."""

    # True where the delta is another layer's (a tied head's, `TiedAdapter`): that layer's merge writes it
    # into the weight both read, so merging this one writes nothing.
    shares_delta = False

    def weights(self) -> tuple[jax.Array, jax.Array]:  # a (in, r), b (r, out)
        raise NotImplementedError

    def set_weights(self, a: jax.Array, b: jax.Array) -> None:
        raise NotImplementedError

    @property
    def dtype(self):
        raise NotImplementedError

    def dropped(self, x: jax.Array) -> jax.Array:
        """x cast to the adapter dtype (PEFT's ``_cast_input_dtype``), then dropout (train mode only)."""
        x = x.astype(self.dtype)
        return x if self.dropout is None else self.dropout(x)

    def dropout_active(self) -> bool:
        return self.dropout is not None and not self.dropout.deterministic

    def __call__(self, x: jax.Array) -> jax.Array:
        """The LoRA delta ``(..., out)`` in the adapter dtype; x ``(..., in)``."""
        return lora.delta(self.dropped(x), *self.weights(), self.scaling)

    def delta_weight(self) -> jax.Array:
        return lora.delta_weight(*self.weights(), self.scaling)  # (in, out)

    # PEFT layout: lora_A.weight (r, in), lora_B.weight (out, r), lora_magnitude_vector (out,).

    def to_peft(self) -> dict[str, jax.Array]:
        a, b = self.weights()
        out = {"lora_A.weight": a.T, "lora_B.weight": b.T}
        if self.use_dora:
            out["lora_magnitude_vector"] = self.magnitude.get_value()
        return out

    def load_peft(self, tensors: dict[str, jax.Array]) -> None:
        """Load ``{"lora_A.weight", "lora_B.weight"[, "lora_magnitude_vector"]}`` in PEFT layout."""
        expected = {"lora_A.weight": (self.r, self.in_features), "lora_B.weight": (self.out_features, self.r)}
        if self.use_dora:
            expected["lora_magnitude_vector"] = (self.out_features,)
        if set(tensors) != set(expected):
            raise ValueError(f"adapter tensors {sorted(tensors)} do not match the expected {sorted(expected)}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        self.set_weights(jnp.asarray(tensors["lora_A.weight"]).T, jnp.asarray(tensors["lora_B.weight"]).T)
        if self.use_dora:
            self.magnitude.set_value(jnp.asarray(tensors["lora_magnitude_vector"], self.dtype))


class LoRAAdapter(Adapter):
    """Adapter ``scale * (dropout(x) @ lora_a) @ lora_b``; lora_a ``(in, r)``, lora_b ``(r, out)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: lora.InitLoraWeights = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        lora.check_rank(r, in_features, out_features)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1)")
        if not callable(init_lora_weights) and init_lora_weights not in (True, False, "gaussian", "pissa", "loftq") \
                and lora.pissa_niter(init_lora_weights) is None:
            raise ValueError(f"init_lora_weights={init_lora_weights!r}; expected True, False, 'gaussian', "
                             "'pissa', 'pissa_niter_<n>', 'loftq' or a jaxlora.inits.BaseInit")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.use_rslora, self.use_dora = lora_alpha, use_rslora, use_dora
        self.scaling = lora.scaling(r, lora_alpha, use_rslora=use_rslora)
        # PiSSA / LoftQ (and any jaxlora.inits.BaseInit) draw as True does, then the layer overwrites A and B
        # from the base weight (`set_weights`): the draws keep the key stream the same for every init.
        random_init = init_lora_weights if init_lora_weights in (True, False, "gaussian") else True
        self.lora_a = nnx.LoRAParam(lora.init_a(rngs.params(), in_features, r, random_init, param_dtype))
        self.lora_b = nnx.LoRAParam(lora.init_b(rngs.params(), r, out_features, random_init, param_dtype))
        # DoRA's variables exist from here on, so the graph (and what a jitted step traced) never changes:
        # m (out,) is set by the layer from the base weight (`init_dora`), the norm by a merge.
        self.magnitude = nnx.LoRAParam(jnp.ones((out_features,), param_dtype)) if use_dora else nnx.data(None)
        self.dora_norm = DoraNorm(jnp.zeros((out_features,), param_dtype)) if use_dora else nnx.data(None)
        self.dropout = nnx.data(nnx.Dropout(lora_dropout, rngs=rngs) if lora_dropout > 0 else None)

    @property
    def dtype(self):
        return self.lora_a.get_value().dtype

    def weights(self) -> tuple[jax.Array, jax.Array]:
        return self.lora_a.get_value(), self.lora_b.get_value()

    def init_dora(self, kernel: jax.Array) -> None:
        """m = ||W + scale * A B|| per output feature, from the base kernel ``(in, out)`` (PEFT's init)."""
        norm = lora.dora_weight_norm(kernel, *self.weights(), self.scaling)
        self.magnitude.set_value(norm.astype(self.dtype))

    def set_weights(self, a: jax.Array, b: jax.Array) -> None:
        """Replace A ``(in, r)`` and B ``(r, out)``, checking shapes; kept in the adapter dtype."""
        for name, new, old in (("lora_a", a, self.lora_a.get_value()), ("lora_b", b, self.lora_b.get_value())):
            if new.shape != old.shape:
                raise ValueError(f"{name} has shape {new.shape}, expected {old.shape}")
        self.lora_a.set_value(jnp.asarray(a, self.dtype))
        self.lora_b.set_value(jnp.asarray(b, self.dtype))


class TiedAdapter(Adapter):
    """A tied output head's adapter (``ensure_weight_tying=True`` with LoRA on a tied model's embedding or
    head): it reads the embedding's adapter `source`, transposed, so the head's delta is the embedding's
    ``scale * (a @ b).T`` and one pair of variables trains through both uses (their gradient sums both).
    `jaxlora.targets.tied_lora` gives both one rank and one scaling: merging writes that delta once.

    PEFT's tied ``lm_head`` LoRA: ``lora_A.weight`` is a view of the embedding's ``lora_embedding_B`` (so here
    a = source b.T ``(hidden, r)``), ``lora_B.weight`` of ``lora_embedding_A`` (b = source a.T ``(r, vocab)``).
    Its own are the head's dropout and scaling (equal to the source's when built by a `jaxlora.PeftModel`).
    It owns no weights: `set_weights` writes into the source, and merging it writes nothing (`shares_delta`):
    the embedding's merge puts the delta into the table the head reads."""

    shares_delta = True
    use_dora = False  # DoRA is for linear layers that own their adapter (and LoRA on an embedding has none)
    magnitude = None

    def __init__(self, source: LoRAAdapter, *, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, rngs: nnx.Rngs):
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1)")
        self.source = source  # the embedding's adapter itself (one owner of A and B), not a copy
        self.in_features, self.out_features, self.r = source.out_features, source.in_features, source.r
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = lora.scaling(self.r, lora_alpha, use_rslora=use_rslora)
        self.dropout = nnx.data(nnx.Dropout(lora_dropout, rngs=rngs) if lora_dropout > 0 else None)

    @property
    def dtype(self):
        return self.source.dtype

    def weights(self) -> tuple[jax.Array, jax.Array]:  # a (hidden, r), b (r, vocab)
        a, b = self.source.weights()
        return b.T, a.T

    def set_weights(self, a: jax.Array, b: jax.Array) -> None:
        """Writes a ``(hidden, r)`` and b ``(r, vocab)`` into the source (its b and a, transposed)."""
        self.source.set_weights(jnp.asarray(b).T, jnp.asarray(a).T)
