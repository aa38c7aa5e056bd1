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

EC = dict(routing="expert_choice", gate="sigmoid")
TC = dict(routing="token_choice", gate="softmax", alpha=1.0)


def _cfg(num_layers: int = 8, kind: str = "mor", **router) -> ModelConfig:
  return ModelConfig(kind=kind, vocab_size=256, num_layers=num_layers, d_model=64, num_heads=4,
                     num_kv_heads=2, ffn_dim=128, max_seq_len=128, num_recursions=3,
                     sharing="middle_cycle", router=RouterConfig(**router))


def _tokens(b: int = 2, s: int = 16, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (b, s), 0, 256)


def _jit(model, **kw):
  """A jitted forward (logits, depth, aux) of a fixed model; kw are the routing arguments."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, tokens_BxS):
    return nnx.merge(graphdef, state)._forward(tokens_BxS, None, kw.get("routing", "topk"),
                                               kw.get("step"))
  return lambda tokens_BxS: fwd(state, tokens_BxS)


# ---------------------------------------------------------------------------
# The slow, obvious twin: every token runs through every recursion.
def _dense_unit(model, x_BxSxD, pos_BxS, shared=None):
  kvs = []
  for j, b in enumerate(model.plan.unit):
    x_BxSxD, _, kv, _ = model.blocks[b](x_BxSxD, pos_BxS,
                                        shared_kv=None if shared is None else shared[j])
    kvs.append(kv)
  return x_BxSxD, kvs


def _dense_reference(model, tokens_BxS, depth_BxS):
  """Same routing decisions (depth per token), computed densely with masks.

  Step r runs the unit over all tokens; inactive tokens get position -1 so that
  no active token attends to them ('cache'), or every query attends over
  recursion 1's full-sequence keys ('share'); only active tokens keep updates.
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
    x = h1 + tc.gate_BxS[..., None] * x
  for b in model.plan.suffix:
    x = model.blocks[b](x, pos_BxS)[0]
  return model.logits(x)


@pytest.mark.parametrize("router", [EC, TC], ids=["expert", "token"])
@pytest.mark.parametrize("kv", ["cache", "share"])
def test_gathered_equals_dense_masked_reference(router, kv):
  model = build_model(_cfg(kv=kv, **router), 0)
  tokens_BxS = _tokens()
  logits, depth_BxS, aux = _jit(model)(tokens_BxS)
  assert len(set(np.asarray(depth_BxS).ravel())) == 3     # routing is not trivial
  if router is TC:
    assert float(aux["stats"]["dropped_tokens"]) > 0      # overflow is exercised too
  want = nnx.jit(_dense_reference)(model, tokens_BxS, depth_BxS)
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_expert_choice_capacity_exact_nested_sorted(monkeypatch):
  model = build_model(_cfg(**EC), 0)
  seen = []
  orig = MoRTransformer._unit_on

  def spy(self, h, x_sel, idx_BxK, valid_BxK, pos, shared):
    seen.append((np.asarray(idx_BxK), np.asarray(valid_BxK)))
    return orig(self, h, x_sel, idx_BxK, valid_BxK, pos, shared)

  monkeypatch.setattr(MoRTransformer, "_unit_on", spy)
  depth_BxS = model.routing_decisions(_tokens(b=3, s=24))
  ks = R.capacities(model.cfg, 24)
  assert ks == [24, 16, 8]
  for r, (idx_BxK, valid_BxK) in enumerate(seen):
    assert idx_BxK.shape == (3, ks[r]) and valid_BxK.all()
    assert (np.diff(idx_BxK, axis=1) > 0).all()          # original order
    if r:
      for b in range(3):
        assert set(idx_BxK[b]) <= set(seen[r - 1][0][b])  # hierarchical
    np.testing.assert_array_equal(np.sum(np.asarray(depth_BxS) > r, axis=1), ks[r])


def test_token_choice_overflow_is_dropped_and_counted():
  model = build_model(_cfg(balance="loss_free", **TC), 0)
  model.router.bias[...] = jnp.array([0.0, 0.0, 10.0])   # every token asks for depth 3
  _, depth_BxS, aux = _jit(model)(_tokens(s=16))
  assert R.capacities(model.cfg, 16) == [16, 11, 6]
  # Earliest tokens win the slots: 6 reach depth 3, the next 5 depth 2, the rest stop at 1.
  want_S = np.array([3] * 6 + [2] * 5 + [1] * 5)
  np.testing.assert_array_equal(depth_BxS, np.broadcast_to(want_S, (2, 16)))
  np.testing.assert_allclose(aux["stats"]["dropped_tokens"], 10.0)
  np.testing.assert_allclose(aux["stats"]["assigned_per_depth"], [0, 0, 1])
  np.testing.assert_allclose(aux["stats"]["tokens_per_depth"], [1, 11 / 16, 6 / 16], rtol=1e-6)


