"""Mixture-of-Experts MLP: routers, capacity dispatch, dropless grouped matmul, DS-MoE.

Every token gets A "assignments" (expert id, combine weight, valid flag):
A = k for top-k routers, A = E for DS-MoE threshold inference (a token keeps a
variable number of experts). Three execution paths consume them:
- capacity: each expert holds C = min(N, ceil(cf * k * N / E)) slots; slots are
  filled choice-major then in token order (every token's first choice before
  any second choice, as GShard); an assignment that finds its expert full is
  dropped, i.e. contributes 0, so the token passes through the residual.
- dropless: assignments sorted by expert, `jax.lax.ragged_dot` grouped matmul,
  unsorted. On GPU/TPU this is a grouped GEMM; on CPU XLA lowers it to a masked
  dense dot over all E groups (E times the FLOPs), so prefer capacity on CPU.
- dense (DS-MoE training): every expert on every token, weighted by its gate.

The router runs in float32. Aux losses use the `{"losses", "stats"}` format of
mor.models.transformer; losses are already multiplied by their coefficients.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mor.config import ModelConfig, MoEConfig
from mor.layers.basic import param


def active_experts(m: MoEConfig) -> int:
  """Experts applied per token by the sparse router (Switch is top-1)."""
  return 1 if m.router == "switch" else m.top_k


def expert_capacity(num_tokens: int, cf: float, k: int, num_experts: int) -> int:
  """Slots per expert: cf * k * tokens / E, rounded up, never more than the tokens."""
  return max(1, min(num_tokens, math.ceil(cf * k * num_tokens / num_experts)))


# ---------------------------------------------------------------------------
# Loss and statistic helpers (pure, tested against hand-computed values).

def cv_squared(x_E: jax.Array) -> jax.Array:
  """Squared coefficient of variation, population variance (as tensor2tensor)."""
  x_E = x_E.astype(jnp.float32)
  return jnp.var(x_E) / (jnp.mean(x_E) ** 2 + 1e-10)


def entropy(p_NxE: jax.Array) -> jax.Array:
  return -jnp.sum(p_NxE * jnp.log(jnp.maximum(p_NxE, 1e-20)), axis=-1)


def z_loss(logits_NxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (unweighted)."""
  return jnp.mean(jax.nn.logsumexp(logits_NxE, axis=-1) ** 2)


def balance_loss(probs_NxE: jax.Array, expert_NxA: jax.Array, valid_NxA: jax.Array) -> jax.Array:
  """Switch/GShard balance E * sum_i f_i P_i (unweighted), minimum 1 at uniform routing.

  f_i is the fraction of the N*A assignments that chose expert i, so sum f = 1.
  Counting f over the k choices per token *without* dividing by k gives
  sum f = k and a minimum of k: the normalisation trap (REFERENCE.md section 2).
  """
  e = probs_NxE.shape[-1]
  onehot_NxAxE = jax.nn.one_hot(expert_NxA, e) * valid_NxA[..., None]
  f_E = onehot_NxAxE.sum((0, 1)) / jnp.maximum(valid_NxA.sum(), 1)
  p_E = probs_NxE.mean(0)
  return e * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def mi_loss(probs_NxE: jax.Array) -> jax.Array:
  """DS-MoE mutual-information loss -H(mean_x p(e|x)) + mean_x H(p(e|x)) (unweighted)."""
  return -entropy(probs_NxE.mean(0)) + entropy(probs_NxE).mean()


def noisy_load(clean_NxE: jax.Array, noisy_NxE: jax.Array, std_NxE: jax.Array,
               k: int) -> jax.Array:
  """Shazeer's smooth load estimate P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i).

  kth_excluding(H, k, i) is the k-th largest of H without H_i: the (k+1)-th
  largest of H when i is in the top k, else the k-th largest.
  """
  e = noisy_NxE.shape[-1]
  top_NxK1 = jax.lax.top_k(noisy_NxE, min(k + 1, e))[0]
  thr_out = top_NxK1[:, k - 1:k]
  thr_in = top_NxK1[:, k:k + 1] if k < e else jnp.full_like(thr_out, -jnp.inf)
  is_in = noisy_NxE > thr_in
  z_in = (clean_NxE - thr_in) / std_NxE
  z_out = (clean_NxE - thr_out) / std_NxE
  return jnp.where(is_in, jax.scipy.stats.norm.cdf(z_in), jax.scipy.stats.norm.cdf(z_out))


