"""Mixture-of-Recursions: a recursive Transformer whose tokens pick their own depth.

Applied layers are prefix, N_r recursions of the shared unit, suffix
(mor.models.sharing); depth routers (mor.routers) decide which tokens each
recursion processes. Active tokens are gathered into [B, k_r, D] with their
original positions (RoPE, causal mask), the unit runs on them alone and the
results are scattered back; compute for tokens that left is never spent.

Expert-choice, hierarchical: step r scores the k_{r-1} survivors of step r-1,
keeps the top k_r per sequence (re-sorted into original order) and updates
them by cfg.router.combine (`ec_increment`, mor.routers.combine_increment);
the default is the reference code's update
    H[sel] <- H[sel] + g * Unit(H[sel]),   g = alpha * sigmoid(logit / T),
where Unit includes its residual, so a kept token becomes (1 + g) H + g delta.
Ablations: 'residual' H + g delta; 'straight_through' H + delta in the forward
pass with the router's gradient through g. Tokens not kept keep their state.

Token-choice: the router on the prefix output H1 assigns depth i per token.
Recursion r runs the unit (no gate) on tokens of depth >= r that recursion
r-1 processed, in k_r static slots; the earliest tokens win a slot, the rest
are dropped (they stop recursing) and counted. Output, as in the reference:
    final = H1 + g_i * S_i,   S_i = state after the token's realised recursions
(combine 'reference'; 'residual' and 'straight_through' apply the same rules to
delta = S_i - H1, see mor.routers.tc_output).

KV modes (cfg.router.kv). 'cache': attention at step r is among that step's
active tokens only. 'share': recursion 1 runs the unit over the full sequence
(its keys/values are the shared ones; only the selected tokens take its
update), later recursions' active queries attend over recursion 1's keys and
values of the same block position within the unit and skip K/V projections.

routing="causal" is the inference-time decision: expert-choice routes a
survivor deeper when sigmoid(router or auxiliary-router logit) > threshold
(a step of capacity 1.0 keeps every survivor);
token-choice uses its argmax depth with no capacity drops. It keeps [B, S]
shapes and masks inactive tokens (position -1 hides their keys): it is the
reference for decoding, not the training hot path.

Decoding: `init_caches` and `__call__(..., caches=...)` run prefill and
token-by-token decoding with the same causal decisions and per-depth
(or shared) KV caches (mor.models.mor_decode); `max_depth` with causal routing
applies more or fewer recursions than trained (test-time depth scaling; EC
steps past N_r reuse the last router, TC tokens of depth N_r go on).

Capacity warm-up (EC) and forced full depth (TC) need more slots than the
static k_r, so with `step` and warmup_steps > 0 the recursions run under
lax.cond: a full-capacity branch masks the extra slots while step <
warmup_steps, the static fast branch runs afterwards (both are compiled).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mor import routers as R
from mor.config import ModelConfig
from mor.models import mor_decode
from mor.models.mor_decode import MoRCaches
from mor.models.transformer import Transformer, default_positions


def ec_increment(h_sel_BxKxD: jax.Array, unit_out_BxKxD: jax.Array,
                 gate_BxK: jax.Array, combine: str = "reference") -> jax.Array:
  """What expert-choice scatter-adds to a kept token's state (mor.routers.combine_increment).

  reference (default): g * Unit(H), Unit with its residual -> (1 + g) H + g delta;
  residual: g * delta; straight_through: delta forward, gradient delta to g.
  """
  return R.combine_increment(h_sel_BxKxD, unit_out_BxKxD, gate_BxK, combine)


def _take(x_BxS: jax.Array, idx_BxK: jax.Array) -> jax.Array:
  """Gathers along the sequence axis; trailing feature axes follow."""
  idx = idx_BxK.reshape(idx_BxK.shape + (1,) * (x_BxS.ndim - 2))
  return jnp.take_along_axis(x_BxS, idx, axis=1)


def _scatter(x_BxS: jax.Array, idx_BxK: jax.Array, valid_BxK: jax.Array, upd, add: bool):
  """Writes (or adds) upd at the valid slots; invalid slots point past the end and drop."""
  b, s = x_BxS.shape[:2]
  rows = jnp.arange(b)[:, None]
  ref = x_BxS.at[rows, jnp.where(valid_BxK, idx_BxK, s)]
  return ref.add(upd, mode="drop") if add else ref.set(upd, mode="drop")


class MoRTransformer(Transformer):
  """Recursive Transformer with expert-choice or token-choice depth routing."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    super().__init__(cfg, rngs)
    if not self.plan.cycle:
      raise ValueError(f"MoR needs cycle or middle_cycle sharing, got {cfg.sharing!r}")
    self.expert_choice = cfg.router.routing == "expert_choice"
    if self.expert_choice:
      self.routers = nnx.List([R.ExpertChoiceRouter(cfg, rngs)
                               for _ in range(cfg.num_recursions)])
    else:
      self.router = R.TokenChoiceRouter(cfg, rngs)

  def __call__(self, tokens_BxS: jax.Array, pos_BxS: jax.Array | None = None,
               caches: MoRCaches | None = None, *, routing: str = "topk", step=None,
               max_depth: int | None = None, head: bool = True, depth_BxS=None):
    """Returns (logits_BxSxV, caches or None, aux); routing is 'topk' (training) or 'causal'.

    head=False: final-normed hidden states instead of logits (see Transformer).
    depth_BxS (token-choice): each token's depth in 1..N_r, overriding the router's
    choice (router.depth_from: depth tasks' oracle, mor.routers.data_depth).

    With `caches` (from `init_caches`) this is prefill or decoding, always with
    the causal decisions (mor.models.mor_decode). max_depth (causal routing only)
    allows more or fewer recursions than trained: test-time depth scaling.
    """
    if caches is not None:
      if self.cfg.router.depth_from != "router":
        raise ValueError(f"router.depth_from={self.cfg.router.depth_from!r} takes depths from "
                         "the data: no decoding")
      pos_BxS = default_positions(tokens_BxS) if pos_BxS is None else pos_BxS
      return mor_decode.cached_forward(self, tokens_BxS, pos_BxS, caches)
    x, _, aux = self._trunk(tokens_BxS, pos_BxS, routing, step, max_depth, depth_BxS)
    return self._out(x, head), None, aux

  def init_caches(self, batch: int, max_len: int, slots=None) -> MoRCaches:
    """Prefix/suffix caches and one cache per (depth, unit block), or per unit block (share).

    slots: None (every depth max_len slots, exact), 'capacity' or a fraction per
    depth (mor_decode.depth_slots): smaller caches for the deeper recursions.
    """
    return mor_decode.init_caches(self, batch, max_len, slots)

  def routing_decisions(self, tokens_BxS: jax.Array, pos_BxS: jax.Array | None = None, *,
                        routing: str = "topk", step=None) -> jax.Array:
    """Realised depth per token, int32 [B, S] in 0..N_r (recursions that processed it)."""
    return self._trunk(tokens_BxS, pos_BxS, routing, step)[1]

  def post_update(self, stats: dict) -> None:
    """After each optimizer step: loss-free balancing bias update (token-choice only)."""
    if not self.expert_choice:
      self.router.post_update(stats["assigned_per_depth"])

  # -------------------------------------------------------------------------
  def _forward(self, tokens_BxS, pos_BxS, routing, step, max_depth=None, forced_BxS=None):
    x, depth_BxS, aux = self._trunk(tokens_BxS, pos_BxS, routing, step, max_depth, forced_BxS)
    return self.logits(x), depth_BxS, aux

  def _trunk(self, tokens_BxS, pos_BxS, routing, step, max_depth=None, forced_BxS=None):
    """Embedding, prefix, recursions, suffix: (x_BxSxD before the final norm, depth, aux)."""
    if routing not in ("topk", "causal"):
      raise ValueError(f"routing={routing!r}; choose topk or causal")
    if max_depth is not None and routing != "causal":
      raise ValueError("max_depth (test-time depth scaling) needs routing='causal'")
    if forced_BxS is not None and (self.expert_choice or max_depth is not None):
      raise ValueError("depth_BxS (given depths) needs token-choice routing and no max_depth")
    pos_BxS = default_positions(tokens_BxS) if pos_BxS is None else pos_BxS
    x = self.embed_tokens(tokens_BxS)
    for b in self.plan.prefix:
      x = self.apply_block(b, x, pos_BxS)[0]
    x, depth_BxS, aux = self._recursions(x, pos_BxS, routing, step, max_depth, forced_BxS)
    for b in self.plan.suffix:
      x = self.apply_block(b, x, pos_BxS)[0]
    return x, depth_BxS, aux

  def _recursions(self, x_BxSxD, pos_BxS, routing, step, max_depth=None, forced_BxS=None):
    s, n = x_BxSxD.shape[1], self.cfg.num_recursions
    run = self._expert_choice if self.expert_choice else self._token_choice
    if forced_BxS is not None:   # token-choice only (checked in _trunk)
      run = functools.partial(run, forced_BxS=forced_BxS)
    full = (s,) * n
    if routing == "causal":
      return run(x_BxSxD, pos_BxS, (s,) * (max_depth or n), mode="causal")
    fast = lambda: run(x_BxSxD, pos_BxS, tuple(R.capacities(self.cfg, s)), mode="topk")
    warmup = self.cfg.router.warmup_steps
    if step is None or warmup <= 0:
      return fast()
    warm = lambda: run(x_BxSxD, pos_BxS, full, mode="warmup", step=step)
    return jax.lax.cond(step < warmup, warm, fast)

  def _run_unit(self, x_BxKxD, pos_BxK, shared_kvs=None, recursion=None):
    """Applies the unit's blocks; returns (x, per-block KV of this call or the shared ones)."""
    kvs = []
    for j, b in enumerate(self.plan.unit):
      if shared_kvs is None:
        x_BxKxD, _, kv, _ = self.apply_block(b, x_BxKxD, pos_BxK, recursion=recursion)
      else:
        kv = shared_kvs[j]
        fn = lambda blk, x, p, kv: blk(x, p, shared_kv=kv, recursion=recursion)
        fn = nnx.remat(fn) if self.cfg.remat else fn
        x_BxKxD = fn(self.blocks[b], x_BxKxD, pos_BxK, kv)[0]
      kvs.append(kv)
    return x_BxKxD, kvs

  def _unit_on(self, h_BxSxD, x_sel_BxKxD, idx_BxK, valid_BxK, pos_BxS, shared_kvs, r=0):
    """Runs the unit on the selected tokens; returns (out_BxKxD, KV to share or None)."""
    if self.cfg.router.kv == "share" and shared_kvs is None:
      # Recursion 1 over the full sequence yields the keys/values later recursions share.
      out_BxSxD, kvs = self._run_unit(h_BxSxD, pos_BxS, recursion=self._lora_recursion(r))
      return _take(out_BxSxD, idx_BxK), kvs
    pos_BxK = jnp.where(valid_BxK, _take(pos_BxS, idx_BxK), -1)  # -1: key hidden from all
    out_BxKxD, _ = self._run_unit(x_sel_BxKxD, pos_BxK, shared_kvs, self._lora_recursion(r))
    return out_BxKxD, shared_kvs

  def _lora_recursion(self, r: int) -> int | None:
    """Which per-recursion LoRA adapters step r uses (deeper test-time steps reuse the last)."""
    return min(r, self.cfg.num_recursions - 1) if self.cfg.lora_rank else None

  # -------------------------------------------------------------------------
  def _expert_choice(self, h_BxSxD, pos_BxS, slots, mode, step=None):
    rc = self.cfg.router
    b, s, _ = h_BxSxD.shape
    rows = jnp.arange(b)[:, None]
    cand_idx_BxC = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cand_valid_BxC = jnp.ones((b, s), bool)
    k_eff = R.warmup_capacities(self.cfg, s, step) if mode == "warmup" else None
    fractions = R.ec_fractions(self.cfg)
    depth_BxS = jnp.zeros((b, s), jnp.int32)
    losses = {"router_bce": 0.0, **({"router_z": 0.0} if rc.z_loss_coef > 0 else {})}
    correct = cands = entropy = 0.0
    hist = jnp.zeros((R.HIST_BINS,), jnp.float32)
    shared = None
    for r in range(len(slots)):
      # Past the trained N_r (test-time depth scaling) the last step's router decides.
      r_ = min(r, len(self.routers) - 1)
      router = self.routers[r_]
      h_cand_BxCxD = _take(h_BxSxD, cand_idx_BxC)
      logit_BxC = router.logit(h_cand_BxCxD)
      decide_BxC = router.decision_logit(h_cand_BxCxD, logit_BxC)
      if mode == "causal":
        j_BxK = jnp.broadcast_to(jnp.arange(s), (b, s))  # every candidate keeps its slot
        keep_BxK = cand_valid_BxC & (jax.nn.sigmoid(decide_BxC) > rc.threshold)
        if fractions[r_] >= 1.0:  # a full-capacity step keeps every survivor; nothing to decide
          keep_BxK = cand_valid_BxC
      else:
        j_BxK, keep_BxK = R.expert_choice_select(
            logit_BxC, cand_valid_BxC, slots[r], None if k_eff is None else k_eff[r])
        target_BxC = jnp.zeros(logit_BxC.shape, jnp.float32)
        target_BxC = target_BxC.at[rows, j_BxK].set(keep_BxK.astype(jnp.float32))
        losses["router_bce"] += rc.aux_loss_coef * R.masked_mean(
            R.bce_with_logits(decide_BxC, target_BxC), cand_valid_BxC)
        if rc.z_loss_coef > 0:  # for a single logit, logsumexp^2 is logit^2
          losses["router_z"] += rc.z_loss_coef * R.masked_mean(logit_BxC ** 2, cand_valid_BxC)
        agree = (jax.nn.sigmoid(decide_BxC) > rc.threshold) == (target_BxC > 0.5)
        correct += jnp.sum(agree & cand_valid_BxC)
        cands += jnp.sum(cand_valid_BxC)
      entropy += jnp.sum(R.binary_entropy(logit_BxC) * cand_valid_BxC)
      hist += R.histogram_counts(jax.nn.sigmoid(logit_BxC), cand_valid_BxC)

      idx_BxK = _take(cand_idx_BxC, j_BxK)
      x_sel_BxKxD = _take(h_cand_BxCxD, j_BxK)
      gate_BxK = router.gate(_take(logit_BxC, j_BxK))
      out_BxKxD, shared = self._unit_on(h_BxSxD, x_sel_BxKxD, idx_BxK, keep_BxK, pos_BxS, shared,
                                        r)
      h_BxSxD = _scatter(h_BxSxD, idx_BxK, keep_BxK,
                         ec_increment(x_sel_BxKxD, out_BxKxD, gate_BxK, rc.combine), add=True)
      depth_BxS = _scatter(depth_BxS, idx_BxK, keep_BxK, 1, add=True)
      cand_idx_BxC, cand_valid_BxC = idx_BxK, keep_BxK

    stats = self._depth_stats(depth_BxS)
    total = jnp.sum(hist)
    stats["router_entropy"] = entropy / jnp.maximum(total, 1.0)
    stats["score_hist"] = hist / jnp.maximum(total, 1.0)
    if mode == "causal":
      return h_BxSxD, depth_BxS, {"losses": {}, "stats": stats}
    stats["sampling_accuracy"] = correct / jnp.maximum(cands, 1.0)
    return h_BxSxD, depth_BxS, {"losses": losses, "stats": stats}

  def _token_choice(self, h1_BxSxD, pos_BxS, slots, mode, step=None, forced_BxS=None):
    del step
    b, s, _ = h1_BxSxD.shape
    n = self.cfg.num_recursions
    tc = self.router(h1_BxSxD)
    assigned_BxS, gate_BxS = tc.depth_BxS, tc.gate_BxS
    if forced_BxS is not None:   # given depths; the gate is the router's score of that depth
      assigned_BxS = jnp.clip(forced_BxS, 1, n).astype(jnp.int32)
      gate_BxS = self.cfg.router.alpha * jnp.take_along_axis(
          tc.scores_BxSxN, assigned_BxS[..., None] - 1, -1)[..., 0]
    if mode == "warmup":  # forced full depth; the gate follows the depth actually used
      assigned_BxS = jnp.full_like(assigned_BxS, n)
      gate_BxS = self.cfg.router.alpha * tc.scores_BxSxN[..., n - 1]
    if len(slots) != n:  # test-time depth: tokens routed to the deepest trained depth go on
      assigned_BxS = jnp.where(assigned_BxS >= n, len(slots), jnp.minimum(assigned_BxS,
                                                                          len(slots)))
    state_BxSxD = h1_BxSxD
    processed_BxS = jnp.ones((b, s), bool)
    depth_BxS = jnp.zeros((b, s), jnp.int32)
    dropped_B = jnp.zeros((b,), jnp.int32)
    shared = None
    for r in range(len(slots)):
      eligible_BxS = processed_BxS & (assigned_BxS > r)
      idx_BxK, keep_BxK = R.token_choice_slots(eligible_BxS, slots[r])
      processed_BxS = _scatter(jnp.zeros((b, s), bool), idx_BxK, keep_BxK, True, add=False)
      dropped_B += jnp.sum(eligible_BxS & ~processed_BxS, axis=1, dtype=jnp.int32)
      x_sel_BxKxD = _take(state_BxSxD, idx_BxK)
      out_BxKxD, shared = self._unit_on(state_BxSxD, x_sel_BxKxD, idx_BxK, keep_BxK, pos_BxS,
                                        shared, r)
      state_BxSxD = _scatter(state_BxSxD, idx_BxK, keep_BxK, out_BxKxD, add=False)
      depth_BxS += processed_BxS
    h_BxSxD = R.tc_output(h1_BxSxD, state_BxSxD, gate_BxS, self.cfg.router.combine)

    stats = self._depth_stats(depth_BxS)
    assigned_N = R.assigned_fractions(tc.depth_BxS, n)  # the router's own choice, pre-forcing
    p_BxSxN = tc.scores_BxSxN / jnp.sum(tc.scores_BxSxN, -1, keepdims=True)
    chosen_BxS = jnp.take_along_axis(tc.scores_BxSxN, tc.depth_BxS[..., None] - 1, -1)[..., 0]
    stats.update(
        assigned_per_depth=assigned_N, maxvio=R.maxvio(assigned_N),
        dropped_tokens=jnp.mean(dropped_B.astype(jnp.float32)),
        dropped_fraction=jnp.mean(dropped_B.astype(jnp.float32)) / s,
        router_entropy=jnp.mean(-jnp.sum(p_BxSxN * jnp.log(p_BxSxN + 1e-9), -1)),
        score_hist=R.histogram_counts(chosen_BxS, jnp.ones_like(chosen_BxS, bool)) / (b * s))
    losses = {} if mode == "causal" else self.router.losses(tc)
    return h_BxSxD, depth_BxS, {"losses": losses, "stats": stats}

  def _depth_stats(self, depth_BxS: jax.Array) -> dict:
    """tokens_per_depth[r-1]: fraction of tokens recursion r processed (non-increasing).

    dead_token_ratio: fraction of sequence positions that no sequence in the
    batch sends to the deepest recursion (a collapsed router leaves many).
    """
    n = self.cfg.num_recursions
    reached_BxSxN = depth_BxS[..., None] >= jnp.arange(1, n + 1)
    dead_S = jnp.all(depth_BxS < n, axis=0)
    return {"tokens_per_depth": jnp.mean(reached_BxSxN.astype(jnp.float32), axis=(0, 1)),
            "dead_token_ratio": jnp.mean(dead_S.astype(jnp.float32))}
