"""MoRTransformer: the gathered fast path against its dense masked twin, and routing properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor import routers as R
from mor.config import ModelConfig, RouterConfig
from mor.models import build_model
from mor.models.mor import MoRTransformer
from mor.models.transformer import default_positions
from tests.fixtures import SENSITIVE_STD, assert_scale

# O(1) block outputs and an untied head (tests/fixtures.py): 1e-5 is ~1e-5 relative.
SENSITIVE = dict(init_std=SENSITIVE_STD, tie_embeddings=False)

EC = dict(routing="expert_choice", gate="sigmoid")
TC = dict(routing="token_choice", gate="softmax", alpha=1.0)


# Level-0 LLVM codegen halves compile time, which dominates these tiny tests; HLO is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _cfg(num_layers: int = 5, kind: str = "mor", model: dict | None = None,
         **router) -> ModelConfig:
  """num_layers 5: unit of one block; 8: a unit of two (per-block KV sharing)."""
  return ModelConfig(kind=kind, vocab_size=256, num_layers=num_layers, d_model=64, num_heads=4,
                     num_kv_heads=2, ffn_dim=128, max_seq_len=128, num_recursions=3,
                     sharing="middle_cycle", router=RouterConfig(**router), **(model or {}))


def _tokens(b: int = 2, s: int = 16, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (b, s), 0, 256)


def _jit(fn, model):
  """jit of fn(model, *args) over a fixed model's state: returns g(*args)."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a),
                     compiler_options=FAST_COMPILE)
  return lambda *args: compiled(state, *args)


def _forward(routing="topk"):
  return lambda m, tokens_BxS, step=None: m._forward(tokens_BxS, None, routing, step)


# ---------------------------------------------------------------------------
# The slow, obvious twin: every token runs through every recursion.
def _dense_unit(model, x_BxSxD, pos_BxS, shared=None):
  kvs = []
  for j, b in enumerate(model.plan.unit):
    x_BxSxD, _, kv, _ = model.blocks[b](x_BxSxD, pos_BxS,
                                        shared_kv=None if shared is None else shared[j])
    kvs.append(kv)
  return x_BxSxD, kvs


def _dense_reference(model, tokens_BxS, depth_BxS, given: bool = False):
  """Same routing decisions (depth per token), computed densely with masks.

  Step r runs the unit over all tokens; inactive tokens get position -1 so that
  no active token attends to them ('cache'), or every query attends over
  recursion 1's full-sequence keys ('share'); only active tokens keep updates.
  given (token-choice): the depths were given, so the gate is alpha times the
  router's score of the given depth, not of its own choice.
  """
  cfg = model.cfg
  pos_BxS = default_positions(tokens_BxS)
  x = model.embed_tokens(tokens_BxS)
  for b in model.plan.prefix:
    x = model.blocks[b](x, pos_BxS)[0]
  share = cfg.router.kv == "share"
  h1, shared = x, None
  if cfg.router.routing == "token_choice":
    tc = model.router(h1)
  for r in range(cfg.num_recursions):
    active_BxS = depth_BxS > r
    if share and r == 0:
      out, shared = _dense_unit(model, x, pos_BxS)
    else:
      out, _ = _dense_unit(model, x, jnp.where(active_BxS, pos_BxS, -1), shared)
    if cfg.router.routing == "expert_choice":
      router = model.routers[r]
      gate_BxS = router.gate(router.logit(x))
      x = jnp.where(active_BxS[..., None], x + gate_BxS[..., None] * out, x)
    else:
      x = jnp.where(active_BxS[..., None], out, x)
  if cfg.router.routing == "token_choice":
    gate_BxS = tc.gate_BxS
    if given:
      gate_BxS = cfg.router.alpha * jnp.take_along_axis(tc.scores_BxSxN, depth_BxS[..., None] - 1,
                                                        -1)[..., 0]
    x = h1 + gate_BxS[..., None] * x
  for b in model.plan.suffix:
    x = model.blocks[b](x, pos_BxS)[0]
  return model.logits(x)


