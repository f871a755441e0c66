"""The llama family (Llama 2/3, Mistral, Qwen2) in Flax NNX.

The module tree mirrors transformers' attribute names exactly, so a checkpoint key such as
``model.layers.3.self_attn.q_proj.weight`` is a path in this tree and PEFT ``target_modules`` names
(``q_proj``, ``down_proj``, ...) find the same layers. Linear layers are plain `nnx.Linear` (kernel
(in, out), the transpose of transformers' weight); attention and MLP only ever call them, so adapters
or quantized layers can replace them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.mixed import Selection, call
from jaxlora.models import attention as attn
from jaxlora.models.config import LlamaConfig
from jaxlora.models.rounded import rounded_dot_general
from jaxlora.models.stack import LayerStack, remat_policy, stochastic
from jaxlora.models.tied import TiedHead


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer in a fixed number of slots, filled left to right.

    Stored as the layers are (`LayerStack`): one (keys, values) pair per run of stacked layers. All rows
    share `end` (slots filled so far); `valid` marks which filled slots hold real tokens, so a left-padded
    prompt's pads are never attended to. A row's next position is its count of valid slots.
    """

    keys: tuple[jax.Array, ...]  # per run (layers, batch, slots, kv_heads, head_dim)
    values: tuple[jax.Array, ...]  # per run (layers, batch, slots, kv_heads, head_dim)
    valid: jax.Array  # (batch, slots) bool
    end: jax.Array  # () int32

    @classmethod
    def empty(cls, config: LlamaConfig, run_sizes: tuple[int, ...], batch: int, slots: int, dtype) -> KVCache:
        zeros = tuple(jnp.zeros((n, batch, slots, config.num_key_value_heads, config.head_dim), dtype)
                      for n in run_sizes)
        return cls(zeros, zeros, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return attn.rms_norm(x.astype(self.dtype), self.weight[...], self.eps)


def _linear(d_in: int, d_out: int, bias: bool, config: LlamaConfig, dtype, param_dtype, rngs) -> nnx.Linear:
    init = nnx.initializers.normal(config.initializer_range)
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
                      rngs=rngs)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, dtype, param_dtype, attention: str = "auto",
                 rngs: nnx.Rngs):
        h, kvh, d, hidden = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.q_proj = _linear(hidden, h * d, config.qkv_bias, config, dtype, param_dtype, rngs)
        self.k_proj = _linear(hidden, kvh * d, config.qkv_bias, config, dtype, param_dtype, rngs)
        self.v_proj = _linear(hidden, kvh * d, config.qkv_bias, config, dtype, param_dtype, rngs)
        self.o_proj = _linear(h * d, hidden, config.o_bias, config, dtype, param_dtype, rngs)
        self.heads, self.kv_heads, self.head_dim = h, kvh, d
        self.window = config.window(layer)
        self.attention = attn.check_impl(attention)

    def __call__(self, x, cos, sin, q_slots, q_segments, kv_segments, kv=None, adapters=None):
        """x: (batch, seq, hidden); cos, sin: (batch, seq, head_dim); q_slots: (seq,) cache slots of x;
        q_segments (batch, seq) / kv_segments (batch, kv): segment ids of queries and key slots, 0 on
        padding (see attention_mask_matrix); kv: (cached keys, cached values, end) or None;
        adapters: which adapter runs (`jaxlora.mixed.Selection`): `Active`, a mixed batch's `AdapterRows`, or None.
        Returns the output (batch, seq, hidden) and the keys and values attended to (the updated cache)."""
        b, t, _ = x.shape
        q = attn.apply_rope(call(self.q_proj, x, adapters).reshape(b, t, self.heads, self.head_dim), cos, sin)
        k = attn.apply_rope(call(self.k_proj, x, adapters).reshape(b, t, self.kv_heads, self.head_dim), cos, sin)
        v = call(self.v_proj, x, adapters).reshape(b, t, self.kv_heads, self.head_dim)
        if kv is not None:
            cached_k, cached_v, end = kv
            k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), end, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), end, axis=1)
        out = attn.attention(q, k.astype(q.dtype), v.astype(q.dtype), q_slots, q_segments, kv_segments,
                             window=self.window, impl=self.attention)
        return call(self.o_proj, out.reshape(b, t, self.heads * self.head_dim), adapters), (k, v)


