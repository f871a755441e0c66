"""What a LoRA layer needs of the layer it adapts: the base protocols, and the adapters of flax's own layers.

A LoRA layer (`jaxlora.layers.LoRALinear`) reads its base only through `KernelBase` (a dense kernel to merge
into) and `LinearBase` (plus the unbiased product DoRA rescales). `QuantizedLinear` implements them itself;
``nnx.Linear`` and ``nnx.Embed`` do through `DenseBase` and `EmbedBase`, subclasses that add the methods and
keep the variables where flax puts them (``kernel``, ``bias``, ``embedding``), so module paths, loading and
`quantize_model` see the layers they always saw. A new base type (int8, fp8) implements the protocol and
needs no edit to the LoRA layer. An embedding's table is shared, not copied (`EmbedBase`): a tied output head
(`jaxlora.models.tied.TiedHead`) reads the same variable, as PEFT's lm_head shares the embedding's Parameter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
from flax import nnx


@runtime_checkable
class KernelBase(Protocol):
    """A frozen layer whose weight reads as a dense kernel ``(in, out)``: what merging needs."""

    # True where another module reads this weight too (an embedding's table, a tied head): merging writes
    # into it, so a merged model stays tied, as PEFT's shared Parameter does; False: a weight of its own.
    shared_weight: bool

    @property
    def weight_dtype(self): ...  # the dtype the weight is stored in (a quantized one: dequantized to)

    def dense_kernel(self, dtype) -> jax.Array: ...  # (in, out), read in weight_dtype, then cast to dtype

    def set_kernel(self, kernel: jax.Array) -> None: ...  # (in, out); stored the base's way (re-quantized)

    def to_dense(self, kernel: jax.Array | None = None) -> nnx.Module: ...  # a plain flax layer in weight_dtype

    def unwrap(self) -> nnx.Module: ...  # the layer to put back in the model when the adapters go


@runtime_checkable
class LinearBase(KernelBase, Protocol):
    """A frozen linear layer ``y = x @ kernel + bias`` (``__call__``), its bias and its product without it."""

    in_features: int
    out_features: int
    bias: nnx.Variable | None

    def __call__(self, x: jax.Array) -> jax.Array: ...  # (..., in) -> (..., out)

    def matmul(self, x: jax.Array) -> jax.Array: ...  # x @ kernel as __call__ computes it, no bias


@runtime_checkable
class TableBase(Protocol):
    """A base whose weight is a token table ``embedding`` ``(vocab, hidden)``, transformers' layout of an
    embedding's and a tied head's weight: PEFT saves it beside an adapter there (``save_embedding_layers``)."""

    embedding: nnx.Variable


def _copy_into(module: nnx.Module, source: nnx.Module, names: tuple[str, ...]) -> nnx.Module:
    """`module` holding copies of `source`'s variables `names`: the same arrays (so `unstacked` recognises
    untouched layer slices), types and metadata, in Variables of its own (edits do not reach `source`)."""
    for name in names:
        variable = getattr(source, name)
        setattr(module, name, nnx.data(None) if variable is None else variable.copy())
    return module


def _keep(value):
    return lambda *_: value  # an initializer that hands back an existing array: no draw, no copy


def _linear_like(cls: type, linear: nnx.Linear) -> nnx.Linear:
    """A `cls` (``nnx.Linear`` or `DenseBase`) with `linear`'s settings and copies of its variables."""
    bias = linear.bias
    new = cls(linear.in_features, linear.out_features, use_bias=bias is not None, dtype=linear.dtype,
              param_dtype=linear.param_dtype, precision=linear.precision, dot_general=linear.dot_general,
              promote_dtype=linear.promote_dtype, preferred_element_type=linear.preferred_element_type,
              kernel_init=_keep(linear.kernel.get_raw_value()),
              bias_init=_keep(None if bias is None else bias.get_raw_value()), rngs=nnx.Rngs(0))
    return _copy_into(new, linear, ("kernel", "bias"))


def _embed_like(cls: type, embed: nnx.Embed) -> nnx.Embed:
    """A `cls` (``nnx.Embed`` or `EmbedBase`) with `embed`'s settings and a copy of its table."""
    new = cls(embed.num_embeddings, embed.features, dtype=embed.dtype, param_dtype=embed.param_dtype,
              promote_dtype=embed.promote_dtype, embedding_init=_keep(embed.embedding.get_raw_value()),
              rngs=nnx.Rngs(0))
    return _copy_into(new, embed, ("embedding",))


