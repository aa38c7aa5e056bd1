"""Cached autoregressive decoding: prefill a prompt, then one token at a time.

Works for every model with `init_caches(batch, max_len)` and a call
`model(tokens, pos, caches=...) -> (logits, caches, aux)`. The whole
generation is one jitted function over the split NNX state: the prompt is
prefilled in one call and the new tokens come from a `lax.scan`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float = 0.0,
           top_k: int = 0) -> jax.Array:
  """Greedy when temperature == 0; else softmax(logits / T) over the top_k (0 = all)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(model, prompt_BxS: jax.Array, max_len: int):
  """Runs the prompt through fresh caches; returns (last logits_BxV, caches)."""
  b, s = prompt_BxS.shape
  caches = model.init_caches(b, max_len)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  logits, caches, _ = model(prompt_BxS, pos, caches=caches)
  return logits[:, -1], caches


def decode_step(model, token_B: jax.Array, pos_B: jax.Array, caches):
  """One new token per sequence at position pos_B; returns (logits_BxV, caches)."""
  logits, caches, _ = model(token_B[:, None], pos_B[:, None], caches=caches)
  return logits[:, 0], caches


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k"))
def _generate(graphdef, state, prompt_BxS, key, steps: int, temperature: float, top_k: int):
  model = nnx.merge(graphdef, state)
  b, s = prompt_BxS.shape
  logits, caches = prefill(model, prompt_BxS, s + steps)

  def body(carry, key_t):
    logits, caches, pos = carry
    tok = sample(logits, key_t, temperature, top_k)
    logits, caches = decode_step(model, tok, jnp.full((b,), pos, jnp.int32), caches)
    return (logits, caches, pos + 1), tok

  _, toks = jax.lax.scan(body, (logits, caches, jnp.int32(s)), jax.random.split(key, steps))
  return toks.T


def generate(model: nnx.Module, prompt_BxS: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, key: jax.Array | None = None):
  """Returns the max_new_tokens sampled after each prompt, int32[B, max_new_tokens].

  Prompts in a batch share one length; sequences of different lengths go
  through the serving engine.
  """
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _generate(graphdef, state, jnp.asarray(prompt_BxS, jnp.int32), key, max_new_tokens,
                   float(temperature), int(top_k))
