"""Depth routers of Mixture-of-Recursions (REFERENCE.md section 1) and their pure helpers.

Expert-choice: one `ExpertChoiceRouter` per recursion step scores the tokens
still active and keeps the top-k_r of them per sequence (hierarchical).
Token-choice: one `TokenChoiceRouter` on the prefix output gives every token a
depth in 1..N_r (top-1), balanced by an auxiliary loss or by a non-gradient
bias (`BalanceBias`, loss-free balancing).

Every per-step token count is a static Python int from `capacities`, so the
model's gathers and scatters have static shapes; the FLOP counter reads the
same function. Router logits, losses and statistics are float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mor.config import ModelConfig
from mor.layers import dense, param

HIST_BINS = 10


# ---------------------------------------------------------------------------
# Static capacities.
def ec_fractions(cfg: ModelConfig) -> list[float]:
  """Fraction of the sequence kept at each expert-choice step: (N_r - r + 1) / N_r by default."""
  n = cfg.num_recursions
  return list(cfg.router.capacities) or [(n - r) / n for r in range(n)]


def capacities(cfg: ModelConfig, seq_len: int) -> list[int]:
  """Static per-step slot counts k_r, r = 1..N_r, for a sequence of seq_len tokens.

  Expert-choice: k_r = max(1, floor(frac_r * S)) tokens kept at step r.
  Token-choice: slots for tokens of depth >= r,
  min(S, ceil(capacity_factor * S * (N_r - r + 1) / N_r)); overflow is dropped.
  """
  n, s, rc = cfg.num_recursions, seq_len, cfg.router
  if rc.routing == "token_choice":
    return [min(s, math.ceil(rc.capacity_factor * s * (n - r) / n - 1e-9)) for r in range(n)]
  if not rc.capacities:  # integer arithmetic: floor(2/3 * 3) must be 2, not 1
    return [max(1, (n - r) * s // n) for r in range(n)]
  return [max(1, math.floor(c * s + 1e-9)) for c in rc.capacities]


def data_depth(cfg: ModelConfig, difficulty_BxS: jax.Array) -> jax.Array:
  """Token-choice depths taken from a depth task's batch (router.depth_from), int32 in 1..N_r.

  difficulty: each token's own difficulty (the oracle); shifted_difficulty: the difficulty
  of the token half a sequence away (cyclically), so the depth histogram is the oracle's
  but carries nothing about the token (the oracle's control; difficulties are drawn per
  position independently).
  """
  d = jnp.asarray(difficulty_BxS, jnp.int32)
  if cfg.router.depth_from == "shifted_difficulty":
    d = jnp.roll(d, d.shape[1] // 2, axis=1)
  return jnp.clip(d, 1, cfg.num_recursions)


def warmup_capacities(cfg: ModelConfig, seq_len: int, step: jax.Array) -> jax.Array:
  """Expert-choice k_r in capacity warm-up (cosine decay from full); int32 [N_r]."""
  frac = jnp.asarray(ec_fractions(cfg), jnp.float32)
  ratio = jnp.minimum(1.0, step.astype(jnp.float32) / max(1, cfg.router.warmup_steps))
  decay = 0.5 * (1.0 + jnp.cos(jnp.pi * ratio))
  cap = frac + (1.0 - frac) * decay
  return jnp.clip(jnp.floor(cap * seq_len + 1e-4), 1, seq_len).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Pure selection helpers (static output shapes).
def expert_choice_select(logit_BxC: jax.Array, cand_valid_BxC: jax.Array, k: int,
                         k_eff: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
  """Top-k of the valid candidates per sequence, re-sorted into candidate order.

  Returns (j_BxK candidate slots, keep_BxK). All k slots are kept unless there are
  fewer valid candidates or a traced k_eff < k (capacity warm-up); unkept slots
  go last so that the kept ones stay in candidate (= original token) order.
  """
  c = logit_BxC.shape[1]
  _, j_BxK = jax.lax.top_k(jnp.where(cand_valid_BxC, logit_BxC, -jnp.inf), k)
  keep_BxK = jnp.take_along_axis(cand_valid_BxC, j_BxK, axis=1)
  if k_eff is not None:
    keep_BxK &= jnp.arange(k) < k_eff  # top_k ranks slots by score, so this keeps the best k_eff
  order_BxK = jnp.argsort(jnp.where(keep_BxK, j_BxK, j_BxK + c), axis=1)
  return (jnp.take_along_axis(j_BxK, order_BxK, axis=1),
          jnp.take_along_axis(keep_BxK, order_BxK, axis=1))


def token_choice_slots(eligible_BxS: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The first k eligible tokens of each sequence, in original order; the rest overflow.

  Returns (idx_BxK, valid_BxK); keeping the earliest tokens makes drops causal.
  """
  order_BxS = jnp.argsort(~eligible_BxS, axis=1, stable=True)
  idx_BxK = order_BxS[:, :k]
  return idx_BxK, jnp.take_along_axis(eligible_BxS, idx_BxK, axis=1)


