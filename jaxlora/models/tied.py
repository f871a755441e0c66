"""`TiedHead`: the output head of a model with tied embeddings, a linear layer over the embedding's table.

transformers ties ``lm_head.weight`` to ``model.embed_tokens.weight``: one matrix, two modules. Here the
table has one owner, the embedding; `TiedHead` holds a reference to that same ``nnx.Variable`` (not a copy),
so ``lm_head`` is a module path on tied models too, and it implements `jaxlora.base.LinearBase`, so a LoRA
layer can wrap it like any linear layer. What PEFT 0.21 does there (``ensure_weight_tying=False``, its
default; measured with transformers 5 and recorded in README "Tied embeddings"), and so what this gives:

* LoRA on ``lm_head``: the delta goes to the logits only (the embedding lookup reads the plain table);
  merging writes the delta into the shared matrix, so the *embedding* moves too and the model stays tied;
  the adapter file holds the table as ``lm_head.base_layer.weight`` (PEFT's ``save_embedding_layers``).
* ``modules_to_save=["lm_head"]``: the trained copy is an untied ``nnx.Linear`` (`untied`); unloading
  keeps it, and the model is no longer tied.
* ``modules_to_save=["embed_tokens"]``: the embedding's copy trains, the head keeps reading the original
  table; unloading keeps the copy, so the head is left over a table no embedding holds, and `sync_tie`
  makes it an untied ``nnx.Linear`` over that table (PEFT's lm_head keeps the original matrix).
* ``ensure_weight_tying=True`` with either name in ``modules_to_save``: one trained copy of the table, read
  by the embedding's copy and by a `TiedHead` over it (`jaxlora.modules_to_save.trained_copies`); unloading
  keeps both, still tied.
* ``ensure_weight_tying=True`` with LoRA on either: the embedding's LoRA, and on the head a
  `jaxlora.adapter.TiedAdapter` reading it transposed (`jaxlora.targets.tied_lora`); merging writes the
  delta into the table once.

Flax sorts a module's attributes when it walks the graph, so the shared variable's first path -- the one
``nnx.state`` reports -- is ``lm_head.embedding``, not ``model.embed_tokens.embedding``; code that finds
tensors by module (checkpoint I/O, `jaxlora.targets`) is unaffected.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxlora.graph import replace_module
from jaxlora.models.config import LlamaConfig
from jaxlora.models.rounded import rounded_dot_general, rounded_matmul


class TiedHead(nnx.Module):
    """``logits = h @ table.T`` over an embedding's ``(vocab, hidden)`` table, held by reference.

    Computed as ``nnx.Embed.attend`` (promoted to the embedding's compute `dtype`), as `rounded_matmul`: no
    float32 copy of the table on the CPU (jaxlora.models.rounded)."""

    bias = None  # transformers' lm_head has none
    # The weight is another module's: merging must write into it, never into a copy (jaxlora.base.KernelBase).
    shared_weight = True

    def __init__(self, embed: nnx.Embed):
        self.embedding = embed.embedding  # the embedding's own Variable: one table, two readers
        self.dtype = embed.dtype

    @property
    def in_features(self) -> int:
        return self.embedding.get_value().shape[1]

    @property
    def out_features(self) -> int:
        return self.embedding.get_value().shape[0]

    def __call__(self, h: jax.Array) -> jax.Array:  # (..., hidden) -> (..., vocab)
        table = self.embedding[...]
        return rounded_matmul(h.astype(self.dtype), table.astype(self.dtype).T)

    matmul = __call__  # no bias: the product is the whole output

    # --- jaxlora.base.LinearBase: the kernel is the table's transpose ---------------------------------

    @property
    def weight_dtype(self):
        return self.embedding.get_value().dtype

    def dense_kernel(self, dtype) -> jax.Array:  # (hidden, vocab)
        return self.embedding.get_value().T.astype(dtype)

    def set_kernel(self, kernel: jax.Array) -> None:
        """Writes `kernel` (hidden, vocab) into the shared table: the embedding reads it too (PEFT's merge
        into the tied matrix)."""
        self.embedding.set_value(kernel.T.astype(self.weight_dtype))

    def to_dense(self, kernel: jax.Array | None = None) -> TiedHead:
        """The head itself (it has no weight of its own to copy), `kernel` written into the shared table."""
        if kernel is not None:
            self.set_kernel(kernel)
        return self

    def unwrap(self) -> TiedHead:
        return self

    # --- trained in full (modules_to_save) --------------------------------------------------------------

    def untied(self) -> nnx.Linear:
        """An ``nnx.Linear`` holding a copy of the table as its kernel: what PEFT's ``modules_to_save`` trains
        on a tied model (the embedding keeps the original)."""
        table = self.embedding.get_value()
        return nnx.Linear(self.in_features, self.out_features, use_bias=False, dtype=self.dtype,
                          param_dtype=table.dtype, kernel_init=lambda *_: table.T, dot_general=rounded_dot_general,
                          rngs=nnx.Rngs(0))


def sync_tie(model: nnx.Module) -> None:
    """Makes `model` consistent after modules were swapped (``modules_to_save`` unloaded): a `TiedHead` whose
    table no embedding holds any more becomes an untied ``nnx.Linear`` over that table, and a jaxlora model's
    config says ``tie_word_embeddings=False`` once no tied head is left (PEFT's merge_and_unload sets it so)."""
    nodes = list(nnx.iter_graph(model))
    tables = {id(m.embedding) for _, m in nodes if isinstance(m, nnx.Embed)}
    heads = [(tuple(path), m) for path, m in nodes if isinstance(m, TiedHead)]
    for path, head in heads:
        if id(head.embedding) not in tables:
            replace_module(model, path, head.untied())
    config = getattr(model, "config", None)
    still_tied = any(id(head.embedding) in tables for _, head in heads)
    if isinstance(config, LlamaConfig) and config.tie_word_embeddings and not still_tied:
        model.config = dataclasses.replace(config, tie_word_embeddings=False)
