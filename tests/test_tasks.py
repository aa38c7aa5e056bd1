"""Depth tasks (mor.data.tasks): answers against independent solvers, streams, masks, the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor import config as C, train
from mor.data import make_data, tasks


def _decode_hops(inputs_S, t: C.TaskConfig):
  """(symbols, hop counts) back from the (symbol, k) input ids."""
  rel = np.asarray(inputs_S) - (t.symbols + 1)
  return rel // t.eval_max_difficulty, rel % t.eval_max_difficulty + 1


def _hops_by_scanning(x_S, k_S, none):
  """An independent solver: each hop scans backwards for the current symbol."""
  out = []
  for i in range(len(x_S)):
    p = i
    for _ in range(k_S[i]):
      j = next((j for j in range(p - 1, -1, -1) if x_S[j] == x_S[p]), None)
      if j is None:
        p = None
        break
      p = j + 1
    out.append(none if p is None else x_S[p])
  return np.array(out)


def test_hops_answers_match_a_scanning_solver():
  t = C.TaskConfig(max_difficulty=6, eval_max_difficulty=8)
  for index in range(20):
    ex = tasks.example("hops", t, 48, seed=3, stream=tasks.TRAIN, index=index)
    x, k = _decode_hops(ex["inputs"], t)
    assert np.all(x[1:] != x[:-1]) and x.min() >= 0 and x.max() < t.symbols
    np.testing.assert_array_equal(k, ex["difficulty"])
    assert set(np.unique(k)) <= set(range(1, 7))
    np.testing.assert_array_equal(ex["targets"], _hops_by_scanning(x, k, none=t.symbols))
    assert ex["mask"].all()
  # a hand-made case: x = a b a c b, k = 1 everywhere -> NONE NONE b NONE c
  np.testing.assert_array_equal(tasks.hop_answers(np.array([0, 1, 0, 2, 1]), np.ones(5, int), 9),
                                [9, 9, 1, 9, 0])
  # two hops from the last b: b -> (after b@1) a@2 -> (after a@0) b@1
  assert tasks.hop_answers(np.array([0, 1, 0, 2, 1]), np.full(5, 2), 9)[4] == 1


def _solve_assign(inputs_S, t: C.TaskConfig):
  """An independent interpreter of `a op b = v` statements: values and dependency depths."""
  var0, op0 = t.modulus, t.modulus + t.variables
  env, depth, out = {}, {}, []
  for o in range(0, len(inputs_S) - 4, 5):
    a, op, b, eq, v = (int(x) for x in inputs_S[o:o + 5])
    if a == op0 + 4:                      # padding
      break
    assert eq == op0 + 3 and var0 <= v < op0 and v not in env
    val = lambda x: (env[x], depth[x]) if x >= var0 else (x, 0)
    (va, da), (vb, db) = val(a), val(b)
    env[v] = {0: va + vb, 1: va * vb, 2: va - vb}[op - op0] % t.modulus
    depth[v] = 1 + max(da, db)
    out.append((o + 4, env[v], depth[v]))
  return out


def test_assign_answers_match_an_interpreter():
  t = C.TaskConfig(max_difficulty=4)
  seen = set()
  for index in range(30):
    ex = tasks.example("assign", t, 64, seed=1, stream=tasks.TRAIN, index=index)
    solved = _solve_assign(ex["inputs"], t)
    assert len(solved) == 64 // 5
    for pos, value, d in solved:
      assert ex["targets"][pos] == value and ex["difficulty"][pos] == d and ex["mask"][pos]
      seen.add(d)
    assert ex["mask"].sum() == len(solved)   # only answers are scored
    assert ex["difficulty"][ex["mask"] == 0].max() == 0
  assert seen == {1, 2, 3, 4}
  # min_difficulty: shallower statements still build the chains but are not scored
  ex = tasks.example("assign", C.TaskConfig(min_difficulty=2), 64, seed=1, stream=0, index=0)
  assert ex["difficulty"][ex["mask"] == 1].min() >= 2


def test_eval_difficulty_range_and_determinism():
  t = C.TaskConfig()
  a = tasks.example("hops", t, 32, 0, tasks.EVAL, 5, max_difficulty=8)
  b = tasks.example("hops", t, 32, 0, tasks.EVAL, 5, max_difficulty=8)
  c = tasks.example("hops", t, 32, 0, tasks.TRAIN, 5, max_difficulty=8)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["inputs"], c["inputs"])   # held-out stream differs
  assert a["difficulty"].max() > t.max_difficulty


def test_stream_resumes_exactly_and_shards_processes():
  cfg = C.DataConfig(corpus="task:hops", seq_len=16, batch_size=4)
  d = make_data(cfg, 64)
  assert d.tokenizer is None and d.corpus == "task:hops"
  first = [next(d.train) for _ in range(3)]
  assert set(first[0]) == {"inputs", "targets", "mask", "difficulty"}
  assert first[0]["inputs"].shape == (4, 16) and first[0]["inputs"].dtype == np.int32
  state = d.train.get_state()
  want = next(d.train)
  again = make_data(cfg, 64)
  again.train.set_state(state)
  got = next(again.train)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  # two processes: disjoint examples, each half of the global batch
  p0 = next(make_data(cfg, 64, 0, 2).train)["inputs"]
  p1 = next(make_data(cfg, 64, 1, 2).train)["inputs"]
  assert p0.shape == (2, 16)
  np.testing.assert_array_equal(np.stack([p0[0], p1[0], p0[1], p1[1]]), first[0]["inputs"])
  # held-out batches: the same for every training seed, rows split across processes
  other = make_data(C.DataConfig(corpus="task:hops", seq_len=16, batch_size=4, seed=7), 64)
  np.testing.assert_array_equal(other.eval_batches(1)[0]["inputs"], d.eval_batches(1)[0]["inputs"])
  e0 = make_data(cfg, 64, 0, 2).eval_batches(1)[0]["inputs"]
  np.testing.assert_array_equal(e0, d.eval_batches(1)[0]["inputs"][0::2])


@pytest.mark.parametrize("changes, field", [
    ({"data": {"corpus": "task:nope"}}, "data.corpus"),
    ({"data": {"task": {"max_difficulty": 9}}}, "max_difficulty"),
    ({"model": {"vocab_size": 16}}, "model.vocab_size"),
    ({"data": {"corpus": "task:assign", "task": {"variables": 4}}}, "data.task.variables"),
])
def test_bad_task_config_is_one_line_error(changes, field):
  base = C.Config(model=C.ModelConfig(vocab_size=64, max_seq_len=64),
                  data=C.DataConfig(corpus="task:hops", seq_len=64))
  C.validate(base)
  with pytest.raises(C.ConfigError) as e:
    C.replace(base, **changes)
  assert field in str(e.value) and "\n" not in str(e.value)


def test_masked_loss_equals_dense_masked_mean():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 24, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 16, (2, 24)), jnp.int32)
  m = jnp.asarray(rng.random((2, 24)) < 0.3, jnp.int32)
  ref = lambda h, w: ((jax.nn.logsumexp(h @ w, -1) - jnp.take_along_axis(
      h @ w, t[..., None], -1)[..., 0]) * m).sum() / m.sum()
  got = lambda h, w: train.lm_head_cross_entropy(h, w, t, chunk_tokens=16, mask_BxS=m)
  np.testing.assert_allclose(got(h, w), ref(h, w), rtol=1e-5)
  grads = lambda f: jax.jit(jax.grad(f, (0, 1)))(h, w)
  for g, r in zip(grads(got), grads(ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  unmasked = train.lm_head_cross_entropy(h, w, t, chunk_tokens=16)
  assert abs(float(unmasked) - float(got(h, w))) > 1e-3   # the mask really changes the loss


def test_train_step_scores_only_masked_positions():
  """The step's loss on a task batch is the masked mean: corrupting unscored targets is a no-op."""
  cfg = C.Config(model=C.ModelConfig(kind="vanilla", vocab_size=32, num_layers=1, d_model=32,
                                     num_heads=2, num_kv_heads=2, ffn_dim=64, max_seq_len=20),
                 data=C.DataConfig(corpus="task:assign", seq_len=20, batch_size=8,
                                   task=C.TaskConfig(variables=4)),
                 train=C.TrainConfig(steps=2))
  cfg = C.validate(cfg)
  s = train.setup(cfg)
  batch = next(make_data(cfg.data, 32).train)
  noisy = dict(batch, targets=np.where(batch["mask"] == 1, batch["targets"], 5))
  state = train.init_state(s)
  losses = [float(s.eval_step(state, train.to_global(s, b))["eval_nll"]) for b in (batch, noisy)]
  assert losses[0] == pytest.approx(losses[1], rel=1e-6)
  unmasked = dict(noisy, mask=np.ones_like(batch["mask"]))
  assert float(s.eval_step(state, train.to_global(s, unmasked))["eval_nll"]) != pytest.approx(
      losses[0], rel=1e-3)