MLP_CHUNK = 512  # positions per MLP chunk on long sequences (a multiple of them; see LlamaMLP). 1024 -> 512
# cut the Llama-2-7B step at seq 2048 by 0.2 GiB (the (tokens, intermediate) activations of a chunk)


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(hidden, inter, bias, config, dtype, param_dtype, rngs)
        self.up_proj = _linear(hidden, inter, bias, config, dtype, param_dtype, rngs)
        self.down_proj = _linear(inter, hidden, bias, config, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, adapters: Selection = None) -> jax.Array:  # (batch, seq, hidden)
        b, t, d = x.shape
        if t <= MLP_CHUNK or t % MLP_CHUNK:
            return self._dense(x, adapters)
        # Long sequences: a rematerialized scan over chunks of positions, so the (tokens, intermediate)
        # activations and their gradients exist for one chunk at a time (each is ~5x the layer's input).
        # Dropout streams advance from chunk to chunk, as in one call.
        graphdef, rng, rest = nnx.split(self, nnx.RngState, ...)

        @jax.checkpoint
        def chunk(rng, xc):
            mlp = nnx.merge(graphdef, rng, rest)
            return nnx.state(mlp, nnx.RngState), mlp._dense(xc, adapters)  # a chunk keeps every row

        chunks = jnp.moveaxis(x.reshape(b, t // MLP_CHUNK, MLP_CHUNK, d), 1, 0)
        rng, y = jax.lax.scan(chunk, rng, chunks)
        if stochastic(self):  # in eval mode nothing advanced (and nothing may be written in a decode loop)
            nnx.update(self, rng)
        return jnp.moveaxis(y, 0, 1).reshape(b, t, y.shape[-1])

    def _dense(self, x: jax.Array, adapters: Selection) -> jax.Array:
        gated = jax.nn.silu(call(self.gate_proj, x, adapters)) * call(self.up_proj, x, adapters)
        return call(self.down_proj, gated, adapters)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, dtype, param_dtype, attention: str = "auto",
                 rngs: nnx.Rngs):
        norm = dict(dim=config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, layer, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                        rngs=rngs)
        self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(**norm)
        self.post_attention_layernorm = RMSNorm(**norm)

    def __call__(self, x, cos, sin, q_slots, q_segments, kv_segments, kv=None, adapters=None):
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, q_slots, q_segments, kv_segments, kv, adapters)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), adapters), new_kv


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, remat: bool | str, attention: str = "auto",
                 rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
        )
        # Stacked and scanned: one layer's program to compile, one layer's weights dequantized at a time.
        self.layers = LayerStack(
            [LlamaDecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
             for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype, self.remat = config, dtype, remat_policy(remat)

    def __call__(self, input_ids, segment_ids, positions, cache: KVCache | None, adapters: Selection = None):
        b, t = input_ids.shape
        if adapters is not None:
            adapters.check_batch(b)
        x = call(self.embed_tokens, input_ids, adapters)
        # The frequencies are a trace-time numpy constant, not a Variable: never trained, never saved.
        cos, sin = attn.rope_cos_sin(positions, attn.rope_inv_freq(self.config), self.dtype)
        if cache is None:
            q_slots, kv_segments = jnp.arange(t, dtype=jnp.int32), segment_ids
        else:  # a cache holds one segment per row: its valid slots are segment 1
            q_slots = cache.end + jnp.arange(t, dtype=jnp.int32)
            kv_segments = jax.lax.dynamic_update_slice_in_dim(
                cache.valid.astype(jnp.int32), segment_ids, cache.end, axis=1
            )

        def run_layer(layer, h, kv, consts):  # kv: this layer's (cached keys, cached values), or None
            cos, sin, q_slots, q_segments, kv_segments, end, adapters = consts
            h, (k, v) = layer(h, cos, sin, q_slots, q_segments, kv_segments, None if kv is None else (*kv, end),
                              adapters)
            return h, None if kv is None else (k, v)

        # Decoding with a cache has no backward pass: nothing to rematerialize.
        caches = None if cache is None else tuple(zip(cache.keys, cache.values))
        consts = (cos, sin, q_slots, segment_ids, kv_segments, None if cache is None else cache.end, adapters)
        x, new = self.layers(x, caches, self.remat, run_layer, consts)
        x = self.norm(x)
        if cache is None:
            return x, None
        keys, values = tuple(k for k, _ in new), tuple(v for _, v in new)
        return x, KVCache(keys, values, kv_segments != 0, cache.end + t)


class LlamaForCausalLM(nnx.Module):
    """A causal language model: ``model(input_ids) -> logits`` of (batch, seq, vocab).

    dtype is the compute dtype, param_dtype the storage dtype (e.g. float32 master weights with
    bfloat16 compute). The decoder layers are stacked and scanned (`jaxlora.models.stack`); remat is the
    gradient checkpointing policy of each layer ("none", "full", "dots", "offload", "nested"; True means "full").
    attention: "auto" (blockwise beyond one block, see `attention.attention`), "eager", "blockwise" or
    "cudnn". With tied embeddings ``lm_head`` is a `jaxlora.models.tied.TiedHead` over the table of
    ``model.embed_tokens``.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool | str = False, attention: str = "auto", rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention,
                                rngs=rngs)
        # rounded_dot_general: the same numbers as a plain dot, without a float32 copy of the head on the
        # CPU (jaxlora.models.rounded). Tied: a head over the embedding's own table (no second matrix), so
        # lm_head is a module path that LoRA and modules_to_save find, as on transformers' tied models.
        self.lm_head = TiedHead(self.model.embed_tokens) if config.tie_word_embeddings else nnx.Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.initializers.normal(config.initializer_range), dot_general=rounded_dot_general,
            rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,  # (batch, seq) int
        attention_mask: jax.Array | None = None,  # (batch, seq) 1 for tokens, 0 for padding
        *,
        positions: jax.Array | None = None,  # (batch, seq) int; default counts real tokens only
        segment_ids: jax.Array | None = None,  # (batch, seq) int; packed rows: 1, 2, ... per example, 0 on padding
        cache: KVCache | None = None,
        adapters: Selection = None,  # which adapter runs; a `jaxlora.PeftModel` passes it (jaxlora.mixed)
    ):
        """Returns logits (batch, seq, vocab); with a `cache`, returns (logits, updated cache).

        Without positions, positions count real tokens: from 0 on each row's first unpadded token, or
        continuing from the cache's count of real tokens. With segment_ids (sequence packing, no cache),
        a token attends only to earlier tokens of its own segment; pass the per-example `positions` too.
        """
        h, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                          cache=cache, adapters=adapters)
        logits = self.logits(h, adapters)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None,
                      adapters: Selection = None):
        """The final normed hidden states (batch, seq, hidden) and the updated cache (None without one):
        everything of `__call__` but the output head, so a loss can apply `logits` chunk by chunk."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if segment_ids is None:
            segment_ids = attention_mask.astype(jnp.int32)
        elif cache is not None:
            raise ValueError("segment_ids (sequence packing) is for training; it cannot be combined with a cache")
        if positions is None:
            positions = attn.positions_from_mask(attention_mask)
            if cache is not None:
                positions = positions + jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)[:, None]
        return self.model(input_ids, segment_ids.astype(jnp.int32), positions, cache, adapters)

    def logits(self, h: jax.Array, adapters: Selection = None) -> jax.Array:  # (batch, ..., hidden)
        return call(self.lm_head, h, adapters)  # -> (batch, ..., vocab)

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty KV cache of `slots` positions, in the compute dtype."""
        return KVCache.empty(self.config, self.model.layers.sizes, batch, slots, self.model.dtype)
