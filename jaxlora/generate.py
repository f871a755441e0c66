"""Autoregressive generation with a static KV cache: one jitted prefill, then a `jax.lax.while_loop`.

Prompts are left-padded (attention_mask 0 on the left), as transformers' ``generate`` expects for
decoder-only models, so every row's next token lands in the same cache slot.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.peft_model import adapter_rows


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids (batch,) from logits (batch, vocab): argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the least likely tokens whose total mass is <= 1 - top_p,
        # always keeping the most likely one.
        sorted_logits = jnp.sort(logits, axis=-1)  # ascending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop = (cum <= 1.0 - top_p).at[:, -1].set(False)
        threshold = jnp.min(jnp.where(drop, jnp.inf, sorted_logits), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def inference_view(model: nnx.Module) -> nnx.Module:
    """The same model in eval mode (dropout off), sharing its arrays; `model` itself is left as it was.

    Generation and evaluation use this instead of toggling `model.eval()` / `model.train()`, which
    would leave a caller's model in the other mode, and would fail inside jit on an adapter with
    dropout whose RNG stream cannot advance there."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    view.eval()
    return view


def _call(model, input_ids, attention_mask, cache, rows):
    """One forward with the cache; rows (a mixed batch) only where asked: a plain model takes none."""
    if rows is None:
        return model(input_ids, attention_mask, cache=cache)
    return model(input_ids, attention_mask, cache=cache, adapter_rows=rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate(graphdef, state, input_ids, attention_mask, rng, eos_ids, pad_id, rows, *, max_new_tokens,
              temperature, top_p):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = _call(model, input_ids, attention_mask, cache, rows)
    logits = logits[:, -1, :]  # (batch, vocab): only the last position predicts the next token
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, out, logits, cache, done, rng = carry
        rng, key = jax.random.split(rng)
        token = sample_token(logits, key, temperature, top_p)
        token = jnp.where(done, pad_id, token)  # finished rows emit padding, as transformers does
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        done = done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        logits, cache = _call(model, token[:, None], jnp.ones((batch, 1), jnp.int32), cache, rows)
        return step + 1, out, logits[:, -1, :], cache, done, rng

    carry = (jnp.zeros((), jnp.int32), out, logits, cache, done, rng)
    _, out, *_ = jax.lax.while_loop(cond, body, carry)
    return out


def generate(
    model: nnx.Module,
    input_ids: jax.Array,  # (batch, prompt) int, left-padded
    *,
    max_new_tokens: int,
    attention_mask: jax.Array | None = None,  # (batch, prompt) 1 for tokens, 0 for left padding
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    adapter_names: Sequence[str] | None = None,  # PEFT's: one adapter per row, "__base__" for the base model
) -> jax.Array:  # (batch, prompt + max_new_tokens) int32
    """Prompt followed by `max_new_tokens` generated tokens; after a row's EOS, `pad_token_id` (default EOS).

    temperature 0 is greedy decoding (matching transformers' ``do_sample=False``); otherwise tokens are
    sampled at `temperature` from the `top_p` nucleus, which needs `rng`. The loop stops early once
    every row has produced EOS; the remaining columns are padding. With `adapter_names` each row runs its
    own adapter (`jaxlora.adapter_rows`); another combination of names compiles nothing new.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    # `not x >= 0` also rejects NaN, which would otherwise sample token 0 forever.
    if not (0.0 <= temperature < math.inf and 0.0 < top_p <= 1.0):
        raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got temperature={temperature!r}, "
                         f"top_p={top_p!r}")
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng, e.g. jax.random.key(0)")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)  # -1 never matches a token
    view = inference_view(model)
    rows = None if adapter_names is None else adapter_rows(view, adapter_names)
    graphdef, state = nnx.split(view)
    new = _generate(
        graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(0) if rng is None else rng, eos_ids, jnp.asarray(pad_token_id, jnp.int32), rows,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
    )
    return jnp.concatenate([input_ids, new], axis=1)