@pytest.mark.parametrize("router", [pytest.param(EC, marks=pytest.mark.quick), TC],
                         ids=["expert", "token"])
@pytest.mark.parametrize("kv", ["cache", "share"])
def test_gathered_equals_dense_masked_reference(router, kv):
  """The gathered fast path equals the dense masked twin on the same decisions.

  Catches: the gate of another token (checked), token-choice overflow not dropped (an
  overflowing token still updated: checked), a selected token attending to tokens that
  left (cache), sharing not reading recursion 1's keys.
  """
  # Token-choice at capacity factor 0.8 overflows at every step, step 1 included (depth 0).
  extra = dict(capacity_factor=0.8) if router is TC else {}
  model = build_model(_cfg(num_layers=8 if kv == "share" else 5, model=SENSITIVE, kv=kv,
                           **router, **extra), 0)

  def both(m, tokens_BxS):
    logits, depth_BxS, aux = m._forward(tokens_BxS, None, "topk", None)
    return logits, depth_BxS, aux, _dense_reference(m, tokens_BxS, depth_BxS)

  logits, depth_BxS, aux, want = _jit(both, model)(_tokens())
  assert len(set(np.asarray(depth_BxS).ravel())) >= 3     # routing is not trivial
  if router is TC:
    assert float(aux["stats"]["dropped_tokens"]) > 0      # overflow is exercised too
  assert_scale(want, what="logits")
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_token_choice_with_given_depths_equals_dense_reference():
  """router.depth_from: given depths replace the router's; the gate is its score of that depth.

  Catches: the given depths ignored (the router's own differ here), the gate of the
  router's own choice instead of the given depth's.
  """
  model = build_model(_cfg(model=SENSITIVE, **TC, capacity_factor=2.0), 0)   # no overflow
  given_BxS = jax.random.randint(jax.random.key(3), (2, 16), 1, 4)

  def both(m, tokens_BxS):
    logits, depth_BxS, _ = m._forward(tokens_BxS, None, "topk", None, None, given_BxS)
    own_BxS = m.routing_decisions(tokens_BxS, routing="causal")
    return logits, depth_BxS, own_BxS, _dense_reference(m, tokens_BxS, given_BxS, given=True)

  logits, depth_BxS, own_BxS, want = _jit(both, model)(_tokens())
  np.testing.assert_array_equal(depth_BxS, given_BxS)
  assert np.mean(np.asarray(own_BxS) != np.asarray(given_BxS)) > 0.3
  assert_scale(want, what="logits")
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="token-choice"):
    build_model(_cfg(**EC), 0)._forward(_tokens(), None, "topk", None, None, given_BxS)


def test_expert_choice_capacity_exact_nested_sorted(monkeypatch):
  model = build_model(_cfg(**EC), 0)
  orig = MoRTransformer._unit_on

  def spy(self, h, x_sel, idx_BxK, valid_BxK, pos, shared, *rest):
    self.seen.append((idx_BxK, valid_BxK))  # traced: returned from the jitted function below
    return orig(self, h, x_sel, idx_BxK, valid_BxK, pos, shared, *rest)

  def run(m, tokens_BxS):
    object.__setattr__(m, "seen", [])
    depth_BxS = m.routing_decisions(tokens_BxS)
    return depth_BxS, m.seen

  monkeypatch.setattr(MoRTransformer, "_unit_on", spy)
  depth_BxS, seen = _jit(run, model)(_tokens(b=3, s=24))
  ks = R.capacities(model.cfg, 24)
  assert ks == [24, 16, 8]
  for r, (idx_BxK, valid_BxK) in enumerate(seen):
    idx_BxK = np.asarray(idx_BxK)
    assert idx_BxK.shape == (3, ks[r]) and np.asarray(valid_BxK).all()
    assert (np.diff(idx_BxK, axis=1) > 0).all()           # original order
    if r:
      for b in range(3):
        assert set(idx_BxK[b]) <= set(np.asarray(seen[r - 1][0])[b])  # hierarchical
    np.testing.assert_array_equal(np.sum(np.asarray(depth_BxS) > r, axis=1), ks[r])


