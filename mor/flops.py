"""Analytic FLOP counter.

Convention (REFERENCE.md section 3), counted per sequence of S tokens and
reported per token:
- a multiply-add is 2 FLOPs; only matmuls are counted (norms, RoPE, softmax,
  activations and the embedding lookup are ignored);
- per layer and per query token: Q 2*D*N*H, K and V 4*D*K*H, O 2*N*H*D,
  SwiGLU 6*D*F; attention scores and the weighted sum 4*T*N*H where T is the
  number of keys the query attends to;
- `causal=True` counts the keys a causal query really needs (T = (n+1)/2 on
  average over n tokens); `causal=False` counts the full n x n score matrix
  that a masked dense kernel computes, which is what the compiler reports;
- the LM head 2*D*V per token is counted; training is 3 x forward (backward
  is twice the forward), rematerialisation is not counted (model FLOPs);
- MoR: a recursion step runs the shared unit on the k_r tokens still active
  (`mor.routers.capacities`, the static slot counts actually computed); with
  recursive KV caching attention is among those k_r tokens, with KV sharing the
  k_r queries attend over the first recursion's keys of all S tokens and later
  steps skip K/V projections; routers are counted;
- MoE: model FLOPs count the top-k active experts per token; hardware FLOPs
  count every capacity slot (padding included) of the capacity-based path;
- LoRA relaxation: 2 * rank * (d_in + d_out) per adapted projection per token
  on every application of a shared block (reported in the `router` column).

Two budget conventions (`train.flop_convention`, `budget_flops_per_token`):
- "paper" (default): the paper's FLOP budgets (2e18, 5e18, 16.5e18) are FORWARD
  FLOPs, 2 x parameters per token plus causal attention, norms and activations
  ignored, MoR counted per depth from its static capacities (perfect balance).
  That is `forward_flops_per_token(causal=True)`: the matmul terms above are
  exactly 2 x the block and tied-head parameters that a token passes through.
  360M vanilla: 849M per token, so 16.5e18 buys 19.4B tokens (the paper's 20B).
- "training": 3 x that forward (forward + backward), the model FLOPs a training
  step really costs; the same budget then buys a third of the tokens.
MFU and throughput always use training FLOPs, whatever the budget convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from mor.config import ModelConfig
from mor.models.sharing import make_plan


@dataclass(frozen=True)
class LayerFlops:
  name: str
  tokens: float          # query tokens processed per sequence
  proj: float            # Q, K, V, O projections
  attn: float            # scores + weighted values
  mlp: float             # feed-forward (dense or active experts)
  router: float = 0.0

  @property
  def total(self) -> float:
    return self.proj + self.attn + self.mlp + self.router


def _attn_keys(n: float, keys: float, causal: bool) -> float:
  """Average keys per query: all `keys`, or the causal prefix among them."""
  if not causal:
    return keys
  return (keys + 1) / 2 if keys == n else keys / 2


def _layer(cfg: ModelConfig, name: str, n: float, keys: float, causal: bool,
           project_kv: bool = True, mlp_flops_per_token: float | None = None,
           router: float = 0.0) -> LayerFlops:
  d, h, nh, kv = cfg.d_model, cfg.dh, cfg.num_heads, cfg.num_kv_heads
  proj = n * (2 * d * nh * h + 2 * nh * h * d + (4 * d * kv * h if project_kv else 0))
  attn = n * 4 * _attn_keys(n, keys, causal) * nh * h
  mlp = n * (6 * d * cfg.ffn_dim if mlp_flops_per_token is None else mlp_flops_per_token)
  return LayerFlops(name, n, proj, attn, mlp, router)


def _moe_mlp(cfg: ModelConfig, hardware: bool, seq_tokens: int, batch: int) -> float:
  """Per-token FLOPs of a MoE MLP: active experts (model) or capacity slots (hardware)."""
  e = cfg.moe
  f = e.expert_ffn_dim or cfg.ffn_dim
  router = 2 * cfg.d_model * e.num_experts * (2 if e.router == "noisy_topk" else 1)
  k = 1 if e.router == "switch" else e.top_k
  if e.dense_training:
    k = e.num_experts
  active = k * 6 * cfg.d_model * f
  if hardware and not e.dropless and not e.dense_training:
    tokens = seq_tokens * batch
    capacity = min(tokens, math.ceil(e.capacity_factor * tokens * k / e.num_experts))
    active = e.num_experts * capacity * 6 * cfg.d_model * f / tokens
  return active + router


def layer_flops(cfg: ModelConfig, seq_len: int, causal: bool = True, hardware: bool = False,
                batch: int = 1) -> list[LayerFlops]:
  """Forward FLOPs of every applied layer for one sequence, plus the LM head."""
  s = seq_len
  plan = make_plan(cfg)
  layers: list[LayerFlops] = []

  def mlp_for(block: int):
    if cfg.kind == "moe" and cfg.moe.is_moe_layer(block):
      return _moe_mlp(cfg, hardware, s, batch)
    return None

  from mor.layers import lora
  # per-recursion LoRA adapters ride on the shared unit's projections (counted as router-like
  # extras so the projection/MLP columns stay those of the base weights)
  adapters = lora.flops_per_token(cfg) if cfg.kind in ("recursive", "mor") else 0.0
  if cfg.kind != "mor":
    for j, b in enumerate(plan.applied):
      extra = s * adapters if b in plan.unit else 0.0
      layers.append(_layer(cfg, f"layer{j}", s, s, causal, mlp_flops_per_token=mlp_for(b),
                           router=extra))
  else:
    from mor.routers import capacities
    caps = capacities(cfg, s)
    r_cfg = cfg.router
    for b in plan.prefix:
      layers.append(_layer(cfg, f"prefix{b}", s, s, causal))
    if r_cfg.routing == "token_choice":   # on the prefix output (the embedding under cycle)
      tc_router = s * 2 * cfg.d_model * cfg.num_recursions
      layers[-1:] = ([_with_router(layers[-1], tc_router)] if layers else
                     [LayerFlops("router", s, 0.0, 0.0, 0.0, tc_router)])
    for r, k in enumerate(caps):
      for i, b in enumerate(plan.unit):
        share = r_cfg.kv == "share"
        keys = s if share and r > 0 else k
        router = 0.0
        if i == 0 and r_cfg.routing == "expert_choice":
          active_before = s if r == 0 else caps[r - 1]
          router = active_before * _ec_router_flops(cfg)
        layers.append(_layer(cfg, f"rec{r}.block{b}", k, keys, causal,
                             project_kv=not (share and r > 0), router=router + k * adapters))
    for b in plan.suffix:
      layers.append(_layer(cfg, f"suffix{b}", s, s, causal))
  layers.append(LayerFlops("lm_head", s, 0.0, 0.0, s * 2 * cfg.d_model * cfg.vocab_size))
  return layers


def routed_forward_flops_per_token(cfg: ModelConfig, seq_len: int,
                                   active_per_recursion: Sequence[float],
                                   causal: bool = True) -> float:
  """Forward FLOPs per token when recursion r ran on active_per_recursion[r] tokens per sequence.

  The realised-routing count: the prefix, suffix and LM head run on all S tokens;
  the shared unit runs once per recursion on that recursion's active tokens, for
  as many recursions as listed (fewer or more than N_r: test-time depth). Keys
  as in `layer_flops`: among the active tokens (recursive KV caching) or all S
  after the first recursion (KV sharing, which also skips later K/V projections).
  Routers (MoR) and LoRA adapters are counted as in `layer_flops`. With the
  static capacities of a MoR config it equals `forward_flops_per_token`.
  """
  from mor.layers import lora
  if cfg.kind not in ("recursive", "mor"):
    raise ValueError(f"routed FLOPs need a recursive or mor model, got kind={cfg.kind!r}")
  s, plan = seq_len, make_plan(cfg)
  mor = cfg.kind == "mor"
  share = mor and cfg.router.kv == "share"
  adapters = lora.flops_per_token(cfg)
  total = sum(_layer(cfg, "", s, s, causal).total for _ in (*plan.prefix, *plan.suffix))
  if mor and cfg.router.routing == "token_choice":
    total += s * 2 * cfg.d_model * cfg.num_recursions
  for r, k in enumerate(active_per_recursion):
    for i in range(len(plan.unit)):
      router = k * adapters
      if mor and i == 0 and cfg.router.routing == "expert_choice":
        router += (s if r == 0 else active_per_recursion[r - 1]) * _ec_router_flops(cfg)
      total += _layer(cfg, "", k, s if share and r > 0 else k, causal,
                      project_kv=not (share and r > 0), router=router).total
  return (total + s * 2 * cfg.d_model * cfg.vocab_size) / s


def _ec_router_flops(cfg: ModelConfig) -> float:
  d = cfg.d_model
  flops = 2 * d if cfg.router.head == "linear" else 2 * d * d + 2 * d
  if cfg.router.causal == "aux_router":
    flops += 2 * d * d + 2 * d
  return flops


def _with_router(layer: LayerFlops, router: float) -> LayerFlops:
  return LayerFlops(layer.name, layer.tokens, layer.proj, layer.attn, layer.mlp,
                    layer.router + router)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                            hardware: bool = False, batch: int = 1) -> float:
  return sum(l.total for l in layer_flops(cfg, seq_len, causal, hardware, batch)) / seq_len


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                          hardware: bool = False, batch: int = 1) -> float:
  """Forward + backward (2 x forward) model FLOPs per trained token."""
  return 3 * forward_flops_per_token(cfg, seq_len, causal, hardware, batch)


def train_flops_per_step(cfg: ModelConfig, seq_len: int, batch: int, causal: bool = True) -> float:
  return train_flops_per_token(cfg, seq_len, causal, batch=batch) * seq_len * batch


# FLOPs a budget counts per token, by convention (see the module docstring): a
# multiple of the causal forward count.
CONVENTION_FACTOR = {"paper": 1.0, "training": 3.0}


def budget_flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "paper") -> float:
  """Per-token FLOPs a FLOP budget counts: forward ("paper") or forward + backward ("training")."""
  if convention not in CONVENTION_FACTOR:
    raise ValueError(f"flop_convention={convention!r} is not allowed; choose one of "
                     f"{', '.join(CONVENTION_FACTOR)}")
  return CONVENTION_FACTOR[convention] * forward_flops_per_token(cfg, seq_len, causal=True)


def budget_flops_per_step(cfg: ModelConfig, seq_len: int, batch: int,
                          convention: str = "paper") -> float:
  return budget_flops_per_token(cfg, seq_len, convention) * seq_len * batch


def summary(cfg: ModelConfig, seq_len: int) -> dict:
  """A table-friendly breakdown: per-token forward/train FLOPs and per-layer totals."""
  layers = layer_flops(cfg, seq_len)
  return {
      "forward_per_token": sum(l.total for l in layers) / seq_len,
      "train_per_token": 3 * sum(l.total for l in layers) / seq_len,
      "layers": {l.name: l.total / seq_len for l in layers},
  }


def compiled_flops(fn, *args) -> float:
  """The compiler's FLOP count for jax.jit(fn)(*args) (XLA cost analysis)."""
  import jax
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])
