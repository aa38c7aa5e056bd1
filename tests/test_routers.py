"""Depth routers: static capacities, selection helpers, losses, loss-free balancing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mor import routers as R
from mor.config import ModelConfig, RouterConfig

pytestmark = pytest.mark.quick   # pure functions on tiny arrays


def _cfg(**router) -> ModelConfig:
  return ModelConfig(kind="mor", num_layers=5, d_model=32, num_heads=4, num_kv_heads=2,
                     ffn_dim=64, vocab_size=64, num_recursions=3, router=RouterConfig(**router))


def test_expert_choice_capacities():
  assert R.capacities(_cfg(), 16) == [16, 10, 5]
  assert R.capacities(_cfg(), 3) == [3, 2, 1]        # floor(2/3 * 3) is 2, not 1
  assert R.capacities(_cfg(), 1) == [1, 1, 1]        # at least one token per step
  assert R.capacities(_cfg(capacities=(1.0, 0.5, 0.25)), 16) == [16, 8, 4]


def test_token_choice_capacities():
  tc = dict(routing="token_choice", gate="softmax")
  assert R.capacities(_cfg(**tc), 16) == [16, 11, 6]
  assert R.capacities(_cfg(capacity_factor=1.5, **tc), 16) == [16, 16, 8]
  assert R.capacities(_cfg(capacity_factor=0.5, **tc), 12) == [6, 4, 2]


def test_warmup_capacities_cosine_from_full():
  cfg = _cfg(warmup_steps=100)
  np.testing.assert_array_equal(R.warmup_capacities(cfg, 16, jnp.int32(0)), [16, 16, 16])
  np.testing.assert_array_equal(R.warmup_capacities(cfg, 16, jnp.int32(100)),
                                R.capacities(cfg, 16))
  mid = np.asarray(R.warmup_capacities(cfg, 16, jnp.int32(50)))
  assert mid[0] == 16 and 10 < mid[1] < 16 and 5 < mid[2] < 16


def test_expert_choice_select_top_k_in_original_order():
  """Catches selected tokens left in score order instead of causal order (checked)."""
  logit_BxC = jax.random.normal(jax.random.key(0), (3, 12))
  j_BxK, keep_BxK = R.expert_choice_select(logit_BxC, jnp.ones((3, 12), bool), 5)
  assert keep_BxK.all()
  assert (np.diff(np.asarray(j_BxK), axis=1) > 0).all()
  for b in range(3):
    np.testing.assert_array_equal(np.sort(np.argsort(-logit_BxC[b])[:5]), j_BxK[b])


def test_expert_choice_select_masks_invalid_and_warmup_slots():
  logit_BxC = jnp.arange(8.0)[None]             # the highest candidates are invalid
  valid_BxC = jnp.arange(8)[None] < 5
  j_BxK, keep_BxK = R.expert_choice_select(logit_BxC, valid_BxC, 4, k_eff=jnp.int32(2))
  np.testing.assert_array_equal(keep_BxK[0], [True, True, False, False])
  np.testing.assert_array_equal(j_BxK[0, :2], [3, 4])   # best two valid, in order
  _, keep_BxK = R.expert_choice_select(logit_BxC, valid_BxC, 7)
  assert int(keep_BxK.sum()) == 5                       # never more than the valid ones


def test_token_choice_slots_first_come_in_order():
  eligible_BxS = jnp.array([[0, 1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0, 1]], bool)
  idx_BxK, valid_BxK = R.token_choice_slots(eligible_BxS, 3)
  np.testing.assert_array_equal(idx_BxK[0], [1, 2, 4])
  np.testing.assert_array_equal(valid_BxK[0], [True, True, True])
  np.testing.assert_array_equal(idx_BxK[1, :2], [0, 6])
  np.testing.assert_array_equal(valid_BxK[1], [True, True, False])


def test_bce_matches_optax_and_stats_helpers():
  logit = jnp.linspace(-30, 30, 13)
  target = (jnp.arange(13) % 2).astype(jnp.float32)
  np.testing.assert_allclose(R.bce_with_logits(logit, target),
                             optax.sigmoid_binary_cross_entropy(logit, target), atol=1e-6)
  counts = R.histogram_counts(jnp.array([0.0, 0.05, 0.5, 1.0]), jnp.array([1, 1, 1, 0], bool))
  np.testing.assert_array_equal(counts, [2, 0, 0, 0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_allclose(R.maxvio(jnp.array([0.5, 0.25, 0.25])), 0.5, rtol=1e-6)


def test_aux_bce_step_pushes_scores_toward_selection():
  cfg = _cfg()
  router = R.ExpertChoiceRouter(cfg, nnx.Rngs(0))
  h_BxSxD = jax.random.normal(jax.random.key(1), (4, 16, cfg.d_model))
  # Selection from a different scorer, so the router starts out disagreeing with it.
  other_BxS = jax.random.normal(jax.random.key(2), (4, 16))
  j_BxK, _ = R.expert_choice_select(other_BxS, jnp.ones((4, 16), bool), 5)
  target_BxS = jnp.zeros((4, 16)).at[jnp.arange(4)[:, None], j_BxK].set(1.0)

  def margin(r):
    logit = r.logit(h_BxSxD)
    return (jnp.sum(logit * target_BxS) / jnp.sum(target_BxS)
            - jnp.sum(logit * (1 - target_BxS)) / jnp.sum(1 - target_BxS))

  loss_fn = lambda r: cfg.router.aux_loss_coef * jnp.mean(
      R.bce_with_logits(r.logit(h_BxSxD), target_BxS))
  @nnx.jit
  def sgd_step(r):
    before = margin(r)
    grads = nnx.grad(loss_fn)(r)
    nnx.update(r, jax.tree.map(lambda p, g: p - 50.0 * g, nnx.state(r, nnx.Param), grads))
    return before, margin(r)

  before, after = sgd_step(router)
  assert float(after) > float(before) + 1e-3


def test_loss_free_update_moves_bias_against_load():
  bias = R.loss_free_update(jnp.zeros(3), jnp.array([0.6, 0.3, 0.1]), 0.01)
  np.testing.assert_allclose(bias, [-0.01, 0.01, 0.01])
  cfg = _cfg(routing="token_choice", gate="softmax", balance="loss_free",
             bias_update_rate=0.1)
  router = R.TokenChoiceRouter(cfg, nnx.Rngs(0))
  router.post_update(jnp.array([0.8, 0.1, 0.1]))
  np.testing.assert_allclose(router.bias[...], [-0.1, 0.1, 0.1])
  assert "bias" not in nnx.state(router, nnx.Param)  # an optimizer over Params never sees it
  assert "bias" in nnx.state(router, R.BalanceBias)


def test_token_choice_bias_steers_selection_not_gate():
  cfg = _cfg(routing="token_choice", gate="softmax", balance="loss_free", alpha=1.0)
  router = R.TokenChoiceRouter(cfg, nnx.Rngs(0))
  h_BxSxD = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
  plain = router(h_BxSxD)
  router.bias[...] = jnp.array([0.0, 0.0, 1.0])
  biased = router(h_BxSxD)
  assert (biased.depth_BxS == 3).all()
  np.testing.assert_allclose(biased.gate_BxS, plain.scores_BxSxN[..., 2], rtol=1e-6)
