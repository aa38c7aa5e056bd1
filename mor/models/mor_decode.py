"""Cached decoding for Mixture-of-Recursions: recursion-wise KV caches, causal decisions.

`MoRTransformer.__call__(tokens, pos, caches=...)` lands here, for a prefill of
S tokens and for decoding one token per sequence alike. Every token gets the
inference-time decision of the full-sequence `routing="causal"` path, which
depends only on its own hidden state, so prefill + token-by-token decoding
reproduces that path exactly:
- expert-choice: recursion r runs on a survivor of recursion r-1 when
  sigmoid(router or auxiliary-router logit of step r) > threshold; a step of
  capacity 1.0 keeps every survivor;
- token-choice: the router on the prefix output gives each token its depth.

Caches (`MoRCaches`): ordinary full caches for the prefix and suffix blocks,
and for the shared unit
- kv='cache' (recursion-wise caching): one cache per (depth, unit block).
  Depth r's cache receives only the tokens that reached depth r (the valid
  mask of `kv_cache.write`), so later tokens at depth r attend only to earlier
  tokens that reached it. Its slot count may be smaller than max_len
  (`depth_slots`): a token past a full cache is dropped from it, as
  `kv_cache.write` drops overflow, and decoding is then no longer exact.
- kv='share' (recursive KV sharing): one cache per unit block, written by
  recursion 1 for every token; later depths attend over it (no K/V of their
  own, `shared_kv`).

In a batch the unit still runs over every sequence at every depth, with the
decision as a validity mask (static shapes; outputs of tokens that stopped are
discarded, their keys never written). A depth that no token of the whole call
reaches is skipped under `lax.cond`, which is where batch-1 decoding saves
compute. Real savings for batches come from depth-wise batching in
`mor.serving`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mor import kv_cache
from mor import routers as R
from mor.layers.attention import KV
from mor.models.transformer import compute_dtype

CAPACITY_HEADROOM = 1.25   # slots="capacity": depth r gets this times its capacity fraction


class MoRCaches(NamedTuple):
  prefix: list       # KVCache per prefix block (max_len slots)
  recursion: list    # [depth][unit block] KVCache; 'share': a single depth, recursion 1's
  suffix: list       # KVCache per suffix block


def depth_slots(cfg, max_len: int, slots: str | Sequence[float] | None = None) -> list[int]:
  """Slots of each depth's cache: max_len each (None, exact), or a fraction per depth.

  slots="capacity" uses the expert-choice capacity fractions times
  CAPACITY_HEADROOM (capped at 1); a sequence gives the fractions directly.
  """
  n = cfg.num_recursions
  if slots is None:
    return [max_len] * n
  if isinstance(slots, str):
    if slots != "capacity":
      raise ValueError(f"slots={slots!r}; choose None, 'capacity' or a fraction per depth")
    slots = [min(1.0, f * CAPACITY_HEADROOM) for f in R.ec_fractions(cfg)]
  if len(slots) != n:
    raise ValueError(f"slots has {len(slots)} fractions; the model has {n} recursions")
  return [max(1, min(max_len, math.ceil(f * max_len - 1e-9))) for f in slots]


def init_caches(model, batch: int, max_len: int, slots=None) -> MoRCaches:
  """Empty caches; `slots` shrinks the per-depth caches (see `depth_slots`)."""
  c, plan = model.cfg, model.plan
  new = lambda t: kv_cache.init_cache(batch, t, c.num_kv_heads, c.dh, compute_dtype(c))
  sizes = depth_slots(c, max_len, slots)
  if c.kind == "mor" and c.router.kv == "share":
    sizes = sizes[:1]   # recursion 1's keys serve every depth
  return MoRCaches([new(max_len) for _ in plan.prefix],
                   [[new(t) for _ in plan.unit] for t in sizes],
                   [new(max_len) for _ in plan.suffix])


def cache_bytes(caches: MoRCaches) -> list[int]:
  """Allocated bytes of the unit's caches per depth 1..N_r, summed over the unit's blocks.

  With KV sharing the list has one entry: recursion 1's cache serves every
  depth. Prefix and suffix caches are not included; `total_cache_bytes` adds them.
  """
  return [sum(c.num_bytes for c in depth) for depth in caches.recursion]


def total_cache_bytes(caches: MoRCaches) -> int:
  return sum(jax.tree.leaves(jax.tree.map(lambda x: x.size * x.dtype.itemsize, caches)))


# ---------------------------------------------------------------------------
def ec_decision(model, r: int, h_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal expert-choice decision of step r (0-based) and its gate, from states before step r.

  Steps past the trained N_r (test-time depth scaling) reuse the last router.
  """
  n = model.cfg.num_recursions
  router = model.routers[min(r, n - 1)]
  logit_BxS = router.logit(h_BxSxD)
  decide_BxS = router.decision_logit(h_BxSxD, logit_BxS)
  if R.ec_fractions(model.cfg)[min(r, n - 1)] >= 1.0:  # full capacity keeps every survivor
    go_BxS = jnp.ones(logit_BxS.shape, bool)
  else:
    go_BxS = jax.nn.sigmoid(decide_BxS) > model.cfg.router.threshold
  return go_BxS, router.gate(logit_BxS)


