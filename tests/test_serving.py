"""Continuous depth-wise batching engine against per-request generate; sharded slots."""
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
from test_decode import EC, FAST_COMPILE, TC, mixed_model, mor_cfg

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


@pytest.mark.parametrize("case", ["ec_cache", "ec_share_aux_router", "tc_cache"])
def test_engine_equals_per_request_generate(case):
  router = {"ec_cache": EC, "tc_cache": TC,
            # step 1 below capacity 1: some tokens skip every recursion (sharing still
            # runs recursion 1 for their keys)
            "ec_share_aux_router": dict(EC, kv="share", causal="aux_router",
                                        capacities=(0.75, 0.5, 0.25))}[case]
  model = mixed_model(**router)
  reqs = requests()
  got, eng = serve(model, reqs)
  want = per_request_generate(model, reqs)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  assert eng.stats["tokens_processed"] == sum(len(p) + n - 1 for p, n in reqs)
  # Depth-wise batching keeps the unit busy: most slot-steps run a real recursion.
  assert eng.stats["unit_row_utilisation"] > 0.5, eng.stats


@pytest.mark.parametrize("kind", ["recursive", "vanilla"])
def test_engine_serves_recursive_and_vanilla(kind):
  model = build_model(mor_cfg(kind=kind, num_layers=5 if kind == "recursive" else 2), 0)
  reqs = [(p, n) for p, n in requests(seed=1) if len(p) == 5][:3]
  got, _ = serve(model, reqs, num_slots=2)
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
  for g, w in zip(got, per_request_generate(model, reqs)):
    np.testing.assert_array_equal(g, w)
  # generate with the batch sharded over the data axis equals it per request.
  five = [(p, n) for p, n in reqs if len(p) == 5][:8]
  prompts = jax.device_put(jnp.asarray(np.stack([p for p, _ in five])),
                           NamedSharding(mesh, P("data")))
  out = decode.generate(model, prompts, 7, compiler_options=FAST_COMPILE)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_array_equal(out, np.stack(per_request_generate(model, five)))