# ---------------------------------------------------------------------------
# How a recursion's output enters the hidden state (cfg.router.combine).
def _update_weight(gate: jax.Array, rule: str) -> jax.Array:
  """The factor on the block update delta: g (residual) or 1 + g - stop_grad(g) (straight-through).

  Straight-through: the forward value is 1 (the full update, as a plain recursive
  model applies it), while d/dg is delta, as in the residual rule.
  """
  if rule == "straight_through":
    return 1.0 + gate - jax.lax.stop_gradient(gate)
  return gate


def combine_increment(h_BxKxD: jax.Array, unit_out_BxKxD: jax.Array, gate_BxK: jax.Array,
                      rule: str = "reference") -> jax.Array:
  """What expert-choice adds to a kept token's state H, given Unit(H) = H + delta.

  reference:        g * Unit(H)             -> (1 + g) H + g delta  (the reference code)
  residual:         g * delta               -> H + g delta
  straight_through: (1 + g - sg(g)) * delta -> H + delta forward; gradient to g is delta
  """
  g = gate_BxK[..., None].astype(unit_out_BxKxD.dtype)
  if rule == "reference":
    return g * unit_out_BxKxD
  if rule not in ("residual", "straight_through"):
    raise ValueError(f"model.router.combine={rule!r}; choose reference, residual or "
                     "straight_through")
  return _update_weight(g, rule) * (unit_out_BxKxD - h_BxKxD)


def tc_output(h1_BxSxD: jax.Array, state_BxSxD: jax.Array, gate_BxS: jax.Array,
              rule: str = "reference") -> jax.Array:
  """Token-choice output from H1 (prefix output) and S (state after the token's recursions).

  With delta = S - H1 (everything the recursions added), the same three rules:
  reference H1 + g S (the reference code), residual H1 + g delta, straight-through
  S forward with gradient delta to g. A token of depth 0 would keep H1 under all three.
  """
  g = gate_BxS[..., None].astype(h1_BxSxD.dtype)
  if rule == "reference":
    return h1_BxSxD + g * state_BxSxD
  return h1_BxSxD + combine_increment(h1_BxSxD, state_BxSxD, gate_BxS, rule)


# ---------------------------------------------------------------------------
# Losses and statistics.
def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bce_with_logits(logit: jax.Array, target: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logit) against a 0/1 target."""
  return jnp.maximum(logit, 0) - logit * target + jnp.log1p(jnp.exp(-jnp.abs(logit)))


def binary_entropy(logit: jax.Array) -> jax.Array:
  p = jax.nn.sigmoid(logit)
  return bce_with_logits(logit, p)


def histogram_counts(score: jax.Array, mask: jax.Array, bins: int = HIST_BINS) -> jax.Array:
  """Counts of masked scores in `bins` equal bins over [0, 1]; float32 [bins]."""
  b = jnp.clip(jnp.floor(score * bins).astype(jnp.int32), 0, bins - 1)
  onehot = jax.nn.one_hot(b, bins, dtype=jnp.float32) * mask.astype(jnp.float32)[..., None]
  return onehot.reshape(-1, bins).sum(axis=0)


def maxvio(load_N: jax.Array) -> jax.Array:
  """Load imbalance max_i |load_i - mean| / mean."""
  mean = jnp.mean(load_N)
  return jnp.max(jnp.abs(load_N - mean)) / jnp.maximum(mean, 1e-9)


def loss_free_update(bias_N: jax.Array, load_N: jax.Array, rate: float) -> jax.Array:
  """Loss-free balancing: b_i += u * sign(mean_load - load_i)."""
  return bias_N + rate * jnp.sign(jnp.mean(load_N) - load_N)


# ---------------------------------------------------------------------------
# Modules.
class RouterHead(nnx.Module):
  """Linear d -> out without bias (init N(0, 0.02)), or a GELU MLP d -> d -> out."""

  def __init__(self, d_model: int, out: int, kind: str, std: float, rngs: nnx.Rngs):
    self.kind = kind
    if kind == "mlp":
      self.w_in = param(rngs, (d_model, d_model), ("embed", "mlp"), std)
      self.w_out = param(rngs, (d_model, out), ("mlp", None), std)
    else:
      self.w_out = param(rngs, (d_model, out), ("embed", None), std)

  def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
    x = x_BxSxD.astype(jnp.float32)  # router decisions in f32, as MoE routers do
    if self.kind == "mlp":
      x = jax.nn.gelu(dense(x, self.w_in[...], jnp.float32))
    return dense(x, self.w_out[...], jnp.float32)


class ExpertChoiceRouter(nnx.Module):
  """Scalar router of one recursion step; gate g = alpha * sigmoid(logit / T) (or tanh)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    rc = cfg.router
    self.head = RouterHead(cfg.d_model, 1, rc.head, cfg.init_std, rngs)
    # The auxiliary router only predicts "selected" for causal inference; it never gates.
    self.aux_head = (RouterHead(cfg.d_model, 1, "mlp", cfg.init_std, rngs)
                     if rc.causal == "aux_router" else None)
    self.alpha, self.temperature, self.gate_fn = rc.alpha, rc.temperature, rc.gate

  def logit(self, x_BxKxD: jax.Array) -> jax.Array:
    return self.head(x_BxKxD)[..., 0] / self.temperature

  def decision_logit(self, x_BxKxD: jax.Array, logit_BxK: jax.Array) -> jax.Array:
    """The logit whose sigmoid is the causal 'go deeper' score (router or auxiliary router)."""
    if self.aux_head is None:
      return logit_BxK
    return self.aux_head(jax.lax.stop_gradient(x_BxKxD))[..., 0]

  def gate(self, logit_BxK: jax.Array) -> jax.Array:
    f = jnp.tanh if self.gate_fn == "tanh" else jax.nn.sigmoid
    return self.alpha * f(logit_BxK)


