"""Relaxation: per-recursion LoRA adapters on a shared block's projections.

A block tied across N_r recursions applies, at recursion r, W + A_r B_r to
each adapted projection W (q, k, v, o, gate, up, down; `ModelConfig.lora_targets`),
so tied layers may differ slightly (the reference's "relaxed" recursion).
B starts at zero, so a model with fresh adapters computes exactly what it
computed without them; A ~ N(0, 1/d_in) keeps x A at the scale of x (the same
variance scale as peft's default), so B's first gradients are well scaled.

Cost per token and per adapted projection: 2 * rank * (d_in + d_out) FLOPs
(`flops_per_token`), on every application of a shared block.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
from flax import nnx

from mor.config import ModelConfig
from mor.layers.basic import dense, param

# target -> (sub-module, weight attribute, number of leading input axes of the weight)
PROJECTIONS = {"q": ("attn", "wq", 1), "k": ("attn", "wk", 1), "v": ("attn", "wv", 1),
               "o": ("attn", "wo", 2), "gate": ("mlp", "w_gate", 1), "up": ("mlp", "w_up", 1),
               "down": ("mlp", "w_down", 1)}


class LoRASpec(NamedTuple):
  num: int                  # recursions applying the block: one adapter each
  rank: int
  targets: tuple[str, ...]


def spec_for(cfg: ModelConfig, num: int) -> LoRASpec | None:
  """The adapters of a block applied `num` times; None when relaxation is off or unshared."""
  return LoRASpec(num, cfg.lora_rank, tuple(cfg.lora_targets)) if cfg.lora_rank and num else None


class LoRA(nnx.Module):
  """Low-rank updates A_r [*in, rank] B_r [rank, *out] of one weight [*in, *out], r < num."""

  def __init__(self, w: nnx.Param, n_in: int, num: int, rank: int, rngs: nnx.Rngs):
    shape, axes = w.get_raw_value().shape, tuple(w.get_metadata()["axes"])
    d_in = math.prod(shape[:n_in])
    # The recursion and rank axes are small: replicated (logical axis None).
    self.a = param(rngs, (num, *shape[:n_in], rank), (None, *axes[:n_in], None), d_in ** -0.5)
    self.b = param(rngs, (num, rank, *shape[n_in:]), (None, None, *axes[n_in:]), init="zeros")

  def __call__(self, x: jax.Array, recursion: int) -> jax.Array:
    """x A_r B_r, x [..., d_in] (input axes flattened) -> [..., *out]."""
    dt, a = x.dtype, self.a[recursion]
    return dense(dense(x, a.reshape(-1, a.shape[-1]), dt), self.b[recursion], dt)

  def delta(self, recursion: int) -> jax.Array:
    """A_r B_r in the layout of the adapted weight (for merging)."""
    a, b = self.a[recursion], self.b[recursion]
    r = a.shape[-1]
    return (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(a.shape[:-1] + b.shape[1:])


def adapters(spec: LoRASpec | None, module: nnx.Module, kind: str,
             rngs: nnx.Rngs) -> nnx.Dict | None:
  """Adapters for the targets of one sub-module kind ("attn" or "mlp") of a block."""
  if spec is None:
    return None
  out = {t: LoRA(getattr(module, attr), n_in, spec.num, spec.rank, rngs)
         for t, (sub, attr, n_in) in PROJECTIONS.items() if sub == kind and t in spec.targets}
  return nnx.Dict(out) if out else None


def project(x: jax.Array, w: jax.Array, dtype, lora: nnx.Dict | None, target: str,
            recursion: int | None) -> jax.Array:
  """x W (+ x A_r B_r when the target has adapters and a recursion is given)."""
  y = dense(x, w, dtype)
  if recursion is None or lora is None or target not in lora:
    return y
  return y + lora[target](x.astype(dtype), recursion).astype(y.dtype)


def applied_recursions(plan) -> tuple[int | None, ...]:
  """Per applied layer: which recursion of its shared block it is (None outside the unit)."""
  unit, n_pre = set(plan.unit), len(plan.prefix)
  out = []
  for j, b in enumerate(plan.applied):
    i = j - n_pre
    if b not in unit or plan.num_recursions == 1:
      out.append(None)
    else:
      out.append(i // len(plan.unit) if plan.cycle else i % plan.num_recursions)
  return tuple(out)


def block_weights(block: nnx.Module, recursion: int | None) -> dict[str, jax.Array]:
  """The weights one application of a block uses, with its recursion's adapters folded in."""
  out = {"attn_norm": block.attn_norm.scale[...], "mlp_norm": block.mlp_norm.scale[...]}
  for target, (sub, attr, _) in PROJECTIONS.items():
    w = getattr(getattr(block, sub), attr)[...]
    lora = getattr(getattr(block, sub), "lora", None)
    if recursion is not None and lora is not None and target in lora:
      w = w + lora[target].delta(recursion)
    out[attr] = w
  return out


def has_adapters(model: nnx.Module) -> bool:
  return any(getattr(b.attn, "lora", None) is not None or getattr(b.mlp, "lora", None) is not None
             for b in model.blocks)


def set_block_weights(block, w: dict) -> None:
  """Writes a `block_weights`-style dict (norm scales and base projections) into a block."""
  block.attn_norm.scale.set_value(w["attn_norm"])
  block.mlp_norm.scale.set_value(w["mlp_norm"])
  for sub, attr, _ in PROJECTIONS.values():
    getattr(getattr(block, sub), attr).set_value(w[attr])


def flops_per_token(cfg: ModelConfig) -> float:
  """Forward FLOPs the adapters add to one application of a shared block, per token."""
  d, f = cfg.d_model, cfg.ffn_dim
  q, kv = cfg.num_heads * cfg.dh, cfg.num_kv_heads * cfg.dh
  sizes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
           "down": (f, d)}
  return sum(2 * cfg.lora_rank * sum(sizes[t]) for t in cfg.lora_targets) if cfg.lora_rank else 0.0