def top_k_gates(scores_NxE: jax.Array, k: int):
  """Keeps the top k scores and softmaxes over them (= softmax, top-k, renormalise)."""
  val_NxK, idx_NxK = jax.lax.top_k(scores_NxE, k)
  return idx_NxK.astype(jnp.int32), jax.nn.softmax(val_NxK, axis=-1)


# ---------------------------------------------------------------------------

class Routing(NamedTuple):
  expert_NxA: jax.Array   # int32 expert of each assignment
  gate_NxA: jax.Array     # float32 combine weight
  valid_NxA: jax.Array    # bool; False for assignments a threshold router did not keep
  probs_NxE: jax.Array    # float32 router distribution softmax(clean logits)
  losses: dict            # weighted aux losses
  z: jax.Array            # unweighted z-loss, for statistics


class Router(nnx.Module):
  """Token-choice router in float32: noisy_topk, switch, top2, or DS-MoE softmax."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    m = cfg.moe
    self.moe = m
    self.k = active_experts(m)
    self.noisy = m.router == "noisy_topk" and not m.dense_training
    init = "zeros" if self.noisy else "normal"
    self.w = param(rngs, (cfg.d_model, m.num_experts), ("embed", "router"),
                   cfg.init_std, init)
    if self.noisy:
      self.w_noise = param(rngs, (cfg.d_model, m.num_experts), ("embed", "router"),
                           init="zeros")
      # Own stream so the noise does not depend on which other modules draw keys.
      self.rngs = nnx.Rngs(noise=rngs.noise() if "noise" in rngs else rngs.params())

  def __call__(self, x_NxD: jax.Array, train: bool, rng: jax.Array | None = None) -> Routing:
    m = self.moe
    x32 = x_NxD.astype(jnp.float32)
    clean_NxE = x32 @ self.w[...]
    probs_NxE = jax.nn.softmax(clean_NxE, axis=-1)
    z = z_loss(clean_NxE)
    losses = {"moe_z": m.z_loss_coef * z} if m.z_loss_coef else {}
    n, e = probs_NxE.shape
    if m.dense_training:
      if train:  # every expert, weighted by its full softmax gate
        expert, gate, valid = _all_experts(probs_NxE, jnp.ones((n, e), bool))
      else:
        expert, gate, valid = ds_sparse(probs_NxE, m)
      if m.mi_loss_coef:
        losses["moe_mi"] = m.mi_loss_coef * mi_loss(probs_NxE)
      return Routing(expert, gate, valid, probs_NxE, losses, z)
    if self.noisy:
      if train:
        std_NxE = jax.nn.softplus(x32 @ self.w_noise[...])
        rng = self.rngs.noise() if rng is None else rng
        h_NxE = clean_NxE + jax.random.normal(rng, clean_NxE.shape) * std_NxE
      else:
        h_NxE = clean_NxE
      expert, gate = top_k_gates(h_NxE, self.k)
      gates_NxE = jnp.zeros_like(h_NxE).at[jnp.arange(n)[:, None], expert].set(gate)
      losses["moe_importance"] = m.importance_coef * cv_squared(gates_NxE.sum(0))
      if train:
        load_E = noisy_load(clean_NxE, h_NxE, std_NxE, self.k).sum(0)
        losses["moe_load"] = m.load_coef * cv_squared(load_E)
      return Routing(expert, gate, jnp.ones(expert.shape, bool), probs_NxE, losses, z)
    if m.router == "switch":  # y = p_i E_i(x): the gate is the unrenormalised probability
      gate, expert = jax.lax.top_k(probs_NxE, 1)
      expert = expert.astype(jnp.int32)
    else:  # top2 (GShard / Mixtral): softmax over the kept logits
      expert, gate = top_k_gates(clean_NxE, self.k)
    valid = jnp.ones(expert.shape, bool)
    losses["moe_balance"] = m.balance_coef * balance_loss(probs_NxE, expert, valid)
    return Routing(expert, gate, valid, probs_NxE, losses, z)


def _all_experts(probs_NxE, keep_NxE):
  n, e = probs_NxE.shape
  return jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (n, e)), probs_NxE, keep_NxE


def ds_sparse(probs_NxE: jax.Array, m: MoEConfig):
  """DS-MoE sparse inference: fixed top-K, or every expert with E * p_i >= epsilon.

  Gates keep their dense-training values (not renormalised), so keeping every
  expert reproduces dense inference exactly.
  """
  if m.ds_top_k:
    gate, expert = jax.lax.top_k(probs_NxE, m.ds_top_k)
    return expert.astype(jnp.int32), gate, jnp.ones(expert.shape, bool)
  return _all_experts(probs_NxE, probs_NxE.shape[-1] * probs_NxE >= m.ds_threshold)


# ---------------------------------------------------------------------------
# Execution paths. ffn_weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD).

def swiglu(x_NxD, w_gate_DxF, w_up_DxF, w_down_FxD):
  """One expert; the slow, obvious twin of the batched paths below."""
  dt = x_NxD.dtype
  h = jax.nn.silu(x_NxD @ w_gate_DxF.astype(dt)) * (x_NxD @ w_up_DxF.astype(dt))
  return h @ w_down_FxD.astype(dt)


def _flat(r: Routing):
  """Assignments flattened choice-major: index m = a * N + n."""
  t = lambda v: v.T.reshape(-1)
  n, a = r.expert_NxA.shape
  token_M = jnp.tile(jnp.arange(n, dtype=jnp.int32), a)
  return t(r.expert_NxA), t(r.gate_NxA), t(r.valid_NxA), token_M


def _combine(out_MxD, gate_M, n: int, dtype):
  y_M = out_MxD.astype(jnp.float32) * gate_M[:, None]
  return y_M.reshape(-1, n, y_M.shape[-1]).sum(0).astype(dtype)


def capacity_apply(x_NxD, r: Routing, weights, capacity: int):
  """Gathers tokens into [E, C, D] slot buffers, runs the experts batched, combines.

  Returns (y_NxD, kept_M) with kept_M the flat (choice-major) kept assignments.
  """
  w_gate, w_up, w_down = weights
  e, d = w_gate.shape[0], x_NxD.shape[-1]
  n = x_NxD.shape[0]
  expert_M, gate_M, valid_M, token_M = _flat(r)
  onehot_MxE = (expert_M[:, None] == jnp.arange(e)) & valid_M[:, None]
  pos_M = jnp.take_along_axis(jnp.cumsum(onehot_MxE, 0, dtype=jnp.int32), expert_M[:, None],
                              1)[:, 0] - 1
  kept_M = valid_M & (pos_M < capacity)
  slot_M = jnp.where(kept_M, expert_M * capacity + pos_M, e * capacity)
  # Slot -> token; empty slots read row N, a zero row.
  token_S = jnp.full((e * capacity,), n, jnp.int32).at[slot_M].set(token_M, mode="drop")
  x_pad = jnp.concatenate([x_NxD, jnp.zeros((1, d), x_NxD.dtype)])
  x_ExCxD = x_pad[token_S].reshape(e, capacity, d)
  dt = x_NxD.dtype
  h_ExCxF = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate.astype(dt)))
             * jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up.astype(dt)))
  out_ExCxD = jnp.einsum("ecf,efd->ecd", h_ExCxF, w_down.astype(dt))
  out_pad = jnp.concatenate([out_ExCxD.reshape(e * capacity, d), jnp.zeros((1, d), dt)])
  return _combine(out_pad[slot_M], gate_M * kept_M, n, dt), kept_M


def dropless_apply(x_NxD, r: Routing, weights):
  """Sorts assignments by expert, grouped matmul with ragged_dot, unsorts; drops nothing."""
  w_gate, w_up, w_down = weights
  e, n = w_gate.shape[0], x_NxD.shape[0]
  expert_M, gate_M, valid_M, token_M = _flat(r)
  key_M = jnp.where(valid_M, expert_M, e)  # invalid rows sort last, outside every group
  order_M = jnp.argsort(key_M, stable=True)
  sizes_E = jnp.sum(key_M[:, None] == jnp.arange(e), 0, dtype=jnp.int32)
  dt = x_NxD.dtype
  xs_MxD = x_NxD[token_M[order_M]]
  h_MxF = (jax.nn.silu(jax.lax.ragged_dot(xs_MxD, w_gate.astype(dt), sizes_E))
           * jax.lax.ragged_dot(xs_MxD, w_up.astype(dt), sizes_E))
  out_sorted = jax.lax.ragged_dot(h_MxF, w_down.astype(dt), sizes_E)
  inv_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0]))
  return _combine(out_sorted[inv_M], gate_M * valid_M, n, dt)


def dense_apply(x_NxD, probs_NxE, weights):
  """DS-MoE dense training: sum_e p_e(x) E_e(x) over all experts."""
  w_gate, w_up, w_down = weights
  dt = x_NxD.dtype
  h_ExNxF = (jax.nn.silu(jnp.einsum("nd,edf->enf", x_NxD, w_gate.astype(dt)))
             * jnp.einsum("nd,edf->enf", x_NxD, w_up.astype(dt)))
  out_ExNxD = jnp.einsum("enf,efd->end", h_ExNxF, w_down.astype(dt))
  y = jnp.einsum("end,ne->nd", out_ExNxD.astype(jnp.float32), probs_NxE)
  return y.astype(dt)


def routing_stats(r: Routing, kept_M: jax.Array | None = None) -> dict:
  """Per-expert token counts (before drops), load CV^2, max/mean load, drops, entropy, z."""
  n, e = r.probs_NxE.shape
  counts_E = jnp.sum(jax.nn.one_hot(r.expert_NxA, e) * r.valid_NxA[..., None], (0, 1))
  num_valid = r.valid_NxA.sum()
  dropped = 0.0 if kept_M is None else (num_valid - kept_M.sum()) / jnp.maximum(num_valid, 1)
  return {"moe/tokens_per_expert": counts_E,
          "moe/load_cv2": cv_squared(counts_E),
          "moe/max_over_mean_load": counts_E.max() / jnp.maximum(counts_E.mean(), 1e-9),
          "moe/dropped_frac": jnp.asarray(dropped, jnp.float32),
          "moe/router_entropy": entropy(r.probs_NxE).mean(),
          "moe/z_loss": r.z,
          "moe/experts_per_token": num_valid / n}


class MoEMLP(nnx.Module):
  """E SwiGLU experts with stacked weights and a token-choice router.

  Train/eval (noise, capacity factor, DS-MoE dense vs sparse) follows the
  `deterministic` attribute, which `nnx.Module.eval()` / `.train()` set, unless
  `train` is passed. The attribute is static: after nnx.split it lives in the
  graphdef, so an eval step needs a graphdef split from a model in eval mode.
  Logical axes: experts ("expert", "embed", "mlp") / ("expert", "mlp", "embed"),
  router ("embed", "router").
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    m = cfg.moe
    e, d, f = m.num_experts, cfg.d_model, m.expert_ffn_dim or cfg.ffn_dim
    self.moe = m
    self.router = Router(cfg, rngs)
    self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)
    self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)
    self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), cfg.init_std)
    self.deterministic = False

  @property
  def weights(self):
    return self.w_gate[...], self.w_up[...], self.w_down[...]

  def __call__(self, x_BxSxD: jax.Array, *, train: bool | None = None,
               rng: jax.Array | None = None):
    """Returns (y_BxSxD, aux); dropped assignments contribute 0 (residual pass-through)."""
    m = self.moe
    train = not self.deterministic if train is None else train
    x_NxD = x_BxSxD.reshape(-1, x_BxSxD.shape[-1])
    r = self.router(x_NxD, train, rng)
    kept = None
    if m.dense_training and train:
      y = dense_apply(x_NxD, r.probs_NxE, self.weights)
      # Statistics describe the experts sparse inference would use.
      expert, _, valid = ds_sparse(r.probs_NxE, m)
      stats = routing_stats(r._replace(expert_NxA=expert, valid_NxA=valid))
      return y.reshape(x_BxSxD.shape), {"losses": r.losses, "stats": stats}
    if m.dropless or m.dense_training:  # DS-MoE inference keeps a variable number: dropless
      y = dropless_apply(x_NxD, r, self.weights)
    else:
      cf = m.capacity_factor if train else m.eval_capacity_factor
      cap = expert_capacity(x_NxD.shape[0], cf, self.router.k, m.num_experts)
      y, kept = capacity_apply(x_NxD, r, self.weights, cap)
    return y.reshape(x_BxSxD.shape), {"losses": r.losses, "stats": routing_stats(r, kept)}