class BalanceBias(nnx.Variable):
  """Non-gradient per-depth bias of loss-free balancing; changed only by `post_update`."""


class TokenChoice(NamedTuple):
  depth_BxS: jax.Array      # int32 assigned depth in 1..N_r
  gate_BxS: jax.Array       # float32 alpha * score of the assigned depth
  scores_BxSxN: jax.Array   # float32 softmax (or sigmoid) scores, without the bias
  logits_BxSxN: jax.Array


class TokenChoiceRouter(nnx.Module):
  """Linear d -> N_r on the prefix output; top-1 over softmax (or sigmoid) scores."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    rc = cfg.router
    self.n = cfg.num_recursions
    self.head = RouterHead(cfg.d_model, self.n, rc.head, cfg.init_std, rngs)
    self.bias = BalanceBias(jnp.zeros((self.n,), jnp.float32), axes=(None,))
    self.rc = rc

  def __call__(self, h_BxSxD: jax.Array) -> TokenChoice:
    logits = self.head(h_BxSxD) / self.rc.temperature
    scores = jax.nn.softmax(logits, -1) if self.rc.gate == "softmax" else jax.nn.sigmoid(logits)
    select = scores
    if self.rc.balance == "loss_free":  # the bias steers selection only, never the gate
      select = scores + jax.lax.stop_gradient(self.bias[...])
    choice = jnp.argmax(select, axis=-1)
    gate = self.rc.alpha * jnp.take_along_axis(scores, choice[..., None], -1)[..., 0]
    return TokenChoice((choice + 1).astype(jnp.int32), gate, scores, logits)

  def losses(self, tc: TokenChoice) -> dict:
    """Balancing loss coef * sum_i P_i f_i (f_i = N_r * fraction assigned) and z-loss."""
    out = {}
    if self.rc.balance == "loss" and self.rc.balance_coef > 0:
      p_N = jnp.mean(tc.scores_BxSxN, axis=(0, 1))
      f_N = self.n * assigned_fractions(tc.depth_BxS, self.n)
      out["balance"] = self.rc.balance_coef * jnp.sum(p_N * f_N)
    if self.rc.z_loss_coef > 0:
      lse = jax.nn.logsumexp(tc.logits_BxSxN, axis=-1)
      out["router_z"] = self.rc.z_loss_coef * jnp.mean(lse ** 2)
    return out

  def post_update(self, assigned_N: jax.Array) -> None:
    if self.rc.balance == "loss_free":
      self.bias[...] = loss_free_update(self.bias[...], assigned_N, self.rc.bias_update_rate)


def assigned_fractions(depth_BxS: jax.Array, n: int) -> jax.Array:
  """Fraction of tokens assigned to each depth 1..n; float32 [n]."""
  return jnp.mean(jax.nn.one_hot(depth_BxS - 1, n, dtype=jnp.float32), axis=(0, 1))
