"""Per-recursion LoRA in MoR: recursion r applies adapter r, checked at the logits.

The reference is written from the model's parameters without its routing or
adapter-mapping code: it merges W + A_r B_r by hand into a plain (adapter-free)
Block per recursion, picks tokens per recursion with numpy (expert-choice:
hierarchical top-k of the router logit, gate alpha * sigmoid; token-choice:
argmax depth of the softmax router, gate alpha * score, no drops), runs the
merged block on the chosen tokens alone and combines as the reference code does
(EC: H[sel] += g * Unit(H[sel]); TC: H1 + g * S). A reference with the adapters
shifted by one recursion must differ by far more than the tolerance, so the
test can tell the mapping apart.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures import EC, ROUTER_SCALE, TC, assert_scale, mor_cfg
from mor.layers.block import Block
from mor.models import build_model

B, S, RANK = 2, 16, 2
# target -> (sub-module, weight) of a block; written out here, not read from mor.layers.lora
TARGETS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
           "gate": ("mlp", "w_gate"), "up": ("mlp", "w_up"), "down": ("mlp", "w_down")}


def _model(router: dict):
  """mor_cfg at 1 + 1 x 3 + 1 layers (d 64) with rank-2 adapters, random non-zero A and B."""
  cfg = dataclasses.replace(mor_cfg(num_layers=5, **router), lora_rank=RANK)
  m = build_model(cfg, 0)
  heads = [rt.head for rt in m.routers] if m.expert_choice else [m.router.head]
  for h in heads:   # decisions far from ties: float noise cannot flip a top-k or an argmax
    h.w_out[...] = h.w_out[...] * ROUTER_SCALE
  rng = np.random.default_rng(1)
  for b in m.plan.unit:
    for sub in ("attn", "mlp"):
      for lora in getattr(m.blocks[b], sub).lora.values():
        a, bb = lora.a[...], lora.b[...]
        d_in = np.prod(a.shape[1:-1])
        lora.a[...] = jnp.asarray(rng.normal(0, d_in ** -0.5, a.shape), a.dtype)
        lora.b[...] = jnp.asarray(rng.normal(0, 0.3, bb.shape), bb.dtype)
  return m


def _merged_blocks(m, shift: int = 0) -> list[list]:
  """[recursion][unit block] adapter-free Blocks holding W + A_r' B_r', r' = (r + shift) % N_r."""
  cfg0 = dataclasses.replace(m.cfg, lora_rank=0)
  n = m.cfg.num_recursions
  out = []
  for r in range(n):
    ra = (r + shift) % n
    row = []
    for b in m.plan.unit:
      src, blk = m.blocks[b], Block(cfg0, nnx.Rngs(0))
      blk.attn_norm.scale[...] = src.attn_norm.scale[...]
      blk.mlp_norm.scale[...] = src.mlp_norm.scale[...]
      for t, (sub, attr) in TARGETS.items():
        w = np.asarray(getattr(getattr(src, sub), attr)[...])
        lora = getattr(src, sub).lora[t]
        a, bb = np.asarray(lora.a[ra]), np.asarray(lora.b[ra])
        delta = a.reshape(-1, RANK) @ bb.reshape(RANK, -1)
        getattr(getattr(blk, sub), attr)[...] = jnp.asarray(w + delta.reshape(w.shape))
      row.append(blk)
    out.append(row)
  return out


@jax.jit
def _block(graphdef, state, x_1xKxD, pos_1xK):
  return nnx.merge(graphdef, state)(x_1xKxD, pos_1xK)[0]


def _unit(blocks, x_KxD, pos_K):
  """The merged unit on one sequence's chosen tokens alone (they attend among themselves)."""
  x = x_KxD[None]
  for blk in blocks:   # one compilation per token count serves every block and recursion
    x = _block(*nnx.split(blk), x, jnp.asarray(pos_K, jnp.int32)[None])
  return np.asarray(x[0])


def _reference(m, tokens_BxS, shift: int = 0):
  cfg, n = m.cfg, m.cfg.num_recursions
  rc = cfg.router
  merged = _merged_blocks(m, shift)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  x = m.embed_tokens(tokens_BxS)
  for b in m.plan.prefix:
    x = _block(*nnx.split(m.blocks[b]), x, pos)
  h = np.array(x, np.float64)
  for i in range(B):
    if m.expert_choice:
      cand = np.arange(S)
      for r in range(n):
        w = np.asarray(m.routers[r].head.w_out[...], np.float64)[:, 0]
        logit = h[i, cand] @ w / rc.temperature
        k = max(1, (n - r) * S // n)
        keep = np.sort(np.argsort(-logit, kind="stable")[:k])
        sel, g = cand[keep], rc.alpha / (1 + np.exp(-logit[keep]))
        h[i, sel] += g[:, None] * _unit(merged[r], jnp.asarray(h[i, sel], jnp.float32), sel)
        cand = sel
    else:
      w = np.asarray(m.router.head.w_out[...], np.float64)
      z = h[i] @ w / rc.temperature
      p = np.exp(z - z.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      depth, g = p.argmax(-1) + 1, rc.alpha * p.max(-1)
      state = h[i].copy()
      for r in range(n):
        sel = np.flatnonzero(depth > r)
        if len(sel):
          state[sel] = _unit(merged[r], jnp.asarray(state[sel], jnp.float32), sel)
      h[i] = h[i] + g[:, None] * state
  x = jnp.asarray(h, jnp.float32)
  for b in m.plan.suffix:
    x = _block(*nnx.split(m.blocks[b]), x, pos)
  return np.asarray(jax.jit(lambda g, st, x: nnx.merge(g, st).logits(x))(*nnx.split(m), x))


@jax.jit
def _forward(graphdef, state, tokens_BxS):
  """The model as training calls it (top-k routing): (logits, aux)."""
  logits, _, aux = nnx.merge(graphdef, state)(tokens_BxS)
  return logits, aux


@pytest.mark.parametrize("router", [EC, dict(TC, capacity_factor=3.0)], ids=["ec", "tc"])
def test_mor_lora_per_recursion_equals_hand_merged_reference(router):
  m = _model(router)
  tokens = jax.random.randint(jax.random.key(2), (B, S), 0, m.cfg.vocab_size)
  logits, aux = _forward(*nnx.split(m), tokens)
  if not m.expert_choice:   # capacity_factor 3: no token dropped, every depth taken
    assert float(aux["stats"]["dropped_tokens"]) == 0
    reached = np.asarray(aux["stats"]["tokens_per_depth"])
    assert reached[0] == 1 and 0 < reached[2] < reached[1] < 1, reached
  ref = _reference(m, tokens)
  assert_scale(ref, what="reference logits")
  np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=1e-4)
  # sensitivity: the adapters one recursion off move the logits far beyond the tolerance
  shifted = _reference(m, tokens, shift=1)
  assert np.max(np.abs(shifted - ref)) > 100 * 2e-4, np.max(np.abs(shifted - ref))
