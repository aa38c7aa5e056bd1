"""Explicit key/value caches.

A cache is a pytree of fixed shape: keys and values for up to T slots, the
original position of the token in each slot (-1 for an empty slot) and, per
sequence, the next free slot. Attention masks by positions, never by slot
index, so a cache may hold any causal subset of a sequence: a MoR depth caches
only the tokens that reached it (recursion-wise caching), and continuous
batching gives every sequence its own fill level.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
  k_BxTxKxH: jax.Array
  v_BxTxKxH: jax.Array
  pos_BxT: jax.Array      # int32 original positions; -1 marks an empty slot
  length_B: jax.Array     # int32 number of filled slots per sequence

  @property
  def num_bytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in self)


def init_cache(batch: int, slots: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> KVCache:
  shape = (batch, slots, kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.full((batch, slots), -1, jnp.int32), jnp.zeros((batch,), jnp.int32))


def write(cache: KVCache, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, pos_BxS: jax.Array,
          valid_BxS: jax.Array | None = None) -> KVCache:
  """Appends the valid tokens of each sequence at its next free slots, in order.

  Tokens that are not valid, or that would overflow the cache, are dropped.
  """
  b, s = pos_BxS.shape
  t = cache.pos_BxT.shape[1]
  if valid_BxS is None:
    valid_BxS = jnp.ones((b, s), bool)
  offset_BxS = jnp.cumsum(valid_BxS, axis=1, dtype=jnp.int32) - 1
  slot_BxS = jnp.where(valid_BxS, cache.length_B[:, None] + offset_BxS, t)
  rows_BxS = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  dt = cache.k_BxTxKxH.dtype
  k = cache.k_BxTxKxH.at[rows_BxS, slot_BxS].set(k_BxSxKxH.astype(dt), mode="drop")
  v = cache.v_BxTxKxH.at[rows_BxS, slot_BxS].set(v_BxSxKxH.astype(dt), mode="drop")
  pos = cache.pos_BxT.at[rows_BxS, slot_BxS].set(pos_BxS.astype(jnp.int32), mode="drop")
  length = jnp.minimum(cache.length_B + valid_BxS.sum(axis=1, dtype=jnp.int32), t)
  return KVCache(k, v, pos, length)
