"""Router losses and gates by value, on the path training runs, against numpy by hand.

Each model is called as `train` calls it (`model(tokens, step=, routing="topk",
head=False)`) and its aux["losses"] and output are compared with a numpy
computation from the parameters. Attention is switched off (w_o = 0, so every
block is x + SwiGLU(RMSNorm(x)), a per-token function) so the hand computation
stays short while routing, gates, capacities and losses run exactly as in
training; the gates enter the output, so a gate scaled or renormalised wrongly
moves the hidden states. MoE models have one MoE layer and a capacity factor
that drops nothing; MoR models are 1 + 1 x 3 + 1 layers.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor.config import ModelConfig, MoEConfig, RouterConfig
from mor.models import build_model

B, S, D, V = 2, 16, 32, 64
RTOL, ATOL = 1e-5, 1e-6


# --- numpy pieces -------------------------------------------------------------------
def rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def lse(z):
  m = z.max(-1, keepdims=True)
  return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def bce(logit, target):
  return -(target * np.log(sigmoid(logit)) + (1 - target) * np.log(sigmoid(-logit)))


def swiglu(x, wg, wu, wd):
  g = x @ wg
  return (g * sigmoid(g) * (x @ wu)) @ wd


def gelu_tanh(x):   # jax.nn.gelu's default (approximate) form
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def cv2(v):
  return v.var() / v.mean() ** 2


def f64(p):
  return np.asarray(p[...], np.float64)


def block_np(blk, x, eps):
  """A block with w_o = 0: attention adds exactly 0, so x + SwiGLU(RMSNorm(x))."""
  m = blk.mlp
  return x + swiglu(rms(x, f64(blk.mlp_norm.scale), eps), f64(m.w_gate), f64(m.w_up),
                    f64(m.w_down))


def _no_attention(model):
  for blk in model.blocks:
    blk.attn.wo[...] = jnp.zeros_like(blk.attn.wo[...])


@functools.partial(nnx.jit, static_argnames="routing")
def train_call(model, tokens_BxS, routing="topk"):
  """The model as train._forward calls it: (final-normed hidden states, aux)."""
  h, _, aux = model(tokens_BxS, step=jnp.int32(0), routing=routing, head=False)
  return h, aux


def _tokens(seed=3):
  return jax.random.randint(jax.random.key(seed), (B, S), 0, V)


def _close(got, want, what):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL,
                             err_msg=what)


# --- MoE ----------------------------------------------------------------------------
def moe_model(**moe_kw):
  """One MoE layer (E = 4), N(0, 1/d) weights, a capacity that drops nothing, no attention."""
  cfg = ModelConfig(kind="moe", vocab_size=V, num_layers=1, d_model=D, num_heads=2,
                    num_kv_heads=1, ffn_dim=48, max_seq_len=S, tie_embeddings=False,
                    init_std=D ** -0.5,
                    moe=MoEConfig(**{"num_experts": 4, "capacity_factor": 4.0, **moe_kw}))
  m = build_model(cfg, 0)
  _no_attention(m)
  r = m.blocks[0].mlp.router
  rng = np.random.default_rng(5)
  r.w[...] = jnp.asarray(rng.normal(0, D ** -0.5 * 1.5, r.w.shape), jnp.float32)
  if hasattr(r, "w_noise"):   # both start at zero: give the noise a token-dependent scale
    r.w_noise[...] = jnp.asarray(rng.normal(0, 0.1, r.w_noise.shape), jnp.float32)
  return m


def moe_reference(m, tokens, noise_NxE=None):
  """(final-normed output [B, S, D], {loss name: value}) of the one-layer MoE model by hand."""
  cfg, mc = m.cfg, m.cfg.moe
  blk, e = m.blocks[0], mc.num_experts
  x = f64(m.embed.table)[np.asarray(tokens)].reshape(-1, D)
  h = rms(x, f64(blk.mlp_norm.scale), cfg.norm_eps)
  w = f64(blk.mlp.router.w)
  clean = h @ w
  p = softmax(clean)
  n = h.shape[0]
  experts = [swiglu(h, *(f64(wt)[i] for wt in (blk.mlp.w_gate, blk.mlp.w_up, blk.mlp.w_down)))
             for i in range(e)]
  gates = np.zeros((n, e))   # combine weight of each (token, expert)
  losses = {}
  if mc.dense_training:
    gates = p
    ent = lambda q: -np.sum(q * np.log(q), -1)
    losses["moe_mi"] = mc.mi_loss_coef * (-ent(p.mean(0)) + ent(p).mean())
  elif mc.router == "noisy_topk":
    std = np.log1p(np.exp(h @ f64(blk.mlp.router.w_noise)))
    hn = clean + noise_NxE * std
    load = np.zeros(e)
    for t in range(n):
      top = np.argsort(-hn[t])[:mc.top_k]
      gates[t, top] = softmax(hn[t, top])
      for i in range(e):   # P(x, i) = Phi((clean_i - kth largest of H without i) / std_i)
        kth = np.sort(np.delete(hn[t], i))[::-1][mc.top_k - 1]
        load[i] += 0.5 * (1 + math.erf((clean[t, i] - kth) / std[t, i] / math.sqrt(2)))
    losses["moe_importance"] = mc.importance_coef * cv2(gates.sum(0))
    losses["moe_load"] = mc.load_coef * cv2(load)
  else:
    k = 1 if mc.router == "switch" else mc.top_k
    f = np.zeros(e)
    for t in range(n):
      if mc.router == "switch":   # y = p_i E_i(x): the unrenormalised probability
        i = int(np.argmax(p[t]))
        gates[t, i] = p[t, i]
        f[i] += 1
      else:                       # softmax over the kept logits
        top = np.argsort(-clean[t])[:k]
        gates[t, top] = softmax(clean[t, top])
        f[top] += 1
    f /= n * k                    # fraction of the N k assignments: sum f = 1
    losses["moe_balance"] = mc.balance_coef * e * np.sum(f * p.mean(0))
  if mc.z_loss_coef:
    losses["moe_z"] = mc.z_loss_coef * np.mean(lse(clean) ** 2)
  y = sum(gates[:, i:i + 1] * experts[i] for i in range(e))
  out = rms(x + y, f64(m.final_norm.scale), cfg.norm_eps)
  return out.reshape(B, S, D), losses


@pytest.mark.parametrize("kw", [
    dict(router="switch", balance_coef=0.5, z_loss_coef=0.1),
    dict(router="top2", top_k=2, balance_coef=0.5, z_loss_coef=0.1),
    dict(router="noisy_topk", top_k=2, importance_coef=0.5, load_coef=0.5, z_loss_coef=0.0),
    dict(router="top2", dense_training=True, mi_loss_coef=0.5, z_loss_coef=0.1),
], ids=["switch", "top2", "noisy_topk", "ds_moe"])
def test_moe_router_losses_and_gates_on_the_training_path(kw):
  m = moe_model(**kw)
  noise = None
  if kw["router"] == "noisy_topk":   # the key the router's noise stream hands out next
    key = nnx.clone(m.blocks[0].mlp.router.rngs).noise()
    noise = np.asarray(jax.random.normal(key, (B * S, 4)), np.float64)
  tokens = _tokens()
  h, aux = train_call(m, tokens)
  want_h, want = moe_reference(m, tokens, noise)
  got = {k.split("/", 1)[1]: v for k, v in aux["losses"].items()}
  assert set(got) == set(want), (sorted(got), sorted(want))
  for name, v in want.items():
    assert abs(v) > 1e-3, f"{name} = {v}: too small to tell a broken normalisation"
    _close(got[name], v, name)
  _close(h, want_h, "output (gates)")
  assert float(aux["stats"]["layer0/moe/dropped_frac"]) == 0


# --- MoR ----------------------------------------------------------------------------
def mor_model(**router):
  """1 + 1 x 3 + 1 layers, middle-cycle, no attention; router logits O(1)."""
  cfg = ModelConfig(kind="mor", vocab_size=V, num_layers=5, d_model=D, num_heads=2,
                    num_kv_heads=1, ffn_dim=48, max_seq_len=S, num_recursions=3,
                    sharing="middle_cycle", tie_embeddings=False, init_std=D ** -0.5,
                    router=RouterConfig(**router))
  m = build_model(cfg, 0)
  _no_attention(m)
  return m


def head_np(head, h):
  """RouterHead by hand: linear, or GELU MLP."""
  if head.kind == "mlp":
    return gelu_tanh(h @ f64(head.w_in)) @ f64(head.w_out)
  return h @ f64(head.w_out)


def mor_reference(m, tokens):
  """(final-normed output, {loss name: value}, depth [B, S]) of the MoR model by hand."""
  cfg, rc, n = m.cfg, m.cfg.router, m.cfg.num_recursions
  eps = cfg.norm_eps
  (pre,), (unit,), (suf,) = m.plan.prefix, m.plan.unit, m.plan.suffix
  x = block_np(m.blocks[pre], f64(m.embed.table)[np.asarray(tokens)], eps)
  losses = {}
  depth = np.zeros((B, S), int)
  if m.expert_choice:
    bce_sum, z_sum = 0.0, 0.0
    cands = [np.arange(S)] * B   # hierarchical: step r scores step r-1's kept tokens
    for r in range(n):
      k = max(1, (n - r) * S // n)
      bce_r, z_r = [], []
      for b in range(B):
        cand = cands[b]
        h = x[b, cand]
        logit = head_np(m.routers[r].head, h)[:, 0] / rc.temperature
        decide = logit if m.routers[r].aux_head is None else head_np(m.routers[r].aux_head, h)[:, 0]
        keep = np.sort(np.argsort(-logit, kind="stable")[:k])
        target = np.zeros(len(cand))
        target[keep] = 1
        bce_r.append(bce(decide, target))
        z_r.append(logit ** 2)
        g = rc.alpha * sigmoid(logit[keep])
        sel = cand[keep]
        x[b, sel] += g[:, None] * block_np(m.blocks[unit], x[b, sel], eps)
        depth[b, sel] += 1
        cands[b] = sel
      bce_sum += np.mean(np.concatenate(bce_r))   # mean over every candidate of the step
      z_sum += np.mean(np.concatenate(z_r))
    losses["router_bce"] = rc.aux_loss_coef * bce_sum
    if rc.z_loss_coef:
      losses["router_z"] = rc.z_loss_coef * z_sum
  else:
    h1 = x
    z = head_np(m.router.head, h1) / rc.temperature
    p = softmax(z)
    assigned = p.argmax(-1) + 1
    gate = rc.alpha * p.max(-1)
    state, processed = h1.copy(), np.ones((B, S), bool)
    for r in range(n):
      k = min(S, math.ceil(rc.capacity_factor * S * (n - r) / n - 1e-9))
      for b in range(B):   # the first k eligible tokens get a slot; the rest stop (dropped)
        elig = np.flatnonzero(processed[b] & (assigned[b] > r))
        processed[b] = False
        processed[b, elig[:k]] = True
        state[b, elig[:k]] = block_np(m.blocks[unit], state[b, elig[:k]], eps)
      depth += processed
    x = h1 + gate[..., None] * state
    f = n * np.array([np.mean(assigned == i + 1) for i in range(n)])
    losses["balance"] = rc.balance_coef * np.sum(p.mean((0, 1)) * f)
    if rc.z_loss_coef:
      losses["router_z"] = rc.z_loss_coef * np.mean(lse(z) ** 2)
  x = block_np(m.blocks[suf], x, eps)
  return rms(x, f64(m.final_norm.scale), eps), losses, depth


@pytest.mark.parametrize("router", [
    dict(routing="expert_choice", aux_loss_coef=0.1, z_loss_coef=0.1),
    dict(routing="expert_choice", causal="aux_router", aux_loss_coef=0.1),
    dict(routing="token_choice", gate="softmax", alpha=1.0, balance_coef=0.5, z_loss_coef=0.1),
], ids=["ec", "ec_aux_router", "tc"])
def test_mor_router_losses_and_gates_on_the_training_path(router):
  m = mor_model(**router)
  tokens = _tokens()
  h, aux = train_call(m, tokens)
  want_h, want, depth = mor_reference(m, tokens)
  assert len(np.unique(depth)) >= 3, np.unique(depth)   # mixed depths: routing matters
  assert set(aux["losses"]) == set(want), (sorted(aux["losses"]), sorted(want))
  for name, v in want.items():
    assert abs(v) > 1e-3, f"{name} = {v}: too small to tell a broken normalisation"
    _close(aux["losses"][name], v, name)
  _close(h, want_h, "output (gates)")
  _close(aux["stats"]["tokens_per_depth"], [np.mean(depth >= r) for r in (1, 2, 3)],
         "tokens per depth")
