"""`LoRAEmbedding`: LoRA on a token embedding (``target_modules`` naming ``embed_tokens``), PEFT's ``lora.Embedding``.

An embedding is a linear layer over one-hot token ids: with ``a (vocab, r)`` and ``b (r, hidden)`` the
adapter adds ``scale * a[ids] @ b`` (PEFT: ``F.embedding(x, lora_embedding_A.T) @ lora_embedding_B.T *
scaling``), and merging adds ``scale * a @ b`` to the ``(vocab, hidden)`` table, so the adapter is a
`LoRAAdapter` with in_features = vocab, the base is an `EmbedBase` (the table as a kernel), and the
adapter, merge and unload methods are `LoRALinear`'s; this layer adds its init, its delta and PEFT's names.
PEFT names the tensors ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(hidden, r)`` and applies
no dropout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.adapter import LoRAAdapter
from jaxlora.base import EmbedBase
from jaxlora.layers import LoRALinear, wide_add

# jaxlora's LoRAAdapter names -> PEFT's embedding names (the same (r, vocab) and (hidden, r) layouts).
_PEFT_NAMES = {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}


class LoRAEmbedding(LoRALinear):
    """A frozen ``nnx.Embed`` plus named LoRA adapters; ``y = embed(ids) + scale * a[ids] @ b``."""

    base_kind = EmbedBase  # an nnx.Embed is held as one (jaxlora.base.as_base)

    def _new_adapter(self, *, r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights, loftq_iter,
                     param_dtype, rngs) -> LoRAAdapter:
        """PEFT's embedding init: A = 0 and B ~ N(0, 1) (True or "gaussian"), both N(0, 1) for False.
        Dropout is not applied, as in PEFT; DoRA, PiSSA and LoftQ are for linear layers only."""
        del lora_dropout, loftq_iter  # PEFT's Embedding never applies its dropout
        if use_dora or init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoRA on an embedding takes init_lora_weights True, False or 'gaussian' and no DoRA "
                             f"(got init_lora_weights={init_lora_weights!r}, use_dora={use_dora})")
        adapter = LoRAAdapter(self.in_features, self.out_features, r=r, lora_alpha=lora_alpha,
                              use_rslora=use_rslora, init_lora_weights=False, param_dtype=param_dtype, rngs=rngs)
        a_key, b_key = rngs.params(), rngs.params()
        a = jax.random.normal(a_key, (self.in_features, r), param_dtype)
        if init_lora_weights is not False:
            a = jnp.zeros_like(a)
        adapter.set_weights(a, jax.random.normal(b_key, (r, self.out_features), param_dtype))
        return adapter

    def _tied_adapter(self, source, **_):
        raise ValueError("an embedding owns its adapter: only a tied output head reads another layer's")

    # The forward is LoRALinear's: y = embed(ids) + delta, summed in the wider dtype (PEFT's
    # result + after_A @ B * scaling), in a mixed batch too (PEFT's result[rows] += adapter_output).
    _add_rows = staticmethod(wide_add)

    def _delta(self, adapter: LoRAAdapter, ids: jax.Array) -> jax.Array:  # (...) int -> (..., hidden)
        a, b = adapter.weights()
        delta = a[ids] @ b
        return delta * jnp.asarray(adapter.scaling, adapter.dtype)

    # Merging, unmerging and unloading are LoRALinear's: EmbedBase reads the table as the kernel. A tied
    # output head (jaxlora.models.tied.TiedHead) reads the base's table variable itself, never the adapter:
    # unmerged, the logits use the plain table, as PEFT's lm_head, which shares the base weight.

    # --- PEFT layout ----------------------------------------------------------------------------------

    def peft_state(self, name: str | None = None) -> dict[str, jax.Array]:
        """``{"lora_embedding_A": (r, vocab), "lora_embedding_B": (hidden, r)}``."""
        return {_PEFT_NAMES[k]: v for k, v in super().peft_state(name).items()}

    def load_peft_state(self, tensors: dict[str, jax.Array], name: str | None = None) -> None:
        ours = {v: k for k, v in _PEFT_NAMES.items()}
        super().load_peft_state({ours.get(k, k): v for k, v in tensors.items()}, name)