def test_token_choice_overflow_is_dropped_and_counted():
  model = build_model(_cfg(balance="loss_free", **TC), 0)
  model.router.bias[...] = jnp.array([0.0, 0.0, 10.0])   # every token asks for depth 3
  _, depth_BxS, aux = _jit(_forward(), model)(_tokens(s=16))
  assert R.capacities(model.cfg, 16) == [16, 11, 6]
  # Earliest tokens win the slots: 6 reach depth 3, the next 5 depth 2, the rest stop at 1.
  want_S = np.array([3] * 6 + [2] * 5 + [1] * 5)
  np.testing.assert_array_equal(depth_BxS, np.broadcast_to(want_S, (2, 16)))
  np.testing.assert_allclose(aux["stats"]["dropped_tokens"], 10.0)
  np.testing.assert_allclose(aux["stats"]["assigned_per_depth"], [0, 0, 1])
  np.testing.assert_allclose(aux["stats"]["tokens_per_depth"], [1, 11 / 16, 6 / 16], rtol=1e-6)


@pytest.mark.parametrize("router", [EC, TC], ids=["expert", "token"])
def test_lm_loss_gradients_reach_router(router):
  model = build_model(_cfg(**router), 0)

  def grads(m, tokens_BxS):
    def lm_loss(m):  # no aux loss: the gradient must come through the gates
      logits, _, _ = m(tokens_BxS)
      return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].take(0, axis=-1))
    g = nnx.grad(lm_loss)(m)
    heads = g["routers"] if router is EC else {0: g["router"]}
    return [jnp.abs(h["head"]["w_out"][...]).max() for h in heads.values()]

  norms = _jit(grads, model)(_tokens(s=8))
  assert len(norms) == (3 if router is EC else 1)
  assert all(float(n) > 0 for n in norms), norms


def test_aux_bce_raises_sampling_accuracy():
  model = build_model(_cfg(aux_loss_coef=1.0, **EC), 0)
  tokens_BxS = _tokens(b=4)
  # Train only the routers, so the selections they are scored against hold still.
  graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("routers")), ...)

  def step(params):
    def loss(p):
      _, _, aux = nnx.merge(graphdef, p, rest)(tokens_BxS)
      return aux["losses"]["router_bce"], aux["stats"]["sampling_accuracy"]
    (_, acc), g = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, g), acc

  step = jax.jit(step, compiler_options=FAST_COMPILE)
  accs = []
  for _ in range(15):
    params, acc = step(params)
    accs.append(float(acc))
  assert accs[-1] > accs[0] + 0.1, accs


@pytest.mark.parametrize("router", [EC, TC], ids=["expert", "token"])
@pytest.mark.parametrize("kv", ["cache", "share"])
def test_causal_routing_ignores_future_tokens(router, kv):
  model = build_model(_cfg(kv=kv, model=SENSITIVE, **router), 0)
  t = 9
  a_BxS = _tokens(s=16, seed=1)
  b_BxS = a_BxS.at[:, t + 1:].set(_tokens(s=16, seed=2)[:, t + 1:])
  fwd = _jit(_forward("causal"), model)
  (logits_a, depth_a, _), (logits_b, _, _) = fwd(a_BxS), fwd(b_BxS)
  assert len(set(np.asarray(depth_a).ravel())) > 1        # decisions differ per token
  np.testing.assert_allclose(logits_a[:, :t + 1], logits_b[:, :t + 1], atol=1e-5, rtol=0)
  assert np.abs(np.asarray(logits_a[:, t + 1:] - logits_b[:, t + 1:])).max() > 1e-1


