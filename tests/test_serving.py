"""Continuous depth-wise batching engine against the cached decoding path; sharded slots.

Models come from tests/fixtures.py: untied head, O(1) outputs, routers that
send about half the tokens on at each step (mixed depths, asserted).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mor import decode
from mor.config import MeshConfig
from mor.models import build_model
from mor.serving import Engine
from mor.sharding import make_mesh
from tests.fixtures import (EC, FAST_COMPILE, TC, assert_not_echo, assert_scale, depth_mixed,
                            mixed_model, mor_cfg)
from test_decode import incremental, jit_model

# (prompt length, new tokens): more requests than slots, two shapes, in mixed order.
SHAPES = [(3, 5), (5, 7), (3, 5), (5, 7), (5, 7), (3, 5), (5, 7)]


def requests(seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 256, p).astype(np.int32), n) for p, n in SHAPES]


def serve(model, reqs, **kw):
  eng = Engine(model, max_len=16, compiler_options=FAST_COMPILE, **{"num_slots": 3, **kw})
  ids = [eng.submit(p, n) for p, n in reqs]
  out = eng.run()
  return [out[i] for i in ids], eng


def per_request_generate(model, reqs):
  """Plain batch-1 generate per request (jit caches the compile per prompt shape)."""
  return [np.asarray(decode.generate(model, p[None], n, compiler_options=FAST_COMPILE))[0]
          for p, n in reqs]


ROUTERS = {"ec_cache": EC, "tc_cache": TC, "tc_share": dict(TC, kv="share"),
           # step 1 below capacity 1: some tokens skip every recursion (sharing still
           # runs recursion 1 for their keys)
           "ec_share_aux_router": dict(EC, kv="share", causal="aux_router",
                                       capacities=(0.75, 0.5, 0.25))}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.quick)
                                  if c in ("ec_cache", "tc_share") else c for c in ROUTERS])
def test_engine_logits_equal_cached_decoding(case):
  """Per-step logits of the engine equal prefill + one-token cached decoding, at 1e-5.

  Catches (each injected and seen to fail): the router's stop decision ignored (every
  token runs N_r recursions); every depth reading and writing depth 1's cache segment;
  the shared unit never writing its keys (kv='share'); also any wrong gate, position or
  cache reset between requests. Depths are asserted mixed, and the unit rows the engine
  ran equal the reference's recursions token by token.
  """
  model = mixed_model(seed=4 if case == "ec_share_aux_router" else 0, **ROUTERS[case])
  reqs = requests()
  got, eng = serve(model, reqs, record_logits=True)
  # Reference: every request in one batch, token by token through the cached path
  # (rows padded at the end: causality keeps the padding out of earlier positions).
  seqs = [np.concatenate([p, toks[:-1]]) for (p, _), toks in zip(reqs, got)]
  width = max(len(q) for q in seqs)
  batch = np.stack([np.pad(q, (0, width - len(q))) for q in seqs])
  want_BxTxV, depth_BxT = jit_model(incremental, model, static=(1,))(jnp.asarray(batch), 1)
  assert_scale(want_BxTxV, what="logits")
  depths = []
  for rid, ((p, n), toks, q) in enumerate(zip(reqs, got, seqs)):
    want = np.asarray(want_BxTxV[rid, :len(q)])
    assert eng.logits[rid].shape == want.shape, (eng.logits[rid].shape, want.shape)
    np.testing.assert_allclose(eng.logits[rid], want, atol=1e-5, rtol=0)
    # The engine's tokens are the greedy choices of the reference logits.
    np.testing.assert_array_equal(toks, np.argmax(want[len(p) - 1:], -1))
    depths.append(np.asarray(depth_BxT[rid, :len(q)]))
  depth_mixed(np.concatenate(depths))
  ran = [np.maximum(d, 1) if model.cfg.router.kv == "share" else d for d in depths]
  assert eng.stats["unit_rows"] == sum(int(d.sum()) for d in ran), eng.stats
  assert_not_echo([p for p, _ in reqs], got)
  assert eng.stats["tokens_processed"] == sum(len(p) + n - 1 for p, n in reqs)
  # Depth-wise batching keeps the unit busy: most slot-steps run a real recursion.
  assert eng.stats["unit_row_utilisation"] > 0.5, eng.stats


@pytest.mark.parametrize("kind", ["recursive", "vanilla"])
def test_engine_serves_recursive_and_vanilla(kind):
  model = build_model(mor_cfg(kind=kind, num_layers=5 if kind == "recursive" else 2), 0)
  reqs = [(p, n) for p, n in requests(seed=1) if len(p) == 5][:3]
  got, _ = serve(model, reqs, num_slots=2)
  assert_not_echo([p for p, _ in reqs], got)
  for g, w in zip(got, per_request_generate(model, reqs)):
    np.testing.assert_array_equal(g, w)


def test_forced_depths_and_reduced_caches():
  model = mixed_model(**EC)
  reqs = requests(seed=2)
  sched = (3, 2, 1, 1)
  got, eng = serve(model, reqs, forced_depths=sched, slots="capacity")
  assert [len(g) for g in got] == [n for _, n in reqs]
  # Token p of request i ran exactly sched[(p + i) % 4] recursions.
  want_rows = sum(sched[(t + i) % 4] for i, (p, n) in enumerate(reqs)
                  for t in range(len(p) + n - 1))
  assert eng.stats["unit_rows"] == want_rows
  per_depth = eng.kv_bytes()["per_depth"]
  assert per_depth[0] > per_depth[1] > per_depth[2]
  full = Engine(model, num_slots=3, max_len=16).kv_bytes()
  assert full["total"] > eng.kv_bytes()["total"]


def test_sharded_engine_and_generate_equal_single_device():
  assert len(jax.devices()) == 8
  mesh = make_mesh(MeshConfig(data=-1))
  model = mixed_model(**EC)
  reqs = requests() + requests(seed=3)                    # 14 requests over 8 sharded slots
  got, eng = serve(model, reqs, num_slots=8, mesh=mesh)
  assert len(eng.params["embed"]["table"][...].sharding.device_set) == 8
  assert_not_echo([p for p, _ in reqs], got)
  for g, w in zip(got, per_request_generate(model, reqs)):
    np.testing.assert_array_equal(g, w)
  # generate with the batch sharded over the data axis equals it per request.
  five = [(p, n) for p, n in reqs if len(p) == 5][:8]
  prompts = jax.device_put(jnp.asarray(np.stack([p for p, _ in five])),
                           NamedSharding(mesh, P("data")))
  out = decode.generate(model, prompts, 7, compiler_options=FAST_COMPILE)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_array_equal(out, np.stack(per_request_generate(model, five)))