def _unit(model, r, x_BxSxD, pos_BxS, caches, valid_BxS, shared=None):
  """The unit's blocks over all tokens; writes the valid tokens' keys (or reads `shared`)."""
  new, rec = [], model._lora_recursion(r)
  for j, b in enumerate(model.plan.unit):
    if shared is not None:
      c = shared[j]
      x_BxSxD = model.blocks[b](x_BxSxD, pos_BxS, recursion=rec,
                                shared_kv=KV(c.k_BxTxKxH, c.v_BxTxKxH, c.pos_BxT))[0]
    else:
      x_BxSxD, c, _, _ = model.blocks[b](x_BxSxD, pos_BxS, cache=caches[j], valid_BxS=valid_BxS,
                                         recursion=rec)
      new.append(c)
  return x_BxSxD, (new if shared is None else caches)


def _step(model, r, x_BxSxD, pos_BxS, rec, go_BxS):
  """Recursion r on every token: (unit output, updated per-depth caches)."""
  share = model.cfg.router.kv == "share"
  if share and r == 0:  # recursion 1 fills the shared cache for every token
    out, new = _unit(model, r, x_BxSxD, pos_BxS, rec[0], jnp.ones_like(go_BxS))
    return out, [new]
  caches = rec[0] if share else rec[r]
  run = lambda: _unit(model, r, x_BxSxD, pos_BxS, caches, go_BxS,
                      shared=rec[0] if share else None)
  # No token of the call goes this deep: skip the unit (batch-1 decoding saves the compute).
  out, new = jax.lax.cond(jnp.any(go_BxS), run, lambda: (x_BxSxD, caches))
  if not share:
    rec = rec[:r] + [new] + rec[r + 1:]
  return out, rec


def _expert_choice(model, h_BxSxD, pos_BxS, rec):
  b, s, _ = h_BxSxD.shape
  active_BxS = jnp.ones((b, s), bool)
  depth_BxS = jnp.zeros((b, s), jnp.int32)
  for r in range(model.cfg.num_recursions):
    go_BxS, gate_BxS = ec_decision(model, r, h_BxSxD)
    go_BxS &= active_BxS
    out_BxSxD, rec = _step(model, r, h_BxSxD, pos_BxS, rec, go_BxS)
    inc = R.combine_increment(h_BxSxD, out_BxSxD, gate_BxS, model.cfg.router.combine)
    h_BxSxD = h_BxSxD + jnp.where(go_BxS[..., None], inc, 0)
    depth_BxS += go_BxS
    active_BxS = go_BxS
  return h_BxSxD, depth_BxS, rec


def _token_choice(model, h1_BxSxD, pos_BxS, rec):
  tc = model.router(h1_BxSxD)
  state_BxSxD = h1_BxSxD
  depth_BxS = jnp.zeros(tc.depth_BxS.shape, jnp.int32)
  for r in range(model.cfg.num_recursions):
    go_BxS = tc.depth_BxS > r   # no capacity at inference: nested by construction
    out_BxSxD, rec = _step(model, r, state_BxSxD, pos_BxS, rec, go_BxS)
    state_BxSxD = jnp.where(go_BxS[..., None], out_BxSxD, state_BxSxD)
    depth_BxS += go_BxS
  h_BxSxD = R.tc_output(h1_BxSxD, state_BxSxD, tc.gate_BxS, model.cfg.router.combine)
  return h_BxSxD, depth_BxS, rec


def cached_forward(model, tokens_BxS: jax.Array, pos_BxS: jax.Array, caches: MoRCaches):
  """Returns (logits_BxSxV, new caches, aux with stats['depth_BxS'] the realised depths)."""
  x = model.embed_tokens(tokens_BxS)
  prefix, suffix = [], []
  for i, b in enumerate(model.plan.prefix):
    x, c, _, _ = model.blocks[b](x, pos_BxS, cache=caches.prefix[i])
    prefix.append(c)
  run = _expert_choice if model.expert_choice else _token_choice
  x, depth_BxS, rec = run(model, x, pos_BxS, [list(d) for d in caches.recursion])
  for i, b in enumerate(model.plan.suffix):
    x, c, _, _ = model.blocks[b](x, pos_BxS, cache=caches.suffix[i])
    suffix.append(c)
  aux = {"losses": {}, "stats": {"depth_BxS": depth_BxS}}
  return model.logits(x), MoRCaches(prefix, rec, suffix), aux
