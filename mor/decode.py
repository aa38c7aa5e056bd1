"""Cached autoregressive decoding, and held-out NLL against recursion depth.

Works for every model with `init_caches(batch, max_len)` and a call
`model(tokens, pos, caches=...) -> (logits, caches, aux)`. The whole
generation is one jitted function over the split NNX state: the prompt is
prefilled in one call and the new tokens come from a `lax.scan`.

MoR decodes with the causal inference-time decisions (mor.models.mor_decode);
in a batch the unit runs over every sequence at every depth with the decisions
as a validity mask, so `generate` saves no compute for batches (a depth that
no sequence reaches is skipped). Depth-wise batching (`mor.serving.Engine`)
is where MoR's decoding savings are. A prompt batch sharded over devices
(e.g. NamedSharding over the data axis) decodes sharded.

Test-time depth scaling (`nll_vs_depth`): recursive and MoR models may apply
their shared unit more (or fewer) times than trained. Expert-choice steps past
N_r reuse the last step's router (and its threshold); token-choice tokens
routed to depth N_r continue to the new maximum.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def prefill(model, prompt_BxS: jax.Array, max_len: int, cache_slots=None):
  """Runs the prompt through fresh caches; returns (last logits_BxV, caches).

  cache_slots: MoR only, smaller caches for deeper recursions (mor_decode.depth_slots).
  """
  b, s = prompt_BxS.shape
  kw = {} if cache_slots is None else {"slots": cache_slots}
  caches = model.init_caches(b, max_len, **kw)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  logits, caches, _ = model(prompt_BxS, pos, caches=caches)
  return logits[:, -1], caches


def decode_step(model, token_B: jax.Array, pos_B: jax.Array, caches):
  """One new token per sequence at position pos_B; returns (logits_BxV, caches)."""
  logits, caches, _ = model(token_B[:, None], pos_B[:, None], caches=caches)
  return logits[:, 0], caches


def _jit(fn, static_argnames: tuple, compiler_options: dict | None):
  """jax.jit of fn, cached per compiler options (tests trade run time for compile time)."""
  return _jit_cached(fn, static_argnames, tuple(sorted((compiler_options or {}).items())))


@functools.cache
def _jit_cached(fn, static_argnames, options):
  return jax.jit(fn, static_argnames=static_argnames, compiler_options=dict(options) or None)


def _generate(graphdef, state, prompt_BxS, key, steps: int, temperature: float, top_k: int,
              cache_slots=None):
  model = nnx.merge(graphdef, state)
  b, s = prompt_BxS.shape
  logits, caches = prefill(model, prompt_BxS, s + steps, cache_slots)

  def body(carry, key_t):
    logits, caches, pos = carry
    tok = sample(logits, key_t, temperature, top_k)
    logits, caches = decode_step(model, tok, jnp.full((b,), pos, jnp.int32), caches)
    return (logits, caches, pos + 1), tok

  _, toks = jax.lax.scan(body, (logits, caches, jnp.int32(s)), jax.random.split(key, steps))
  return toks.T


def generate(model: nnx.Module, prompt_BxS: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, key: jax.Array | None = None,
             cache_slots=None, compiler_options: dict | None = None):
  """Returns the max_new_tokens sampled after each prompt, int32[B, max_new_tokens].

  Prompts in a batch share one length; sequences of different lengths go
  through the serving engine. cache_slots: see `prefill` (MoR only).
  compiler_options: passed to jax.jit (e.g. a fast-compiling optimisation level).
  """
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  if cache_slots is not None and not isinstance(cache_slots, str):
    cache_slots = tuple(float(f) for f in cache_slots)
  fn = _jit(_generate, ("graphdef", "steps", "temperature", "top_k", "cache_slots"),
            compiler_options)
  return fn(graphdef, state, jnp.asarray(prompt_BxS, jnp.int32), key, max_new_tokens,
            float(temperature), int(top_k), cache_slots)


# ---------------------------------------------------------------------------
# Test-time depth scaling.
def depth_forward(model, tokens_BxS: jax.Array, max_depth: int) -> jax.Array:
  """Logits with the shared unit applied up to max_depth times (causal routing for MoR)."""
  if model.cfg.kind == "mor":
    return model(tokens_BxS, routing="causal", max_depth=max_depth)[0]
  x, pos_BxS = _recursive_stem(model, tokens_BxS)
  for r in range(max_depth):
    x = _unit_pass(model, x, pos_BxS, r)
  return _suffix_logits(model, x, pos_BxS)


def depth_logits_upto(model, tokens_BxS: jax.Array, max_depth: int) -> list[jax.Array]:
  """[logits at depth d for d = 1..max_depth] of a recursive model, sharing the unit passes.

  Equals [depth_forward(model, tokens, d) for d in 1..max_depth] but applies the
  unit max_depth times instead of max_depth (max_depth + 1) / 2 times: depth d's
  hidden state is depth d-1's plus one more pass, and only the suffix and head
  run per depth. MoR routes differently at each maximum depth, so it has no such
  shortcut.
  """
  if model.cfg.kind != "recursive":
    raise ValueError("depth_logits_upto needs a recursive model with a cycle plan")
  x, pos_BxS = _recursive_stem(model, tokens_BxS)
  out = []
  for r in range(max_depth):
    x = _unit_pass(model, x, pos_BxS, r)
    out.append(_suffix_logits(model, x, pos_BxS))
  return out


def _recursive_stem(model, tokens_BxS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Embedding and the unique prefix layers of a recursive model: (x_BxSxD, pos_BxS)."""
  plan = model.plan
  if model.cfg.kind != "recursive" or not plan.cycle:
    raise ValueError("test-time depth scaling needs a recursive or MoR model with a cycle plan")
  b, s = tokens_BxS.shape
  pos_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  x = model.embed_tokens(tokens_BxS)
  for blk in plan.prefix:
    x = model.blocks[blk](x, pos_BxS)[0]
  return x, pos_BxS


