"""Training: one step on a tiny config, the loop, FLOP budgets, NaN stops, the CLI."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mor import checkpoint, config, metrics, presets, train
from mor.data import make_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**train_kw):
  base = config.to_dict(presets.tiny_config("recursive"))
  base["model"].update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128,
                       num_layers=5, max_seq_len=32)
  base["data"].update(seq_len=32, batch_size=8)
  base["train"].update(steps=30, lr=1e-2, log_every=5, eval_every=10, eval_batches=2,
                       checkpoint_every=0, peak_flops=1e11)
  base["train"].update(train_kw)
  return config.from_dict(base)


class ArrayData:
  """A stand-in for mor.data.Data over a fixed random token stream (no corpus needed)."""

  def __init__(self, cfg, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable stream: a fixed random walk over a small alphabet
    self.seqs = rng.integers(0, 16, (64, cfg.data.seq_len + 1)).cumsum(1) % 256
    self.b, self.i = cfg.data.batch_size, 0
    self.train = self

  def __next__(self):
    rows = self.seqs[(self.i * self.b + np.arange(self.b)) % len(self.seqs)]
    self.i += 1
    return {"inputs": rows[:, :-1].astype(np.int32), "targets": rows[:, 1:].astype(np.int32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]

  def eval_batches(self, n):
    return [{"inputs": self.seqs[:self.b, :-1].astype(np.int32),
             "targets": self.seqs[:self.b, 1:].astype(np.int32)}] * n


def test_loop_lowers_loss_and_writes_metrics(tmp_path):
  cfg = tiny_cfg()
  out = train.run(cfg, str(tmp_path), data=ArrayData(cfg))
  rows = metrics.read_metrics(str(tmp_path))
  losses = [r["loss"] for r in rows if "loss" in r]
  evals = [r["eval_nll"] for r in rows if "eval_nll" in r]
  assert losses[-1] < losses[0] - 0.5
  assert len(evals) == 3 and evals[-1] < evals[0]
  assert out["step"] == 30 and out["flops_spent"] == pytest.approx(30 * out["setup"].flops_per_step)
  for key in ("step", "loss", "perplexity", "grad_norm", "lr", "tokens_per_s", "tflops_per_s",
              "mfu"):
    assert key in rows[0]


def test_flop_budget_stops_where_it_should(tmp_path):
  cfg = tiny_cfg(steps=0)
  per_step = train.num_steps(cfg)[1]
  cfg = tiny_cfg(steps=0, flop_budget=7.5 * per_step, flop_convention="training")
  out = train.run(cfg, str(tmp_path), data=ArrayData(cfg))
  assert out["step"] == 7
  assert out["flops_spent"] <= cfg.train.flop_budget < out["flops_spent"] + per_step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_cfg(steps=6, checkpoint_every=1, log_every=1, lr=1e38, clip=0.0)
  with pytest.raises(FloatingPointError, match="loss is nan"):
    train.run(cfg, str(tmp_path), data=ArrayData(cfg))
  mngr = checkpoint.manager(str(tmp_path))
  steps = mngr.all_steps()
  assert steps and max(steps) < 6


def test_grad_accumulation_equals_full_batch():
  cfg1, cfg2 = tiny_cfg(), tiny_cfg(grad_accum=2)
  b = next(ArrayData(cfg1))
  outs = []
  for cfg in (cfg1, cfg2):
    s = train.setup(cfg)
    state, m = s.train_step(train.init_state(s), train.to_global(s, b))
    outs.append((m["loss"], state["params"]))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
  for a, c in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, c, atol=2e-6)


def _optax_schedule(t, steps):
  """The schedules as optax builds them: the independent reference for train.lr_at."""
  import optax
  warm, floor = max(1, int(t.warmup_frac * steps)), t.lr * t.min_lr_ratio
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, warm, max(steps, warm + 1), floor)
  if t.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warm),
                                 optax.constant_schedule(t.lr)], [warm])
  decay = max(1, int(t.decay_frac * steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, t.lr, warm), optax.constant_schedule(t.lr),
       optax.linear_schedule(t.lr, floor, decay)], [warm, warm + max(0, steps - warm - decay)])


@pytest.mark.parametrize("kind,steps,warmup,decay", [("wsd", 40, 0.1, 0.3), ("wsd", 5, 0.5, 0.9),
                                                      ("cosine", 30, 0.2, 0.0),
                                                      ("constant", 12, 0.25, 0.0)])
def test_runtime_schedule_equals_optax(kind, steps, warmup, decay):
  t = config.TrainConfig(schedule=kind, lr=3e-3, min_lr_ratio=0.1, warmup_frac=warmup,
                         decay_frac=decay)
  ref, got = _optax_schedule(t, steps), train.lr_schedule(t, steps)
  for step in range(steps + 3):
    np.testing.assert_allclose(float(got(step)), float(ref(step)), rtol=1e-5, atol=1e-9)


def test_runs_differing_in_lr_and_steps_share_one_compile():
  import dataclasses
  names = {f.name for f in dataclasses.fields(config.TrainConfig)}
  assert set(train.STEP_FIELDS) | set(train.RUN_FIELDS) == names    # a new field must choose
  assert not set(train.STEP_FIELDS) & set(train.RUN_FIELDS)
  # step 0 has lr 0 (warm-up from 0), so step 1's Adam update is exactly proportional to lr
  cfgs = [tiny_cfg(steps=steps, lr=lr, warmup_frac=0.1, seed=seed)
          for steps, lr, seed in ((20, 1.1e-2, 0), (20, 3.3e-2, 1), (60, 1.1e-2, 0))]
  before = train._programs.cache_info().misses   # 1 if no earlier test built tiny_cfg's
  b = train.to_global(train.setup(cfgs[0]), next(ArrayData(cfgs[0])))
  deltas, lrs = [], []
  for cfg in cfgs:
    s = train.setup(cfg)
    state = train.init_state(s, seed=0)
    p0 = np.asarray(jax.tree.leaves(state["params"])[0])
    ms = []
    for _ in range(2):
      state, m = s.train_step(state, b)
      ms.append(m)
    deltas.append(np.asarray(jax.tree.leaves(state["params"])[0]) - p0)
    lrs.append([float(m["lr"]) for m in ms])
  assert train._programs.cache_info().misses - before <= 1
  # warm = 2 steps (20 steps) and 6 steps (60 steps): lr at step 1 is lr / 2 and lr / 6
  np.testing.assert_allclose(lrs, [[0, 5.5e-3], [0, 1.65e-2], [0, 1.1e-2 / 6]], rtol=1e-6)
  assert np.abs(deltas[0]).max() > 1e-4
  np.testing.assert_allclose(deltas[1], 3 * deltas[0], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(deltas[2], deltas[0] / 3, rtol=1e-4, atol=1e-7)


def test_short_run_on_default_corpus_lowers_loss(tmp_path):
  cfg = tiny_cfg(steps=40, lr=5e-3, eval_every=0)
  cfg = config.replace(cfg, data={"corpus": "default"}, model={"vocab_size": 512})
  data = make_data(cfg.data, cfg.model.vocab_size)
  out = train.run(cfg, str(tmp_path), data=data)
  losses = [r["loss"] for r in metrics.read_metrics(str(tmp_path)) if "loss" in r]
  assert losses[-1] < losses[0] - 0.5 and out["eval_nll"] < losses[0]


def test_cli_overrides_and_one_line_errors(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.train", "--config", "configs/recursive_tiny.py",
         f"--workdir={tmp_path}", "--config.model.sharing=spiral"]
  bad = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode != 0
  assert "model.sharing='spiral' is not allowed; choose one of cycle" in bad.stderr
  assert "Traceback" not in bad.stderr
