"""Router-free early exit: a token stops recursing when successive recursions agree.

After recursion r (r = 0: the prefix output) a *probe* applies the suffix
blocks, the final norm and the LM head to the state, giving p_r. A token exits
after recursion r >= 1 when KL(p_r || p_{r-1}) < threshold, or at max_depth
(Geiping et al. 2025, "Huginn"; max_depth may exceed the trained N_r:
test-time depth, per-recursion LoRA of deeper steps reuses the last). KL is
clamped at 0, so threshold 0 never exits early and +inf exits after one
recursion. An exited token keeps its state.

Keys and values of an exited token at deeper recursions, by model kind, so
each keeps the attention pattern it was trained with:
- kind="recursive" (every token attended at every depth in training): the
  Huginn rule, a skipped depth reuses the token's latest K/V, i.e. the K/V its
  last computed application of that block produced.
- kind="mor": the KL rule on top of the causal routing (mor_decode): a token
  recurses while its router routes it AND its KL has not fired; a token that
  stopped either way is hidden from deeper recursions (MoR's recursion-wise
  caching). kv="share" is not supported.
Probes always see every token: a token that stopped reuses its latest probe K/V.

The output is the model's usual suffix + head over the final states (so
threshold 0 equals `decode.depth_forward`); the probes only decide. The
cached path (`kl_exit_prefill`, `kl_exit_step`, `kl_exit_generate`, and the
teacher-forced `kl_exit_decode`) keeps one
KV cache per (recursion, unit block) and per (probe depth, suffix block) and
writes every token's K/V at every depth by the rule above, so it equals the
full-sequence reference `kl_exit_forward` token for token. A recursion that no
token of the call runs is skipped under lax.cond (batch 1: real savings; a
batch stops when all rows have exited).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mor import decode, flops as flops_lib, kv_cache
from mor import routers as R
from mor.config import ModelConfig
from mor.layers import lora
from mor.layers.attention import KV
from mor.models.mor_decode import ec_decision
from mor.models.sharing import make_plan
from mor.models.transformer import compute_dtype, default_positions


class ExitCaches(NamedTuple):
  prefix: list      # KVCache per prefix block
  recursion: list   # [r][unit block]: the unit's application r (0-based, r < max_depth)
  probe: list       # [r][suffix block]: the probe after r recursions (0..max_depth)
  suffix: list      # KVCache per suffix block: the output pass over the final states


def _check(cfg: ModelConfig, max_depth: int) -> None:
  if max_depth < 1:
    raise ValueError(f"max_depth={max_depth}; the KL exit needs at least 1 recursion")
  if cfg.kind not in ("recursive", "mor") or not make_plan(cfg).cycle:
    raise ValueError("the KL exit needs a recursive or MoR model with cycle or middle_cycle "
                     f"sharing, got kind={cfg.kind!r} sharing={cfg.sharing!r}")
  if cfg.kind == "mor" and cfg.router.kv != "cache":
    raise ValueError("the KL exit supports MoR with router.kv='cache' only, got 'share'")


def init_exit_caches(model, batch: int, max_len: int, max_depth: int) -> ExitCaches:
  """Empty caches for prefill and decoding with the KL exit up to max_depth recursions."""
  c, plan = model.cfg, model.plan
  _check(c, max_depth)
  new = lambda: kv_cache.init_cache(batch, max_len, c.num_kv_heads, c.dh, compute_dtype(c))
  return ExitCaches([new() for _ in plan.prefix],
                    [[new() for _ in plan.unit] for _ in range(max_depth)],
                    [[new() for _ in plan.suffix] for _ in range(max_depth + 1)],
                    [new() for _ in plan.suffix])


def _block(model, b: int, x_BxSxD, pos_BxS, rec, fresh_BxS, buf: KV | None, visible_BxS, cache):
  """Block b where rows not fresh reuse buf's K/V and only visible rows are keys.

  Returns (x_BxSxD, this call's K/V after the reuse, cache). Without a cache the
  keys are this call's tokens (the full-sequence reference); with one, the new
  K/V are appended (visible rows only) and attention runs over the cache.
  """
  blk = model.blocks[b]
  kv = blk.attn.project_kv(blk.attn_norm(x_BxSxD), pos_BxS, rec)
  if buf is not None:
    f = fresh_BxS[..., None, None]
    kv = KV(jnp.where(f, kv.k_BxTxKxH, buf.k_BxTxKxH), jnp.where(f, kv.v_BxTxKxH, buf.v_BxTxKxH),
            pos_BxS)
  if cache is None:
    keys = KV(kv.k_BxTxKxH, kv.v_BxTxKxH, jnp.where(visible_BxS, pos_BxS, -1))
  else:
    cache = kv_cache.write(cache, kv.k_BxTxKxH, kv.v_BxTxKxH, pos_BxS, visible_BxS)
    keys = KV(cache.k_BxTxKxH, cache.v_BxTxKxH, cache.pos_BxT)
  return blk(x_BxSxD, pos_BxS, shared_kv=keys, recursion=rec)[0], kv, cache


def _write_only(bufs: list, caches, pos_BxS, visible_BxS):
  """A skipped depth: the buffered K/V go into its caches (nothing is computed)."""
  if caches is None:
    return None
  return [kv_cache.write(c, kv.k_BxTxKxH, kv.v_BxTxKxH, pos_BxS, visible_BxS)
          for c, kv in zip(caches, bufs)]


def _blocks(model, blocks, x_BxSxD, pos_BxS, rec, fresh_BxS, bufs, visible_BxS, caches):
  """Blocks in order with K/V reuse; returns (x, new bufs, new caches or None)."""
  new_bufs, new_caches = [], []
  for j, b in enumerate(blocks):
    x_BxSxD, kv, c = _block(model, b, x_BxSxD, pos_BxS, rec, fresh_BxS, bufs[j], visible_BxS,
                            None if caches is None else caches[j])
    new_bufs.append(kv)
    new_caches.append(c)
  return x_BxSxD, new_bufs, (None if caches is None else new_caches)


def _exit_pass(model, tokens_BxS, pos_BxS, caches: ExitCaches | None, threshold, max_depth: int):
  """Embed, prefix, KL-exit recursions, output pass: (logits_BxSxV, depth_BxS, caches)."""
  cfg, plan = model.cfg, model.plan
  mor = cfg.kind == "mor"
  n = cfg.num_recursions
  b, s = tokens_BxS.shape
  ones = jnp.ones((b, s), bool)
  get = lambda part, i: None if caches is None else getattr(caches, part)[i]
  dt = compute_dtype(cfg)
  zero = KV(jnp.zeros((b, s, cfg.num_kv_heads, cfg.dh), dt),
            jnp.zeros((b, s, cfg.num_kv_heads, cfg.dh), dt), pos_BxS)

  # decoding skips a recursion no row runs; the reference always computes (less to compile)
  cond = jax.lax.cond if caches is not None else lambda p, run, skip: run()
  x = model.embed_tokens(tokens_BxS)
  prefix = []
  for i, blk in enumerate(plan.prefix):
    x, _, c = _block(model, blk, x, pos_BxS, None, ones, None, ones, get("prefix", i))
    prefix.append(c)
  h1_BxSxD, state_BxSxD = x, x
  if mor and not model.expert_choice:
    tc = model.router(h1_BxSxD)
    assigned_BxS = tc.depth_BxS
    if max_depth != n:  # test-time depth: tokens routed to the deepest trained depth go on
      assigned_BxS = jnp.where(assigned_BxS >= n, max_depth, jnp.minimum(assigned_BxS, max_depth))
  # what the head would read if the token stopped here
  out_of = lambda st: (R.tc_output(h1_BxSxD, st, tc.gate_BxS, cfg.router.combine)
                       if mor and not model.expert_choice else st)

  def probe(st, fresh_BxS, bufs, pcaches):
    y, bufs, pcaches = _blocks(model, plan.suffix, out_of(st), pos_BxS, None, fresh_BxS, bufs,
                               ones, pcaches)
    return jax.nn.log_softmax(model.logits(y), axis=-1), bufs, pcaches

  logp_BxSxV, probe_bufs, pc = probe(state_BxSxD, ones, [zero] * len(plan.suffix), get("probe", 0))
  probes, recursions = [pc], []
  unit_bufs = [zero] * len(plan.unit)
  active_BxS, depth_BxS = ones, jnp.zeros((b, s), jnp.int32)
  for r in range(max_depth):
    rec = min(r, n - 1) if cfg.lora_rank else None   # deeper steps reuse the last adapters
    go_BxS, gate_BxS = active_BxS, None
    if mor and model.expert_choice:
      routed_BxS, gate_BxS = ec_decision(model, r, state_BxSxD)
      go_BxS = active_BxS & routed_BxS
    elif mor:
      go_BxS = active_BxS & (assigned_BxS > r)
    # recursive: every token is a key at every depth (latest K/V); MoR: only those that ran
    visible_BxS = go_BxS if mor else ones
    rc = get("recursion", r)
    run = lambda: _blocks(model, plan.unit, state_BxSxD, pos_BxS, rec, go_BxS, unit_bufs,
                          visible_BxS, rc)
    skip = lambda: (state_BxSxD, unit_bufs, _write_only(unit_bufs, rc, pos_BxS, visible_BxS))
    out_BxSxD, unit_bufs, rc = cond(jnp.any(go_BxS), run, skip)
    recursions.append(rc)
    if mor and model.expert_choice:
      inc = R.combine_increment(state_BxSxD, out_BxSxD, gate_BxS, cfg.router.combine)
      state_BxSxD = state_BxSxD + jnp.where(go_BxS[..., None], inc, 0)
    else:
      state_BxSxD = jnp.where(go_BxS[..., None], out_BxSxD, state_BxSxD)
    depth_BxS += go_BxS

    pc = get("probe", r + 1)
    run = lambda: probe(state_BxSxD, go_BxS, probe_bufs, pc)
    skip = lambda: (logp_BxSxV, probe_bufs, _write_only(probe_bufs, pc, pos_BxS, ones))
    new_logp, probe_bufs, pc = cond(jnp.any(go_BxS), run, skip)
    probes.append(pc)
    kl_BxS = jnp.maximum(jnp.sum(jnp.exp(new_logp) * (new_logp - logp_BxSxV), axis=-1), 0.0)
    logp_BxSxV = jnp.where(go_BxS[..., None], new_logp, logp_BxSxV)
    active_BxS = go_BxS & ~(kl_BxS < threshold)

  x = out_of(state_BxSxD)
  suffix = []
  for i, blk in enumerate(plan.suffix):
    x, _, c = _block(model, blk, x, pos_BxS, None, ones, None, ones, get("suffix", i))
    suffix.append(c)
  new = None if caches is None else ExitCaches(prefix, recursions, probes, suffix)
  return model.logits(x), depth_BxS, new


def _forward(graphdef, state, tokens_BxS, threshold, max_depth: int):
  model = nnx.merge(graphdef, state)
  logits, depth, _ = _exit_pass(model, tokens_BxS, default_positions(tokens_BxS), None,
                                threshold, max_depth)
  return logits, depth


def kl_exit_forward(model, tokens_BxS: jax.Array, threshold: float, max_depth: int,
                    compiler_options: dict | None = None):
  """Full-sequence reference (dense, masked): (logits_BxSxV, depth_BxS int32 in 1..max_depth).

  Every recursion runs over every token (exited ones masked), so it saves no
  compute; depth_BxS is what `kl_exit_flops_per_token` counts. Jitted (one
  compile per shape and max_depth; the threshold is traced).
  """
  _check(model.cfg, max_depth)
  graphdef, state = nnx.split(model)
  fn = decode._jit(_forward, ("graphdef", "max_depth"), compiler_options)
  return fn(graphdef, state, jnp.asarray(tokens_BxS, jnp.int32), jnp.float32(threshold),
            int(max_depth))


def kl_exit_prefill(model, prompt_BxS: jax.Array, threshold, max_depth: int, max_len: int):
  """Prompt through fresh caches: (logits_BxSxV, depth_BxS, ExitCaches)."""
  b, s = prompt_BxS.shape
  caches = init_exit_caches(model, b, max_len, max_depth)
  pos_BxS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  return _exit_pass(model, prompt_BxS, pos_BxS, caches, threshold, max_depth)


def kl_exit_step(model, token_B: jax.Array, pos_B: jax.Array, caches: ExitCaches, threshold,
                 max_depth: int):
  """One new token per sequence at pos_B: (logits_BxV, depth_B, caches)."""
  logits, depth, caches = _exit_pass(model, token_B[:, None], pos_B[:, None], caches, threshold,
                                     max_depth)
  return logits[:, 0], depth[:, 0], caches


def _generate(graphdef, state, prompt_BxS, threshold, key, steps: int, max_depth: int,
              temperature: float, top_k: int):
  model = nnx.merge(graphdef, state)
  b, s = prompt_BxS.shape
  logits, _, caches = kl_exit_prefill(model, prompt_BxS, threshold, max_depth, s + steps)

  def body(carry, key_t):
    logits_BxV, caches, pos = carry
    tok_B = decode.sample(logits_BxV, key_t, temperature, top_k)
    logits_BxV, depth_B, caches = kl_exit_step(model, tok_B, jnp.full((b,), pos, jnp.int32),
                                               caches, threshold, max_depth)
    return (logits_BxV, caches, pos + 1), (tok_B, depth_B)

  init = (logits[:, -1], caches, jnp.int32(s))
  _, (toks, depths) = jax.lax.scan(body, init, jax.random.split(key, steps))
  return toks.T, depths.T


def kl_exit_generate(model: nnx.Module, prompt_BxS: jax.Array, max_new_tokens: int, *,
                     threshold: float, max_depth: int, temperature: float = 0.0, top_k: int = 0,
                     key: jax.Array | None = None, compiler_options: dict | None = None):
  """Cached generation with the KL exit: (tokens_BxN int32, depths_BxN int32).

  depths_BxN[:, i] is the recursions the step that consumed token i ran (the
  i-th sampled token itself comes from the previous step's logits).
  """
  _check(model.cfg, max_depth)
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  fn = decode._jit(_generate, ("graphdef", "steps", "max_depth", "temperature", "top_k"),
                   compiler_options)
  return fn(graphdef, state, jnp.asarray(prompt_BxS, jnp.int32), jnp.float32(threshold), key,
            int(max_new_tokens), int(max_depth), float(temperature), int(top_k))


def _teacher_forced(graphdef, state, tokens_BxS, threshold, prefill_len: int, max_depth: int):
  model = nnx.merge(graphdef, state)
  b, s = tokens_BxS.shape
  logits, depth, caches = kl_exit_prefill(model, tokens_BxS[:, :prefill_len], threshold,
                                          max_depth, s)

  def body(caches, pos):
    tok_B = jax.lax.dynamic_index_in_dim(tokens_BxS, pos, axis=1, keepdims=False)
    logits_BxV, depth_B, caches = kl_exit_step(model, tok_B, jnp.full((b,), pos, jnp.int32),
                                               caches, threshold, max_depth)
    return caches, (logits_BxV, depth_B)

  _, (lg_TxBxV, dep_TxB) = jax.lax.scan(body, caches, jnp.arange(prefill_len, s, dtype=jnp.int32))
  return (jnp.concatenate([logits, lg_TxBxV.transpose(1, 0, 2)], axis=1),
          jnp.concatenate([depth, dep_TxB.T], axis=1))


def kl_exit_decode(model, tokens_BxS: jax.Array, threshold: float, max_depth: int,
                   prefill_len: int = 1, compiler_options: dict | None = None):
  """Teacher-forced cached decoding: prefill tokens[:, :prefill_len], then one token a step.

  Returns (logits_BxSxV, depth_BxS) as `kl_exit_forward` does, computed the
  decoding way (per-token exits; skipped depths cost nothing at batch 1).
  """
  _check(model.cfg, max_depth)
  graphdef, state = nnx.split(model)
  fn = decode._jit(_teacher_forced, ("graphdef", "prefill_len", "max_depth"), compiler_options)
  return fn(graphdef, state, jnp.asarray(tokens_BxS, jnp.int32), jnp.float32(threshold),
            int(prefill_len), int(max_depth))


# ---------------------------------------------------------------------------
def kl_exit_flops_per_token(cfg: ModelConfig, depth_BxS, causal: bool = True,
                            breakdown: bool = False):
  """Forward FLOPs per token of a KL-exit run whose tokens ran depth_BxS recursions.

  mor.flops conventions and per-layer formulas (`flops._layer`), counted per
  sequence (row) of S tokens and averaged over rows, as the cached path
  computes them:
  - model: prefix, output suffix and LM head on all S tokens; recursion r on
    the k_r tokens of depth > r. Keys at recursion r: all S tokens for
    kind="recursive" (exited ones are read from their latest K/V, no
    projection), the k_r that ran it for MoR (recursion-wise caching). MoR
    routers and LoRA adapters as in mor.flops (an expert-choice router is
    counted on the tokens that ran the previous recursion).
  - kl_overhead, counted separately: the probe after r recursions (suffix
    blocks over all S keys + LM head) on the tokens of depth >= r, r = 0..depth;
    a token of depth d pays d + 1 probes. Softmax and KL are not matmuls (not counted).
  Returns the total, or with breakdown {"model", "kl_overhead", "total"}.
  """
  d_BxS = np.asarray(depth_BxS)
  d_BxS = d_BxS.reshape(-1, d_BxS.shape[-1])
  s, plan = d_BxS.shape[1], make_plan(cfg)
  mor = cfg.kind == "mor"
  adapters = lora.flops_per_token(cfg)
  head = 2 * cfg.d_model * cfg.vocab_size
  fixed = sum(flops_lib._layer(cfg, "", s, s, causal).total for _ in (*plan.prefix, *plan.suffix))
  if mor and cfg.router.routing == "token_choice":
    fixed += s * 2 * cfg.d_model * cfg.num_recursions
  fixed += s * head
  model = overhead = 0.0
  for row in d_BxS:
    model += fixed
    for r in range(int(row.max())):
      k = float(np.sum(row > r))
      for i in range(len(plan.unit)):
        router = k * adapters
        if mor and i == 0 and cfg.router.routing == "expert_choice":
          router += (s if r == 0 else float(np.sum(row >= r))) * flops_lib._ec_router_flops(cfg)
        model += flops_lib._layer(cfg, "", k, k if mor else s, causal, router=router).total
    for r in range(int(row.max()) + 1):
      q = float(np.sum(row >= r))
      overhead += sum(flops_lib._layer(cfg, "", q, s, causal).total for _ in plan.suffix)
      overhead += q * head
  rows = len(d_BxS)
  out = {"model": model / rows / s, "kl_overhead": overhead / rows / s}
  out["total"] = out["model"] + out["kl_overhead"]
  return out if breakdown else out["total"]
