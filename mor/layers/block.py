"""Pre-norm Transformer block: x + Attn(norm(x)), then x + MLP(norm(x))."""
from __future__ import annotations

import jax
from flax import nnx

from mor.config import ModelConfig
from mor.layers.attention import Attention
from mor.layers.basic import RMSNorm
from mor.layers.lora import spec_for
from mor.layers.mlp import SwiGLU


class Block(nnx.Module):
  """One decoder layer. `mlp` may be replaced (MoE); it returns y or (y, aux).

  lora_num > 0 (with cfg.lora_rank) gives a block tied over lora_num recursions
  one LoRA adapter per recursion (mor.layers.lora); it must then be called
  with `recursion`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mlp: nnx.Module | None = None,
               lora_num: int = 0):
    lora = spec_for(cfg, lora_num)
    self.lora_num = lora_num if lora else 0
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dh, cfg.rope_theta,
                          cfg.init_std, rngs, lora=lora, impl=cfg.attention)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.mlp = mlp if mlp is not None else SwiGLU(cfg.d_model, cfg.ffn_dim, cfg.init_std, rngs,
                                                  lora=lora)

  def __call__(self, x_BxSxD: jax.Array, pos_BxS: jax.Array, *, cache=None, shared_kv=None,
               valid_BxS=None, recursion: int | None = None):
    """Returns (x_BxSxD, cache, kv, aux); aux is {} unless the MLP reports statistics."""
    if self.lora_num and recursion is None:
      raise ValueError("this block has per-recursion LoRA adapters: pass recursion=r")
    h, cache, kv = self.attn(self.attn_norm(x_BxSxD), pos_BxS, cache=cache, shared_kv=shared_kv,
                             valid_BxS=valid_BxS, recursion=recursion)
    x_BxSxD = x_BxSxD + h
    h = self.mlp_norm(x_BxSxD)
    out = self.mlp(h) if recursion is None else self.mlp(h, recursion=recursion)
    y, aux = out if isinstance(out, tuple) else (out, {})
    return x_BxSxD + y, cache, kv, aux
