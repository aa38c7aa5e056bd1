"""MoR cached decoding against the full-sequence causal forward; generate; test-time depth."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mor import decode
from mor.models import build_model
from mor.models.mor_decode import cache_bytes, depth_slots, total_cache_bytes
from tests.fixtures import (EC, FAST_COMPILE, TC, assert_not_echo, assert_scale,  # noqa: F401
                            depth_mixed, mixed_model, mor_cfg)

CASES = {"ec_cache": dict(EC), "ec_share": dict(EC, kv="share"),
         "ec_aux_router": dict(EC, causal="aux_router"), "tc_cache": dict(TC),
         "tc_share": dict(TC, kv="share")}


def tokens(b=2, s=20, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, 256)


def jit_model(fn, model, static=()):
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a), compiler_options=FAST_COMPILE,
              static_argnums=tuple(i + 1 for i in static))
  return lambda *a: f(state, *a)


def incremental(m, toks_BxS, prompt_len, slots=None):
  """Prefill prompt_len tokens, then one token at a time: (logits_BxSxV, depth_BxS)."""
  b, s = toks_BxS.shape
  caches = m.init_caches(b, s, slots)
  logits, caches, aux = m(toks_BxS[:, :prompt_len], None, caches=caches)

  def body(caches, t):
    tok_Bx1 = jax.lax.dynamic_slice_in_dim(toks_BxS, t, 1, axis=1)
    lg, caches, aux = m(tok_Bx1, jnp.full((b, 1), t, jnp.int32), caches=caches)
    return caches, (lg[:, 0], aux["stats"]["depth_BxS"][:, 0])

  _, (lg, d) = jax.lax.scan(body, caches, jnp.arange(prompt_len, s))
  return (jnp.concatenate([logits, lg.transpose(1, 0, 2)], axis=1),
          jnp.concatenate([aux["stats"]["depth_BxS"], d.T], axis=1))


def causal(m, toks_BxS):
  """The full-sequence causal forward: (logits, realised depths)."""
  return m._forward(toks_BxS, None, "causal", None)[:2]


def both(m, toks_BxS, slots=None):
  return causal(m, toks_BxS) + incremental(m, toks_BxS, 7, slots)


assert_mixed = depth_mixed


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.quick)
                                  if c in ("ec_cache", "tc_share") else c for c in CASES])
def test_incremental_decoding_equals_causal_forward(case):
  """Catches: a depth's cache receiving tokens that stopped earlier (or missing some), a
  depth reading another depth's cache (checked), a token going on after its router
  stopped it (checked), sharing reading stale keys, a decision that differs between
  prefill and one-token decoding. Logits are O(1), depths mixed."""
  m = mixed_model(**CASES[case])
  ref, want_depth, got, got_depth = jit_model(both, m)(tokens())
  assert_mixed(want_depth)
  assert_scale(ref, what="logits")
  np.testing.assert_array_equal(got_depth, want_depth)   # the same decisions ...
  assert float(jnp.abs(got - ref).max()) <= 1e-5         # ... and the same logits


def test_reduced_depth_caches_are_smaller_and_exact_when_they_fit():
  m = mixed_model(**EC)
  toks = tokens()
  full = m.init_caches(2, 20)
  _, want_depth = jit_model(causal, m)(toks)
  # Slots per depth: the most tokens any sequence sends there (so nothing overflows).
  need = [int(np.max(np.sum(np.asarray(want_depth) > r, axis=1))) for r in range(3)]
  slots = tuple(n / 20 for n in need)
  assert need[2] < need[1] < need[0] == 20
  small = m.init_caches(2, 20, slots)
  per_full, per_small = cache_bytes(full), cache_bytes(small)
  assert per_full[0] == per_small[0] and per_small[2] < per_small[1] < per_full[1]
  assert total_cache_bytes(small) < total_cache_bytes(full)
  assert depth_slots(m.cfg, 64, "capacity") == [64, 54, 27]    # capacity x 1.25 headroom
  ref, _, got, got_depth = jit_model(both, m, static=(1,))(toks, slots)
  np.testing.assert_array_equal(got_depth, want_depth)
  assert float(jnp.abs(got - ref).max()) <= 1e-5
  share = mixed_model(**dict(EC, kv="share")).init_caches(2, 20)
  assert len(cache_bytes(share)) == 1 and cache_bytes(share)[0] == per_full[0]


@pytest.mark.parametrize("case", ["ec_cache"])
def test_generate_greedy_equals_argmax_of_causal_forward(case):
  m = mixed_model(**CASES[case])
  prompt = tokens(1, 5, seed=3)
  new = decode.generate(m, prompt, 7, compiler_options=FAST_COMPILE)
  seq = jnp.concatenate([prompt, new], axis=1)
  logits, depth = jit_model(causal, m)(seq)
  assert len(set(np.asarray(depth).ravel().tolist())) > 1
  assert_not_echo([prompt[0]], [new[0]])
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:-1], -1), new)


def causal_nll(m, inputs_BxS, targets_BxS):
  logits = m(inputs_BxS, routing="causal")[0]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxS))


@pytest.mark.parametrize("kind,depths", [("mor_ec", [3, 5]), ("mor_tc", [4]),
                                         ("recursive", [2, 3])])
def test_nll_vs_depth(kind, depths):
  m = (mixed_model(**EC) if kind == "mor_ec" else mixed_model(**TC) if kind == "mor_tc"
       else build_model(mor_cfg(kind="recursive"), 0))
  toks = np.asarray(tokens(2, 17, seed=4))
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  rows = decode.nll_vs_depth(m, [batch], depths, compiler_options=FAST_COMPILE)
  assert [r["max_depth"] for r in rows] == depths
  assert all(np.isfinite(r["nll"]) and r["tokens"] == 32 for r in rows)
  assert len({r["nll"] for r in rows}) == len(depths)
  if 3 in depths:  # max depth = trained N_r is the standard causal forward
    want = jit_model(causal_nll, m)(batch["inputs"], batch["targets"])
    np.testing.assert_allclose(rows[depths.index(3)]["nll"], float(want), rtol=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_depth_logits_upto_equal_each_depth_forward(lora_rank):
  """The shared-pass test-time depths equal depth_forward at every depth, adapters included.

  With non-zero per-recursion adapters (lora_rank 2), depths past N_r must reuse the
  last recursion's adapter as depth_forward does; depth N_r must equal the model's own
  forward, whose adapter mapping is separate code. Checked to fail with the shared
  unit pass's adapter index off by one and with the suffix applied in place (depth d+1
  fed the suffix's output).
  """
  import dataclasses
  m = build_model(dataclasses.replace(mor_cfg(kind="recursive", num_layers=5),
                                      lora_rank=lora_rank), 0)
  rng = np.random.default_rng(2)
  for b in m.plan.unit:
    for sub in ("attn", "mlp"):
      for lora in (getattr(m.blocks[b], sub).lora.values() if lora_rank else ()):
        lora.b[...] = jnp.asarray(rng.normal(0, 0.3, lora.b.shape), lora.b.dtype)
  toks = jnp.asarray(tokens(2, 12, seed=5))
  gd, state = nnx.split(m)
  got = jax.jit(lambda st, t: decode.depth_logits_upto(nnx.merge(gd, st), t, 5),
                compiler_options=FAST_COMPILE)(state, toks)
  assert len(got) == 5
  for d in range(1, 6):
    want = decode.depth_forward(m, toks, d)
    assert_scale(want, what=f"depth {d} logits")
    np.testing.assert_allclose(np.asarray(got[d - 1]), np.asarray(want), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[m.cfg.num_recursions - 1]), np.asarray(m(toks)[0]),
                             atol=1e-4, rtol=1e-5)
  assert float(jnp.max(jnp.abs(got[4] - got[3]))) > 1e-2   # depths differ: the check sees them
