"""Grouped-query causal self-attention with RoPE and explicit keys/values.

Masking is by original token positions: a query at position p sees every key
whose position is in [0, p]. The same code therefore serves a full sequence, a
gathered subset of tokens (MoR), a KV cache, and keys shared from another
recursion (recursive KV sharing).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mor import kv_cache
from mor.layers import lora as lora_lib
from mor.layers.basic import CPU_LOOP_SCOPE, merge_strided, num_chunks, param, split_strided
from mor.layers.rope import apply_rope


class KV(NamedTuple):
  k_BxTxKxH: jax.Array
  v_BxTxKxH: jax.Array
  pos_BxT: jax.Array


# Where each `model.attention` choice runs what, by lowering platform (ATTENTIONS in
# mor.config). Resolved with lax.platform_dependent, so that a program exported from
# this CPU for cuda/tpu gets the accelerator branch, not what jax.default_backend() says.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def attend(q_BxSxNxH: jax.Array, kv: KV, q_pos_BxS: jax.Array, impl: str = "auto",
           index_causal: bool = False) -> jax.Array:
  """Softmax attention of each query over the keys at positions <= its own.

  impl: "auto" (by platform: splash on TPU, dot_product on GPU, xla elsewhere),
  "xla_dense" (one masked S x T product, the reference), "xla" (causal key
  blocks skipped; on CPU looped over rows to stay in cache), "dot_product"
  (jax.nn.dot_product_attention; cuDNN flash attention on GPU in bf16/f16) or
  "splash" (Pallas splash attention; interpreted off TPU). index_causal: the
  caller guarantees that a key after the query's index is masked (one
  sequence's tokens, or a subset gathered in original order, hidden keys at
  position -1), as in training self-attention; only then may a kernel skip key
  blocks or use a plain causal mask. Otherwise (KV caches, shared keys) every
  impl but dot_product runs the dense path. Rows of queries at position -1
  (hidden) are unspecified: callers drop them.
  """
  if impl not in ("auto", "xla", "xla_dense", "dot_product", "splash"):
    raise ValueError(f"attention impl={impl!r}; choose auto, xla, xla_dense, dot_product or "
                     "splash")
  if impl == "xla_dense" or not (index_causal or impl == "dot_product"):
    return _attend_dense(q_BxSxNxH, kv, q_pos_BxS)
  # one branch object per distinct program: platform_dependent joins equal branches
  programs, per_platform = {}, {}
  for platform in PLATFORMS + (None,):
    choice = _resolve(impl, platform, index_causal)
    key = (choice, _VARIANT[choice](platform))
    if key not in programs:
      programs[key] = functools.partial(_attend_on, choice, platform, index_causal)
    per_platform[platform] = programs[key]
  default = per_platform.pop(None)
  return jax.lax.platform_dependent(q_BxSxNxH, kv, q_pos_BxS, **per_platform, default=default)


# what makes one platform's program of an impl differ from another's
_VARIANT = {"xla_dense": lambda p: None, "xla": lambda p: p == "cpu",
            "dot_product": lambda p: p in ("cuda", "rocm"), "splash": lambda p: p == "tpu"}


def _resolve(impl: str, platform: str | None, index_causal: bool) -> str:
  """The implementation `impl` runs on `platform` (None: any other)."""
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "splash"
  if platform in ("cuda", "rocm"):
    return "dot_product"
  return "xla"


def _attend_on(impl: str, platform: str | None, index_causal: bool, q_BxSxNxH: jax.Array,
               kv: KV, q_pos_BxS: jax.Array) -> jax.Array:
  """attend for one resolved impl, traced for one platform (a platform_dependent branch)."""
  if impl == "xla_dense":
    return _attend_dense(q_BxSxNxH, kv, q_pos_BxS)
  if impl == "xla":
    return _attend_blocked(q_BxSxNxH, kv, q_pos_BxS, cpu=platform == "cpu")
  if impl == "dot_product":
    return _attend_dot_product(q_BxSxNxH, kv, q_pos_BxS, index_causal,
                               gpu=platform in ("cuda", "rocm"))
  return _attend_splash(q_BxSxNxH, kv, q_pos_BxS, tpu=platform == "tpu")


def _mask(k_pos_BxT: jax.Array, q_pos_BxS: jax.Array) -> jax.Array:
  k_pos = k_pos_BxT[:, None, :]
  return (k_pos >= 0) & (k_pos <= q_pos_BxS[:, :, None])


def _attend_dense(q_BxSxNxH: jax.Array, kv: KV, q_pos_BxS: jax.Array) -> jax.Array:
  """The reference: one masked [G*S, T] product per KV head.

  The G query heads of a KV group are folded into the query axis, so both
  products are plain batched matmuls [B*K] x [G*S, H] x [H, T]: XLA on CPU ran
  this layout 2x faster (forward) than a five-axis einsum.
  """
  b, s, n, h = q_BxSxNxH.shape
  k = kv.k_BxTxKxH.shape[2]
  g = n // k
  dt = q_BxSxNxH.dtype
  q_BxKxQxH = q_BxSxNxH.reshape(b, s, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * s, h)
  k_BxKxTxH = kv.k_BxTxKxH.astype(dt).transpose(0, 2, 1, 3)
  v_BxKxTxH = kv.v_BxTxKxH.astype(dt).transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkqh,bkth->bkqt", q_BxKxQxH, k_BxKxTxH,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  mask_BxSxT = _mask(kv.pos_BxT, q_pos_BxS)
  logits = jnp.where(mask_BxSxT[:, None, None], logits.reshape(b, k, g, s, -1), -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(dt).reshape(b, k, g * s, -1)
  out_BxKxQxH = jnp.einsum("bkqt,bkth->bkqh", probs, v_BxKxTxH)
  return out_BxKxQxH.reshape(b, k, g, s, h).transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


def _block_size(s: int) -> int:
  """Query rows per block: 64 (fastest at S = 512 on the 2-core CPU), at most 16 blocks."""
  return max(64, -(-s // 16))


# (batch, KV head) rows per iteration of the blocked kernel's loop, fastest on the CPU
# (docs/notes/train_step.md: 4 of the 32 rows at the issue-12 shape: forward 9-10 ms
# against 27-29 unlooped)
ROWS_PER_ITERATION = 4


def _attend_blocked(q_BxSxNxH: jax.Array, kv: KV, q_pos_BxS: jax.Array,
                    cpu: bool = True) -> jax.Array:
  """Index-causal attention that never computes a key block after the query block.

  Query block i (rows [i*Q, (i+1)*Q)) attends over keys [0, (i+1)*Q) with the
  position mask: about half the products and softmax work of the dense path at
  S = 512 (36/64 of the blocks). Each (batch, KV head) pair is one row of
  `_blocked_core`, its G query heads folded into the block's query rows; the
  scale goes on q. Rows past S (padding to whole blocks) are hidden and sliced off.
  cpu: loop over groups of rows (ROWS_PER_ITERATION, tuned for CPU caches); off
  CPU all rows run in one batched op (an accelerator wants the whole batch at once).
  """
  b, s, n, h = q_BxSxNxH.shape
  t, k = kv.k_BxTxKxH.shape[1], kv.k_BxTxKxH.shape[2]
  g, qb = n // k, _block_size(s)
  nb = -(-s // qb)
  if nb < 2 or t != s:
    return _attend_dense(q_BxSxNxH, kv, q_pos_BxS)
  dt = q_BxSxNxH.dtype
  pad = nb * qb - s
  q = (q_BxSxNxH * jnp.asarray(h ** -0.5, dt))
  q_pos = q_pos_BxS
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_pos_BxS, ((0, 0), (0, pad)), constant_values=-1)
  r = b * k
  q_RxIxQxH = q.reshape(b, nb, qb, k, g, h).transpose(0, 3, 1, 4, 2, 5).reshape(
      r, nb, g * qb, h)
  rows = lambda x: x.astype(dt).transpose(0, 2, 1, 3).reshape(r, t, h)
  per_row = lambda p: jnp.repeat(p, k, axis=0)     # rows are (batch, KV head), head minor
  # rows split strided: a sharded batch stays so; one group (no loop) off CPU
  iters = num_chunks(r, ROWS_PER_ITERATION) if cpu else 1
  out = _blocked_core(q_RxIxQxH, rows(kv.k_BxTxKxH), rows(kv.v_BxTxKxH), per_row(kv.pos_BxT),
                      per_row(q_pos), qb, iters)
  return out.reshape(b, k, nb, g, qb, h).transpose(0, 2, 4, 1, 3, 5).reshape(
      b, nb * qb, n, h)[:, :s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked_core(q_RxIxQxH, k_RxTxH, v_RxTxH, kpos_RxT, qpos_RxS, qb: int, iters: int):
  """Blocked causal softmax attention over rows (q pre-scaled, G heads folded in Q).

  A loop over `iters` groups of rows rather than one batched op: each iteration's
  logits, probabilities and value product stay in cache, which ran the forward
  3x faster on the CPU. The custom VJP keeps the loop in the backward too (autodiff
  of the loop stacked per-iteration residuals and ran slower) and saves only each
  row's log-sum-exp: recomputing the probabilities in cache beat saving them
  (33-41 ms against 55-66 ms forward + backward per layer; docs/notes/train_step.md).
  """
  return _blocked_fwd(q_RxIxQxH, k_RxTxH, v_RxTxH, kpos_RxT, qpos_RxS, qb, iters)[0]


def _block_logits(q, k, kpos, qpos, i: int, qb: int) -> jax.Array:
  """Masked f32 logits [C, G, Q, end] of query block i over keys [0, end)."""
  c, _, gq, _ = q.shape
  end = min((i + 1) * qb, k.shape[1])
  logits = jnp.einsum("cqh,cth->cqt", q[:, i], k[:, :end],
                      preferred_element_type=jnp.float32).reshape(c, gq // qb, qb, end)
  mask_CxQxT = _mask(kpos[:, :end], qpos[:, i * qb:(i + 1) * qb])
  return jnp.where(mask_CxQxT[:, None], logits, -1e30)


def _rows_fwd(q, k, v, kpos, qpos, qb: int):
  """One group of rows: out [C, I, G*Q, H] and the log-sum-exp of each query [C, I, G*Q, 1]."""
  c, nb, gq, h = q.shape
  outs, lses = [], []
  for i in range(nb):
    logits = _block_logits(q, k, kpos, qpos, i, qb)
    end = logits.shape[-1]
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    # normalised after the value product: a divide on [Q, H], not [Q, T]
    o = jnp.einsum("cqt,cth->cqh", e.astype(q.dtype).reshape(c, gq, end), v[:, :end],
                   preferred_element_type=jnp.float32).reshape(total.shape[:-1] + (h,))
    outs.append((o / total).reshape(c, gq, h).astype(q.dtype))
    lses.append((m + jnp.log(total)).reshape(c, gq, 1))
  return jnp.stack(outs, axis=1), jnp.stack(lses, axis=1)


def _rows_bwd(q, k, v, kpos, qpos, lse, out, dout, qb: int):
  """Gradients of one group of rows; the probabilities are recomputed from lse."""
  c, nb, gq, h = q.shape
  t, dt = k.shape[1], q.dtype
  # d softmax: dlogits = p * (dp - sum_t p dp), and sum_t p dp = sum_h dout * out
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for i in range(nb):
    logits = _block_logits(q, k, kpos, qpos, i, qb)
    end = logits.shape[-1]
    # masked entries: exp(-1e30 - lse) = 0; a fully hidden (padding) row gets 1s, and its
    # dout is zero (its rows are sliced off or dropped by the caller)
    p = jnp.exp(logits - lse[:, i].reshape(c, -1, qb, 1)).reshape(c, gq, end)
    dp = jnp.einsum("cqh,cth->cqt", dout[:, i], v[:, :end], preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[:, i])).astype(dt)
    dq.append(jnp.einsum("cqt,cth->cqh", ds, k[:, :end],
                         preferred_element_type=jnp.float32).astype(dt))
    to_t = ((0, 0), (0, t - end), (0, 0))
    dk = dk + jnp.pad(jnp.einsum("cqt,cqh->cth", ds, q[:, i],
                                 preferred_element_type=jnp.float32), to_t)
    dv = dv + jnp.pad(jnp.einsum("cqt,cqh->cth", p.astype(dt), dout[:, i],
                                 preferred_element_type=jnp.float32), to_t)
  return jnp.stack(dq, axis=1), dk.astype(k.dtype), dv.astype(v.dtype)


def _map_rows(fn, args: tuple, iters: int):
  """fn over the `iters` groups of rows: a loop when iters > 1, else one call (no loop op)."""
  if iters == 1:
    return jax.tree.map(lambda x: x[None], fn(tuple(x[0] for x in args)))
  with jax.named_scope(f"{CPU_LOOP_SCOPE}_attention"):
    return jax.lax.map(fn, args)


def _blocked_fwd(q, k, v, kpos, qpos, qb, iters):
  args = tuple(split_strided(x, iters) for x in (q, k, v, kpos, qpos))
  out, lse = _map_rows(lambda a: _rows_fwd(*a, qb), args, iters)
  return merge_strided(out), (args, lse, out)


def _blocked_bwd(qb, iters, res, dout):
  args, lse, out = res
  dq, dk, dv = _map_rows(lambda a: _rows_bwd(*a, qb),
                         args + (lse, out, split_strided(dout, iters)), iters)
  return merge_strided(dq), merge_strided(dk), merge_strided(dv), None, None


_blocked_core.defvjp(_blocked_fwd, _blocked_bwd)


def _attend_dot_product(q_BxSxNxH: jax.Array, kv: KV, q_pos_BxS: jax.Array,
                        index_causal: bool, gpu: bool = False) -> jax.Array:
  """jax.nn.dot_product_attention: cuDNN flash attention on GPU (bf16/f16), XLA elsewhere.

  Index-causal calls use is_causal plus a [B, 1, 1, T] key-validity mask (hidden
  keys may sit anywhere); others pass the full position mask. cuDNN needs a GPU
  at trace time, so a cuda program exported from a CPU host carries the XLA form.
  """
  dt = q_BxSxNxH.dtype
  k, v = kv.k_BxTxKxH.astype(dt), kv.v_BxTxKxH.astype(dt)
  cudnn = (gpu and jax.default_backend() == "gpu" and dt in (jnp.bfloat16, jnp.float16))
  if index_causal:
    valid = (kv.pos_BxT >= 0)[:, None, None, :]
    return jax.nn.dot_product_attention(q_BxSxNxH, k, v, mask=valid, is_causal=True,
                                        implementation="cudnn" if cudnn else "xla")
  mask = _mask(kv.pos_BxT, q_pos_BxS)[:, None]
  return jax.nn.dot_product_attention(q_BxSxNxH, k, v, mask=mask, implementation="xla")


SPLASH_BLOCK = 128   # the kernel's smallest block; sequences are padded to a multiple


def _splash_block(s: int) -> int:
  """The largest of 512, 256, 128 that divides the padded length s (bigger blocks: fewer steps)."""
  return next(b for b in (512, 256, SPLASH_BLOCK) if s % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(s: int, g: int, interpret: bool):
  """The causal MQA splash kernel for length s and g query heads per KV head.

  Cached: building the mask metadata is numpy work that, redone for every layer
  and every trace (forward, remat, backward), made tracing a small step 3x slower.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as sk, splash_attention_mask as sm)
  mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(g)])
  bq = _splash_block(s)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq,
                         block_kv_dkv=bq, block_kv_dkv_compute=bq, block_q_dq=bq,
                         block_kv_dq=bq)
  with jax.ensure_compile_time_eval():   # concrete metadata even when first built in a trace
    kernel = sk.make_splash_mha(mask, block_sizes=blocks, is_mqa=True, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
  # numpy metadata: embedded as constants in any trace (device arrays captured by a jit
  # are hoisted into extra arguments, which jax.export rejects)
  return jax.tree.map(np.asarray, kernel)


def _attend_splash(q_BxSxNxH: jax.Array, kv: KV, q_pos_BxS: jax.Array,
                   tpu: bool = False) -> jax.Array:
  """Pallas splash attention with a causal mask (the TPU kernel; interpreted off TPU).

  Hidden keys and queries (position -1, anywhere: MoR's gathered per-depth
  sequences) get segment 1, the rest 0, so the causal mask plus segments equal
  the position mask for valid queries. Lengths are padded with hidden rows to
  a multiple of 128 (a depth's k tokens need not be one). One MQA kernel per KV
  head (its G query heads): GQA without repeating keys.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, s0, n, h = q_BxSxNxH.shape
  k = kv.k_BxTxKxH.shape[2]
  if kv.k_BxTxKxH.shape[1] != s0:   # not self-attention: no causal index order to use
    return _attend_dense(q_BxSxNxH, kv, q_pos_BxS)
  pad = -s0 % SPLASH_BLOCK
  s, g, dt = s0 + pad, n // k, q_BxSxNxH.dtype
  rows = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  q_pos = jnp.pad(q_pos_BxS, ((0, 0), (0, pad)), constant_values=-1)
  k_pos = jnp.pad(kv.pos_BxT, ((0, 0), (0, pad)), constant_values=-1)
  kernel = _splash_kernel(s, g, not tpu)
  seg = sk.SegmentIds(q=(q_pos < 0).astype(jnp.int32), kv=(k_pos < 0).astype(jnp.int32))
  q_BxKxGxSxH = rows(q_BxSxNxH * jnp.asarray(h ** -0.5, dt)).reshape(b, s, k, g, h).transpose(
      0, 2, 3, 1, 4)
  k_BxKxTxH = rows(kv.k_BxTxKxH.astype(dt)).transpose(0, 2, 1, 3)
  v_BxKxTxH = rows(kv.v_BxTxKxH.astype(dt)).transpose(0, 2, 1, 3)
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))                # over KV heads
  run = jax.vmap(per_head)                                            # over the batch
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    # a Mosaic kernel is not partitioned automatically: each device runs it on its own
    # batch rows and KV heads (the layout the model's logical axes give them)
    from mor import sharding
    spec = sharding.logical_to_spec(("batch", "kv_heads"), mesh, (b, k))
    P = jax.sharding.PartitionSpec
    q_spec, kv_spec, rows_spec = P(*spec, None, None, None), P(*spec, None, None), P(spec[0])
    run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                  sk.SegmentIds(rows_spec, rows_spec)),
                        out_specs=q_spec, check_vma=False)
  out = run(q_BxKxGxSxH, k_BxKxTxH, v_BxKxTxH, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)[:, :s0].astype(dt)


class Attention(nnx.Module):
  """Multi-head attention with num_kv_heads key/value heads shared by head groups."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
               rope_theta: float, std: float, rngs: nnx.Rngs,
               lora: lora_lib.LoRASpec | None = None, impl: str = "auto"):
    self.wq = param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), std)
    self.wk = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                    std)
    self.wv = param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                    std)
    self.wo = param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), std)
    self.rope_theta = rope_theta
    self.impl = impl
    self.lora = lora_lib.adapters(lora, self, "attn", rngs)  # per-recursion; None: no relaxation

  def project_kv(self, x_BxSxD: jax.Array, pos_BxS: jax.Array,
                 recursion: int | None = None) -> KV:
    dt = x_BxSxD.dtype
    proj = lambda w, t: lora_lib.project(x_BxSxD, w[...], dt, self.lora, t, recursion)
    k = apply_rope(proj(self.wk, "k"), pos_BxS, self.rope_theta)
    return KV(k, proj(self.wv, "v"), pos_BxS)

  def __call__(self, x_BxSxD: jax.Array, pos_BxS: jax.Array, *,
               cache: kv_cache.KVCache | None = None, shared_kv: KV | None = None,
               valid_BxS: jax.Array | None = None, recursion: int | None = None):
    """Returns (y_BxSxD, updated cache or None, this call's own KV or the shared one).

    shared_kv: attend over these keys/values instead of projecting new ones.
    cache: append this call's keys (the valid tokens) and attend over the cache.
    recursion: which recursion's LoRA adapters to add (None: the shared weights alone).
    """
    dt = x_BxSxD.dtype
    q = lora_lib.project(x_BxSxD, self.wq[...], dt, self.lora, "q", recursion)
    q = apply_rope(q, pos_BxS, self.rope_theta)
    kv = shared_kv if shared_kv is not None else self.project_kv(x_BxSxD, pos_BxS, recursion)
    if cache is not None and shared_kv is None:
      cache = kv_cache.write(cache, kv.k_BxTxKxH, kv.v_BxTxKxH, pos_BxS, valid_BxS)
      ctx = attend(q, KV(cache.k_BxTxKxH, cache.v_BxTxKxH, cache.pos_BxT), pos_BxS, self.impl)
    else:
      # self-attention over this call's own tokens is index-causal (see attend)
      ctx = attend(q, kv, pos_BxS, self.impl, index_causal=shared_kv is None)
    b, s, n, h = ctx.shape
    y = lora_lib.project(ctx.reshape(b, s, n * h), self.wo[...].reshape(n * h, -1), dt,
                         self.lora, "o", recursion)
    return y, cache, kv
