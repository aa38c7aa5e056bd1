"""Llama-style decoder; vanilla, recursive (shared blocks) and MoE share this class.

The model reads top to bottom: embed, apply the plan's blocks in order (a
recursive model applies its shared blocks N_r times), final norm, LM head.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mor import kv_cache, sharding
from mor.config import ModelConfig
from mor.layers import Block, Embed, RMSNorm, dense, param
from mor.layers.lora import applied_recursions
from mor.models.sharing import make_plan

Aux = dict  # {"losses": {name: weighted scalar}, "stats": {name: array}}


def merge_aux(*auxes: Aux, prefix: str = "") -> Aux:
  """Merges aux dicts, prefixing names; the one place aux losses are collected."""
  out: Aux = {"losses": {}, "stats": {}}
  for a in auxes:
    for part in ("losses", "stats"):
      for k, v in a.get(part, {}).items():
        out[part][prefix + k] = v
  return out


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def default_positions(tokens_BxS: jax.Array) -> jax.Array:
  b, s = tokens_BxS.shape
  return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


class Transformer(nnx.Module):
  """Decoder whose applied layers follow a sharing plan.

  mlp_factory(block_index, rngs) may return a replacement MLP (MoE) or None.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               mlp_factory: Callable[[int, nnx.Rngs], nnx.Module | None] | None = None):
    self.cfg = cfg
    self.plan = make_plan(cfg)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, rngs)
    shared = set(self.plan.unit) if self.plan.num_recursions > 1 else set()
    self.blocks = nnx.List([
        Block(cfg, rngs, mlp=mlp_factory(i, rngs) if mlp_factory else None,
              lora_num=cfg.num_recursions if i in shared else 0)
        for i in range(self.plan.num_blocks)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

  @property
  def num_applied_layers(self) -> int:
    return len(self.plan.applied)

  def init_caches(self, batch: int, max_len: int) -> list:
    """One empty KV cache per applied layer (a shared block gets one per application)."""
    c = self.cfg
    return [kv_cache.init_cache(batch, max_len, c.num_kv_heads, c.dh, compute_dtype(c))
            for _ in self.plan.applied]

  def embed_tokens(self, tokens_BxS: jax.Array) -> jax.Array:
    # the gather from an FSDP/tensor-sharded table would otherwise leave the
    # activations sharded over embed; pin them to the batch layout
    x = self.embed(tokens_BxS, compute_dtype(self.cfg))
    return sharding.constrain(x, ("batch", "sequence", None))

  def head_weight(self) -> jax.Array:
    """The LM head as [D, V] (the embedding table, transposed, when tied)."""
    return self.embed.table[...].T if self.cfg.tie_embeddings else self.head[...]

  def logits(self, x_BxSxD: jax.Array) -> jax.Array:
    """Final norm and LM head; logits in float32 for a stable softmax."""
    h = self.final_norm(x_BxSxD)
    logits = dense(h, self.head_weight(), h.dtype).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "sequence", "vocab"))

  def _out(self, x_BxSxD: jax.Array, head: bool) -> jax.Array:
    """Logits, or (head=False) the final-normed hidden states the head would read."""
    return self.logits(x_BxSxD) if head else self.final_norm(x_BxSxD)

  def apply_block(self, index: int, x_BxSxD, pos_BxS, recursion: int | None = None, **kw):
    """Applies unique block `index`; rematerialised in training when cfg.remat.

    recursion: which application of a shared block this is, selecting its LoRA
    adapters (None: no adapters; the block's code path is then unchanged).
    """
    block = self.blocks[index]
    if recursion is not None:
      kw["recursion"] = recursion
    if self.cfg.remat and set(kw) <= {"recursion"}:
      return nnx.remat(lambda blk, x, p: blk(x, p, **kw))(block, x_BxSxD, pos_BxS)
    return block(x_BxSxD, pos_BxS, **kw)

  def __call__(self, tokens_BxS: jax.Array, pos_BxS: jax.Array | None = None,
               caches: list | None = None, step: jax.Array | None = None,
               routing: str = "topk", head: bool = True):
    """Returns (logits_BxSxV, caches or None, aux).

    head=False returns the final-normed hidden states [B, S, D] instead of
    logits, for a loss that applies `head_weight()` itself (train.lm_head_cross_entropy).

    `step` (the training step, for schedules inside a model such as MoR capacity
    warm-up) and `routing` ("topk" as in training, or "causal" as at inference)
    let every model kind be called the same way; a dense model ignores both.

    With `caches` (one KVCache per applied layer) the new tokens' keys are
    appended and attention runs over the cache: prefill and decoding.
    """
    pos_BxS = default_positions(tokens_BxS) if pos_BxS is None else pos_BxS
    x = self.embed_tokens(tokens_BxS)
    new_caches, auxes = [], []
    recs = applied_recursions(self.plan) if self.cfg.lora_rank else (None,) * len(self.plan.applied)
    for j, b in enumerate(self.plan.applied):
      kw = {} if caches is None else {"cache": caches[j]}
      x, cache, _, aux = self.apply_block(b, x, pos_BxS, recursion=recs[j], **kw)
      new_caches.append(cache)
      auxes.append(merge_aux(aux, prefix=f"layer{j}/"))
    return self._out(x, head), (new_caches if caches is not None else None), merge_aux(*auxes)


def _size(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def count_params(model: nnx.Module) -> dict:
  """Unique parameters, and parameters applied per token (tied blocks counted per use).

  Works on abstract models too (`nnx.eval_shape`), so paper sizes cost nothing.
  """
  unique = _size(model)
  emb = _size(model.embed)
  head = 0 if model.cfg.tie_embeddings else model.head.get_raw_value().size
  per_block = [_size(b) for b in model.blocks]
  applied_blocks = sum(per_block[b] for b in model.plan.applied)
  other = unique - emb - head - sum(per_block)   # final norm, routers
  return {"unique": unique, "unique_non_embedding": unique - emb - head,
          "applied_non_embedding": applied_blocks + other,
          "applied": applied_blocks + other + emb + head, "embedding": emb + head}