def test_loss_free_balancing_reduces_maxvio():
  model = build_model(_cfg(balance="loss_free", bias_update_rate=0.01, **TC), 0)
  tokens_BxS = _tokens(b=4, s=32)
  # Skew: push depth 1's logit up along the mean prefix-output direction.
  h_BxSxD = model.blocks[0](model.embed_tokens(tokens_BxS), default_positions(tokens_BxS))[0]
  m_D = jnp.mean(h_BxSxD, axis=(0, 1))
  w = model.router.head.w_out
  w[...] = w[...].at[:, 0].add(2.0 * m_D / jnp.sum(m_D ** 2))
  graphdef, state = nnx.split(model)

  def step(state):
    m = nnx.merge(graphdef, state)
    _, _, aux = m(tokens_BxS)
    m.post_update(aux["stats"])
    return nnx.state(m), aux["stats"]["maxvio"]

  step = jax.jit(step, compiler_options=FAST_COMPILE)
  vios = []
  for _ in range(60):
    state, vio = step(state)
    vios.append(float(vio))
  assert vios[0] > 1.0, vios[0]                           # skewed toward depth 1
  assert min(vios[-10:]) < 0.5 * vios[0], vios


@pytest.mark.parametrize("router", [EC, TC], ids=["expert", "token"])
def test_warmup_starts_full_and_ends_at_capacity(router):
  model = build_model(_cfg(warmup_steps=10, **router), 0)
  tokens_BxS = _tokens()
  fwd = _jit(lambda m, step: m.routing_decisions(tokens_BxS, step=step), model)
  np.testing.assert_array_equal(fwd(jnp.int32(0)), 3)    # full capacity / forced full depth
  steps = (5, 10) if router is EC else (10,)
  for step in steps:
    ks = R.warmup_capacities(model.cfg, 16, jnp.int32(step)) if step < 10 else (
        R.capacities(model.cfg, 16))
    depth_BxS = np.asarray(fwd(jnp.int32(step)))
    if router is EC:
      for r in range(3):
        np.testing.assert_array_equal(np.sum(depth_BxS > r, axis=1), ks[r])
    else:
      assert (depth_BxS < 3).any()                         # routed by the router again


def test_expert_choice_really_skips_compute():
  tokens_BxS = _tokens(b=1, s=128)

  def flops(cfg):
    graphdef, state = nnx.split(build_model(cfg, 0))
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0], compiler_options=FAST_COMPILE)
    return fwd.lower(state, tokens_BxS).compile().cost_analysis()["flops"]

  ratio = flops(_cfg(num_layers=8, **EC)) / flops(_cfg(num_layers=8, kind="recursive"))
  # Analytic: (2 unique + 2 x (1 + 2/3 + 1/3) shared) / 8 blocks, plus the LM head in both.
  assert 0.6 < ratio < 0.85, ratio


def test_router_options_train_and_stay_finite():
  ec = dict(EC, head="mlp", gate="tanh", causal="aux_router", z_loss_coef=1e-3,
            capacities=(1.0, 0.5, 0.25), kv="share")
  model = build_model(_cfg(model=dict(remat=True), **ec), 0)

  def loss_and_grad(m, tokens_BxS):
    def loss(m):
      logits, _, aux = m(tokens_BxS)
      return jnp.mean(logits) + sum(aux["losses"].values()), aux
    return nnx.value_and_grad(loss, has_aux=True)(m)

  (value, aux), grads = _jit(loss_and_grad, model)(_tokens())
  assert set(aux["losses"]) == {"router_bce", "router_z"}
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((value, aux, grads)))
  np.testing.assert_allclose(aux["stats"]["tokens_per_depth"], [1, 0.5, 0.25])
  assert float(jnp.abs(grads["routers"][1]["aux_head"]["w_in"][...]).max()) > 0

  tc = dict(TC, gate="sigmoid", z_loss_coef=1e-3, capacity_factor=1.25)
  model = build_model(_cfg(model=dict(dtype="bfloat16"), **tc), 0)
  _, _, aux = _jit(_forward(), model)(_tokens())
  assert set(aux["losses"]) == {"balance", "router_z"}
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(aux))
