"""The router-free KL exit (mor.exits): fixed-depth limits, cached = full sequence, a
per-token reference, FLOPs by hand."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor import decode, exits, flops
from mor.config import ModelConfig, RouterConfig
from mor.layers.attention import KV
from mor.models import build_model
from tests.fixtures import EC, FAST_COMPILE, ROUTER_SCALE, TC, assert_scale

MAX_DEPTH = 3      # past the trained N_r = 2: test-time depth
MID = 0.2          # KL thresholds at which depths are mixed (asserted): recursive,
MOR_MID = 3e-3     # and MoR expert-choice (gates of 0.1 move its distributions less)


def cfg(kind="recursive", sharing="middle_cycle", lora_rank=0, **router) -> ModelConfig:
  """1 + 1 x 2 + 1 layers (middle_cycle), untied head, init_std ~ 1/sqrt(d): O(1) logits."""
  return ModelConfig(kind=kind, vocab_size=64, num_layers=4, d_model=32, num_heads=4,
                     num_kv_heads=2, ffn_dim=64, max_seq_len=32, num_recursions=2,
                     sharing=sharing, lora_rank=lora_rank, tie_embeddings=False, init_std=0.2,
                     router=RouterConfig(**router))


@functools.cache
def model(kind="recursive", routing=None):
  m = build_model(cfg(kind, **({"expert_choice": EC, "token_choice": TC}[routing] if routing
                               else {})), 0)
  if kind == "mor":  # decisions far from the threshold, mixed depths (tests/fixtures.py)
    heads = [rt.aux_head or rt.head for rt in m.routers] if m.expert_choice else [m.router.head]
    for h in heads:
      h.w_out[...] = h.w_out[...] * ROUTER_SCALE
  return m


@functools.cache
def lora_model():
  """Cycle sharing (no prefix or suffix: the probe is norm + head) with per-recursion LoRA
  whose B is random, so the adapter each recursion picks changes the logits."""
  m = build_model(cfg(sharing="cycle", lora_rank=2), 0)
  n = 0
  for blk in m.blocks:
    for sub in (blk.attn, blk.mlp):
      for ad in (sub.lora or {}).values():
        ad.b[...] = jax.random.normal(jax.random.key(n), ad.b[...].shape) * 0.3
        n += 1
  assert n > 0
  return m


def tokens(b=2, s=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, 64)


def depth_forward(m, toks, max_depth):
  graphdef, state = nnx.split(m)
  f = jax.jit(lambda st, t: decode.depth_forward(nnx.merge(graphdef, st), t, max_depth),
              compiler_options=FAST_COMPILE)
  return f(state, toks)


def forward(m, toks, threshold, max_depth=MAX_DEPTH):
  return exits.kl_exit_forward(m, toks, threshold, max_depth, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("name", ["middle_cycle", "cycle_lora"])
def test_threshold_zero_is_fixed_depth_and_inf_is_one_recursion(name):
  m, toks = (model() if name == "middle_cycle" else lora_model()), tokens()
  ref = depth_forward(m, toks, MAX_DEPTH)   # past N_r: LoRA of deeper steps reuses the last
  assert_scale(ref, what="logits")
  logits, depth = forward(m, toks, 0.0)
  np.testing.assert_allclose(logits, ref, atol=2e-5)
  assert (np.asarray(depth) == MAX_DEPTH).all()
  if name == "cycle_lora":
    return   # the one-recursion limit does not depend on the plan: one compile fewer
  logits, depth = forward(m, toks, float("inf"))
  np.testing.assert_allclose(logits, depth_forward(m, toks, 1), atol=2e-5)
  assert (np.asarray(depth) == 1).all()
  assert np.abs(np.asarray(ref) - np.asarray(logits)).max() > 0.1   # the depths differ


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_mor_threshold_zero_is_causal_routing(routing):
  m, toks = model("mor", routing), tokens()
  logits, depth = forward(m, toks, 0.0)   # past N_r: EC reuses the last router, TC goes on
  np.testing.assert_allclose(logits, depth_forward(m, toks, MAX_DEPTH), atol=2e-5)
  graphdef, state = nnx.split(m)
  # the realised depths of the causal forward at MAX_DEPTH (no public hook takes max_depth)
  trunk = lambda st, t: nnx.merge(graphdef, st)._trunk(t, None, "causal", None, MAX_DEPTH)[1]
  routed = jax.jit(trunk, compiler_options=FAST_COMPILE)(state, toks)
  np.testing.assert_array_equal(depth, routed)
  assert len(np.unique(np.asarray(routed))) > 1, "routers give every token the same depth"
  assert np.asarray(routed).max() == MAX_DEPTH


@pytest.mark.parametrize("kind, routing, threshold, prefill", [
    ("recursive", None, MID, 5), ("mor", "expert_choice", MOR_MID, 3)])
def test_cached_decoding_equals_full_sequence(kind, routing, threshold, prefill):
  m, toks = model(kind, routing), tokens()
  logits, depth = forward(m, toks, threshold)
  assert len(np.unique(np.asarray(depth))) >= 3, f"depths barely vary: {depth}"
  dec_logits, dec_depth = exits.kl_exit_decode(m, toks, threshold, MAX_DEPTH,
                                               prefill_len=prefill, compiler_options=FAST_COMPILE)
  np.testing.assert_array_equal(dec_depth, depth)
  np.testing.assert_allclose(dec_logits, logits, atol=2e-5)


def test_generate_follows_its_own_greedy_logits():
  m, toks = model(), tokens(s=4, seed=3)
  out, depth = exits.kl_exit_generate(m, toks, 8, threshold=MID, max_depth=MAX_DEPTH,
                                      compiler_options=FAST_COMPILE)
  seq = jnp.concatenate([toks, out], axis=1)    # the shape of tokens(): forward is compiled
  logits, ref_depth = forward(m, seq, MID)
  np.testing.assert_array_equal(out, np.argmax(logits[:, 3:-1], -1))
  np.testing.assert_array_equal(depth, ref_depth[:, 4:])   # step i consumed generated token i


# ---------------------------------------------------------------------------
def _reference(m, toks_S, threshold, max_depth):
  """One token at a time, Python control flow: each token recurses until its own KL test
  passes; its K/V at the depths it skipped are copied from the last depth it computed."""
  c, plan = m.cfg, m.plan
  s = len(toks_S)
  sites = {}   # site -> [K_SxKxH, V_SxKxH, P_S]: the keys one applied layer reads

  def site(key):
    return sites.setdefault(key, [np.zeros((s, c.num_kv_heads, c.dh), np.float32),
                                  np.zeros((s, c.num_kv_heads, c.dh), np.float32),
                                  np.full((s,), -1, np.int32)])

  def apply(key, b, x, t, rec=None):
    kk, vv, pp = site(key)
    y, k, v = _block_step(m, b, rec, x, t, kk, vv, pp)
    kk[t], vv[t], pp[t] = k, v, t
    return y

  def copy(src, dst, t):
    for a, b in zip(site(src), site(dst)):
      b[t] = a[t]

  def probe(x, r, t):
    for i, b in enumerate(plan.suffix):
      x = apply(("probe", r, i), b, x, t)
    return np.asarray(jax.nn.log_softmax(m.logits(x)[0, 0]), np.float64)

  out, depth = np.zeros((s, c.vocab_size), np.float32), np.zeros(s, int)
  for t in range(s):
    x = m.embed_tokens(jnp.asarray(toks_S[t:t + 1])[None])
    for b in plan.prefix:
      x = apply(("prefix", b), b, x, t)
    logp, d = probe(x, 0, t), 0
    for r in range(max_depth):
      for j, b in enumerate(plan.unit):
        x = apply(("unit", r, j), b, x, t)
      d = r + 1
      new = probe(x, d, t)
      kl = max(float(np.sum(np.exp(new) * (new - logp))), 0.0)
      logp = new
      if kl < threshold:
        break
    for r in range(d, max_depth):
      for j in range(len(plan.unit)):
        copy(("unit", d - 1, j), ("unit", r, j), t)
    for r in range(d + 1, max_depth + 1):
      for i in range(len(plan.suffix)):
        copy(("probe", d, i), ("probe", r, i), t)
    for i, b in enumerate(plan.suffix):
      x = apply(("out", i), b, x, t)
    out[t], depth[t] = m.logits(x)[0, 0], d
  return out, depth


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step_jit(graphdef, b, rec, state, x_1x1xD, t, k_SxKxH, v_SxKxH, p_S):
  blk = nnx.merge(graphdef, state).blocks[b]
  pos = jnp.full((1, 1), t, jnp.int32)
  kv = blk.attn.project_kv(blk.attn_norm(x_1x1xD), pos, rec)
  k, v = kv.k_BxTxKxH[0, 0], kv.v_BxTxKxH[0, 0]
  keys = KV(k_SxKxH.at[t].set(k)[None], v_SxKxH.at[t].set(v)[None], p_S.at[t].set(t)[None])
  return blk(x_1x1xD, pos, shared_kv=keys, recursion=rec)[0], k, v


def _block_step(m, b, rec, x, t, kk, vv, pp):
  graphdef, state = nnx.split(m)
  y, k, v = _step_jit(graphdef, b, rec, state, x, t, kk, vv, pp)
  return y, np.asarray(k), np.asarray(v)


def test_batched_equals_per_token_reference():
  m, toks = model(), tokens()
  logits, depth = forward(m, toks, MID)
  for row in range(toks.shape[0]):
    ref_logits, ref_depth = _reference(m, np.asarray(toks[row]), MID, MAX_DEPTH)
    np.testing.assert_array_equal(depth[row], ref_depth)
    np.testing.assert_allclose(logits[row], ref_logits, atol=2e-5)


# ---------------------------------------------------------------------------
def test_flops_by_hand():
  c = cfg()                    # d 32, 4 heads of 8, 2 KV heads, FFN 64, vocab 64
  lin = 2 * 32 * 32 + 4 * 32 * 16 + 2 * 32 * 32 + 6 * 32 * 64   # Q, K+V, O, SwiGLU: 18432
  key, head = 4 * 32, 2 * 32 * 64                                # per key attended; LM head
  depth = np.array([[1, 2, 2, 1]])
  causal_all = 2.5             # causal keys per query over all 4 tokens: (4 + 1) / 2
  model_f = (2 * 4 * (lin + causal_all * key)          # prefix, output suffix
             + 4 * head
             + 4 * (lin + causal_all * key)            # recursion 1: 4 tokens
             + 2 * (lin + 2 * key))                    # recursion 2: 2 tokens over all 4 keys
  probes = (4 * (lin + causal_all * key) + 4 * head    # after 0 recursions: 4 tokens
            + 4 * (lin + causal_all * key) + 4 * head  # after 1: 4 tokens
            + 2 * (lin + 2 * key) + 2 * head)          # after 2: 2 tokens, over 4 keys (4 / 2)
  got = exits.kl_exit_flops_per_token(c, depth, breakdown=True)
  assert got["model"] == pytest.approx(model_f / 4)
  assert got["kl_overhead"] == pytest.approx(probes / 4)
  assert got["total"] == exits.kl_exit_flops_per_token(c, depth)
  # MoR expert-choice: recursion 2 attends among its 2 tokens; linear router 2d per candidate
  m = exits.kl_exit_flops_per_token(cfg("mor", **EC), depth, breakdown=True)
  mor_f = model_f - 2 * (lin + 2 * key) + 2 * (lin + 1.5 * key) + (4 + 4) * 2 * 32
  assert m["model"] == pytest.approx(mor_f / 4)
  # every token at the trained depth: the model part is mor.flops' fixed-depth count
  full = exits.kl_exit_flops_per_token(c, np.full((3, 16), 2), breakdown=True)
  assert full["model"] == pytest.approx(flops.forward_flops_per_token(c, 16))


def test_bad_models_are_refused():
  with pytest.raises(ValueError, match="max_depth"):
    forward(model(), tokens(), 0.1, 0)
  with pytest.raises(ValueError, match="recursive or MoR"):
    exits.init_exit_caches(build_model(cfg(kind="vanilla"), 0), 1, 4, 2)