def _share_table(embed: nnx.Embed, source: nnx.Embed) -> nnx.Embed:
    """`embed` holding `source`'s table variable itself: edits reach every reader of it."""
    embed.embedding = source.embedding
    return embed


class DenseBase(nnx.Linear):
    """An ``nnx.Linear`` as a `LinearBase`: the same computation, parameters and names."""

    # What a bias returns to when it stops training (jaxlora.layers.set_bias_trainable).
    frozen_bias = nnx.Param
    shared_weight = False  # copies of the caller's variables (_copy_into)

    @classmethod
    def of(cls, linear: nnx.Linear) -> DenseBase:
        """`linear`'s settings and (copied) variables; `linear` itself is left untouched."""
        return _linear_like(cls, linear)

    def as_linear(self, kernel: jax.Array | None = None) -> nnx.Linear:
        """A plain ``nnx.Linear`` with these settings and variables (`kernel` replacing the kernel)."""
        plain = _linear_like(nnx.Linear, self)
        if kernel is not None:
            plain.kernel.set_value(kernel.astype(self.weight_dtype))
        return plain

    @property
    def weight_dtype(self):
        return self.kernel.get_value().dtype

    def dense_kernel(self, dtype) -> jax.Array:
        return self.kernel.get_value().astype(dtype)

    def set_kernel(self, kernel: jax.Array) -> None:
        self.kernel.set_value(kernel.astype(self.weight_dtype))

    def with_kernel(self, kernel: jax.Array) -> DenseBase:
        """A new base like this one holding `kernel` ``(in, out)`` (PiSSA's residual, LoftQ's dequantized W)."""
        new = _linear_like(DenseBase, self)
        new.set_kernel(kernel)
        return new

    def to_dense(self, kernel: jax.Array | None = None) -> nnx.Linear:
        return self.as_linear(kernel)

    def unwrap(self) -> nnx.Linear:
        return self.as_linear()

    def matmul(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out)
        # nnx.Linear.__call__ up to its bias: promoted with the bias, so the product's dtype is __call__'s.
        bias = None if self.bias is None else self.bias[...]
        x, kernel, _ = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        kwargs = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs)


class EmbedBase(nnx.Embed):
    """An ``nnx.Embed`` as a `KernelBase`: the table ``(vocab, hidden)`` is the kernel of a linear layer over
    one-hot token ids, so merging an adapter into it is a linear layer's merge.

    It holds the embedding's own table variable, not a copy: on a tied model the output head reads that
    variable too (`jaxlora.models.tied.TiedHead`), and PEFT merges an embedding's adapter into the matrix
    both share."""

    bias = None  # an embedding has none
    shared_weight = True

    @classmethod
    def of(cls, embed: nnx.Embed) -> EmbedBase:
        return _share_table(_embed_like(cls, embed), embed)

    @property
    def in_features(self) -> int:
        return self.num_embeddings

    @property
    def out_features(self) -> int:
        return self.features

    @property
    def weight_dtype(self):
        return self.embedding.get_value().dtype

    def dense_kernel(self, dtype) -> jax.Array:
        return self.embedding.get_value().astype(dtype)

    def set_kernel(self, kernel: jax.Array) -> None:
        self.embedding.set_value(kernel.astype(self.weight_dtype))

    def to_dense(self, kernel: jax.Array | None = None) -> nnx.Embed:
        plain = _embed_like(nnx.Embed, self)
        if kernel is not None:
            plain.embedding.set_value(kernel.astype(self.weight_dtype))
        return plain

    def unwrap(self) -> nnx.Embed:
        """A plain ``nnx.Embed`` over this same table variable (a tied head keeps reading it)."""
        return _share_table(_embed_like(nnx.Embed, self), self)


# flax's layers -> their adapters, by exact type: a subclass may compute differently, so it implements the
# protocol itself rather than being read as its parent.
_ADAPTERS = {nnx.Linear: DenseBase.of, nnx.Embed: EmbedBase.of}


def as_base(module: nnx.Module) -> KernelBase:
    """`module` as a base: a `KernelBase` as it is, an ``nnx.Linear`` / ``nnx.Embed`` through its adapter."""
    if isinstance(module, KernelBase):
        return module
    adapt = _ADAPTERS.get(type(module))
    if adapt is None:
        raise TypeError(f"cannot adapt a {type(module).__name__}: expected nnx.Linear, nnx.Embed or a layer "
                        "implementing jaxlora.base.KernelBase (QuantizedLinear does)")
    return adapt(module)
