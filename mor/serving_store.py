"""The serving engine's per-slot KV storage and the blocks that run over slot rows.

`Store` holds one block's keys and values for every slot of `mor.serving.Engine`
(one segment per depth for the shared unit); `attend_rows` writes each row's new
key into its own cache, then attends over it; `block` is `Block.__call__` with that
attention opened up; `reset_rows` empties the slots a new request takes.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mor.layers import dense
from mor.layers.attention import KV, attend
from mor.layers.rope import apply_rope


class Store(NamedTuple):
  """KV storage of one block for all slots; G segments (depths) along the entry axis T.

  [slots, K, T, H] is the layout attention's matmuls read without a transpose
  (a [B, T, K, H] cache is transposed, i.e. copied, at every step on CPU).
  """
  k_SxKxTxH: jax.Array
  v_SxKxTxH: jax.Array
  pos_SxT: jax.Array
  length_SxG: jax.Array     # filled entries per segment


# ---------------------------------------------------------------------------
# Blocks over slot rows: `Block.__call__` with the attention opened up, so that
# every row's new key is scattered into its cache before the rows are read (a
# read before the write made XLA copy whole caches at every step).
def block(blk, x_Rx1xD, pos_R, attention):
  """Pre-norm block; attention(q_Rx1xNxH, kv) -> (ctx_Rx1xNxH, caches) does the cache work."""
  a, dt = blk.attn, x_Rx1xD.dtype
  r = x_Rx1xD.shape[0]
  h_Rx1xD = blk.attn_norm(x_Rx1xD)
  q_Rx1xNxH = apply_rope(dense(h_Rx1xD, a.wq[...], dt), pos_R[:, None], a.rope_theta)
  ctx_Rx1xNxH, caches = attention(q_Rx1xNxH, a.project_kv(h_Rx1xD, pos_R[:, None]))
  n, hd = ctx_Rx1xNxH.shape[2:]
  x_Rx1xD = x_Rx1xD + dense(ctx_Rx1xNxH.reshape(r, 1, n * hd), a.wo[...].reshape(n * hd, -1),
                            dt)
  out = blk.mlp(blk.mlp_norm(x_Rx1xD))
  return x_Rx1xD + (out[0] if isinstance(out, tuple) else out), caches


def attend_rows(q_Rx1xNxH, kv: KV, pos_R, st: Store, rows_R, write_R, seg=None):
  """Writes the rows' new keys (where write_R), then attends over those rows' caches.

  rows_R None: every slot in order. seg (eng, d_S): the store holds one segment
  per depth and each slot reads only its depth's segment (a view padded to T_1).
  """
  s, _, t, _ = st.k_SxKxTxH.shape
  rows = jnp.arange(s, dtype=jnp.int32) if rows_R is None else rows_R
  off_R, size_R, col_R = jnp.zeros_like(rows), jnp.full_like(rows, t), jnp.zeros_like(rows)
  if seg is not None:
    eng, col_R = seg
    off_R = jnp.asarray(eng.seg_offsets, jnp.int32)[col_R]
    size_R = jnp.asarray(eng.seg_sizes, jnp.int32)[col_R]
  len_R = st.length_SxG[rows, col_R]
  write_R = write_R & (len_R < size_R)           # a full segment drops, like kv_cache.write
  r_R, t_R = jnp.where(write_R, rows, s), off_R + len_R   # unwritten rows drop out
  dt = st.k_SxKxTxH.dtype
  st = Store(st.k_SxKxTxH.at[r_R, :, t_R].set(kv.k_BxTxKxH[:, 0].astype(dt), mode="drop"),
             st.v_SxKxTxH.at[r_R, :, t_R].set(kv.v_BxTxKxH[:, 0].astype(dt), mode="drop"),
             st.pos_SxT.at[r_R, t_R].set(pos_R, mode="drop"),
             st.length_SxG.at[r_R, col_R].add(1, mode="drop"))
  k, v, pos = st.k_SxKxTxH, st.v_SxKxTxH, st.pos_SxT
  if seg is not None:   # each row's own segment as a T_1-long window; the rest hidden
    tv = max(eng.seg_sizes)
    window = jax.vmap(lambda x, o: jax.lax.dynamic_slice_in_dim(x, o, tv, axis=x.ndim - 2))
    k, v = window(k, off_R), window(v, off_R)   # contiguous [K, T_1, H] blocks per row
    t_1xV = jnp.arange(tv, dtype=jnp.int32)[None]
    pos = jnp.where(t_1xV < size_R[:, None], window(pos[..., None], off_R)[..., 0], -1)
  elif rows_R is not None:
    k, v, pos = k[rows_R], v[rows_R], pos[rows_R]
  # attend() wants [R, T, K, H]; its einsum transposes back, and XLA cancels the pair.
  view = KV(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos)
  return attend(q_Rx1xNxH, view, pos_R[:, None]), st


def reset_rows(stores, rows_R):
  """Empties the given rows (dropped indices are ignored): a new request takes the slot."""
  reset = lambda st: st._replace(pos_SxT=st.pos_SxT.at[rows_R].set(-1, mode="drop"),
                                 length_SxG=st.length_SxG.at[rows_R].set(0, mode="drop"))
  return jax.tree.map(reset, stores, is_leaf=lambda x: isinstance(x, Store))