@pytest.mark.parametrize("router", [EC, TC], ids=["expert", "token"])
def test_gradients_reach_router(router):
  model = build_model(_cfg(**router), 0)
  tokens_BxS = _tokens()

  def loss_fn(m):
    logits, _, aux = m(tokens_BxS)
    ce = -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return ce + sum(aux["losses"].values())

  grads = nnx.grad(loss_fn)(model)
  heads = ([g.head.w_out for g in grads.routers] if router is EC else [grads.router.head.w_out])
  for w in heads:
    assert float(jnp.abs(w[...]).max()) > 0


def test_aux_bce_raises_sampling_accuracy():
  model = build_model(_cfg(num_layers=5, aux_loss_coef=1.0, **EC), 0)
  tokens_BxS = _tokens(b=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params):
    def loss(p):
      _, _, aux = nnx.merge(graphdef, p, rest)(tokens_BxS)
      return aux["losses"]["router_bce"], aux["stats"]["sampling_accuracy"]
    (_, acc), g = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 1.0 * g, params, g), acc

  accs = []
  for _ in range(15):
    params, acc = step(params)
    accs.append(float(acc))
  assert accs[-1] > accs[0] + 0.1, accs


@pytest.mark.parametrize("router", [EC, TC], ids=["expert", "token"])
@pytest.mark.parametrize("kv", ["cache", "share"])
def test_causal_routing_ignores_future_tokens(router, kv):
  model = build_model(_cfg(kv=kv, **router), 0)
  fwd = _jit(model, routing="causal")
  t = 9
  a_BxS = _tokens(s=16, seed=1)
  b_BxS = a_BxS.at[:, t + 1:].set(_tokens(s=16, seed=2)[:, t + 1:])
  logits_a, depth_a, _ = fwd(a_BxS)
  logits_b, _, _ = fwd(b_BxS)
  assert len(set(np.asarray(depth_a).ravel())) > 1        # decisions differ per token
  np.testing.assert_allclose(logits_a[:, :t + 1], logits_b[:, :t + 1], atol=1e-6)
  assert np.abs(np.asarray(logits_a[:, t + 1:] - logits_b[:, t + 1:])).max() > 1e-4


def test_loss_free_balancing_reduces_maxvio():
  model = build_model(_cfg(num_layers=5, balance="loss_free", bias_update_rate=0.01, **TC), 0)
  tokens_BxS = _tokens(b=4, s=32)
  # Skew: push depth 1's logit up along the mean prefix-output direction.
  h_BxSxD = model.blocks[0](model.embed_tokens(tokens_BxS), default_positions(tokens_BxS))[0]
  m_D = jnp.mean(h_BxSxD, axis=(0, 1))
  w = model.router.head.w_out
  w[...] = w[...].at[:, 0].add(2.0 * m_D / jnp.sum(m_D ** 2))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state):
    m = nnx.merge(graphdef, state)
    _, _, aux = m(tokens_BxS)
    m.post_update(aux["stats"])
    return nnx.state(m), aux["stats"]["maxvio"]

  vios = []
  for _ in range(60):
    state, vio = step(state)
    vios.append(float(vio))
  assert vios[0] > 1.0, vios[0]                           # skewed toward depth 1
  assert min(vios[-10:]) < 0.5 * vios[0], vios


def test_warmup_starts_full_and_ends_at_capacity():
  for router in (EC, TC):
    model = build_model(_cfg(num_layers=5, warmup_steps=10, **router), 0)
    tokens_BxS = _tokens()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, step: nnx.merge(graphdef, st)._forward(tokens_BxS, None, "topk",
                                                                       step)[1])
    np.testing.assert_array_equal(fwd(state, jnp.int32(0)), 3)
    np.testing.assert_array_equal(fwd(state, jnp.int32(10)), model.routing_decisions(tokens_BxS))
    if router is EC:
      ks = R.warmup_capacities(model.cfg, 16, jnp.int32(5))
      depth_BxS = fwd(state, jnp.int32(5))
      for r in range(3):
        np.testing.assert_array_equal(np.sum(np.asarray(depth_BxS) > r, axis=1), ks[r])


def test_expert_choice_really_skips_compute():
  s = 128
  tokens_BxS = _tokens(b=1, s=s)

  def flops(cfg):
    graphdef, state = nnx.split(build_model(cfg, 0))
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
    return fwd.lower(state, tokens_BxS).compile().cost_analysis()["flops"]

  ratio = flops(_cfg(**EC)) / flops(_cfg(kind="recursive"))
  # Analytic: 2 unique + 2 x (1 + 2/3 + 1/3) shared blocks of 8, plus the LM head in both.
  assert 0.6 < ratio < 0.85, ratio