def _unit_pass(model, x_BxSxD: jax.Array, pos_BxS: jax.Array, r: int) -> jax.Array:
  """Recursion r of the shared unit; per-recursion LoRA adapters: deeper steps reuse the last."""
  plan = model.plan
  rec = min(r, plan.num_recursions - 1) if model.cfg.lora_rank else None
  for blk in plan.unit:
    x_BxSxD = model.blocks[blk](x_BxSxD, pos_BxS, recursion=rec)[0]
  return x_BxSxD


def _suffix_logits(model, x_BxSxD: jax.Array, pos_BxS: jax.Array) -> jax.Array:
  for blk in model.plan.suffix:
    x_BxSxD = model.blocks[blk](x_BxSxD, pos_BxS)[0]
  return model.logits(x_BxSxD)


def _nll_sums(graphdef, state, inputs_BxS, targets_BxS, mask_BxS, max_depth: int):
  logits = depth_forward(nnx.merge(graphdef, state), inputs_BxS, max_depth)
  nll_BxS = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxS)
  m = mask_BxS.astype(jnp.float32)
  return jnp.sum(nll_BxS * m), jnp.sum(m)


def nll_vs_depth(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]],
                 max_depths: Iterable[int], compiler_options: dict | None = None) -> list[dict]:
  """Held-out NLL (nats/token) for each maximum recursion depth: [{max_depth, nll, tokens}].

  Batches are dicts of `inputs`, `targets` [B, S] and optionally `mask`.
  max_depth == N_r is the model's standard causal forward.
  """
  graphdef, state = nnx.split(model)
  nll_sums = _jit(_nll_sums, ("graphdef", "max_depth"), compiler_options)
  batches = list(batches)
  out = []
  for d in max_depths:
    total = count = 0.0
    for bt in batches:
      mask = bt.get("mask")
      mask = np.ones(np.shape(bt["targets"]), bool) if mask is None else mask
      nll, n = nll_sums(graphdef, state, jnp.asarray(bt["inputs"], jnp.int32),
                         jnp.asarray(bt["targets"], jnp.int32), jnp.asarray(mask, bool), int(d))
      total += float(nll)
      count += float(n)
    if count == 0:
      raise ValueError("nll_vs_depth got no tokens")
    out.append({"max_depth": int(d), "nll": total / count,
                "perplexity": math.exp(min(total / count, 700.0)), "tokens": int(count)})
  return out
