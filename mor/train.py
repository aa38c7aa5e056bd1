"""Training: sharded init, a pure jitted train step, evaluation and the loop.

The step is a pure function `(state, batch) -> (state, metrics)` over the
`nnx.split` state, jitted with explicit in/out shardings and donated buffers
(this is what pjit became). Side effects (data, metrics, checkpoints) live in
`run`, the loop.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mor import config as config_lib, flops, sharding
from mor.config import Config, TrainConfig
from mor.models import build_model


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run: config, mesh, graph definition, jitted steps."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  state_shardings: Any
  batch_sharding: Any
  init: Callable
  train_step: Callable
  eval_step: Callable
  steps: int
  flops_per_step: float


def lr_schedule(t: TrainConfig, steps: int) -> optax.Schedule:
  """Warmup-stable-decay (linear warm-up, flat, linear cool-down), cosine or constant."""
  warm = max(1, int(t.warmup_frac * steps))
  floor = t.lr * t.min_lr_ratio
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, warm, max(steps, warm + 1), floor)
  if t.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warm),
                                 optax.constant_schedule(t.lr)], [warm])
  decay = max(1, int(t.decay_frac * steps))
  stable = max(0, steps - warm - decay)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, t.lr, warm), optax.constant_schedule(t.lr),
       optax.linear_schedule(t.lr, floor, decay)], [warm, warm + stable])


def make_optimizer(t: TrainConfig, steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; norms and biases (1-D) are not decayed."""
  mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(t.clip) if t.clip > 0 else optax.identity(),
      optax.adamw(lr_schedule(t, steps), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=mask))


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
  """Mean token negative log-likelihood, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxSxV.astype(jnp.float32), targets_BxS).mean()


def total_loss(nll: jax.Array, aux: dict) -> jax.Array:
  """The one place auxiliary losses join the language-model loss (already weighted)."""
  return nll + sum(aux.get("losses", {}).values(), jnp.float32(0))


def _forward(graphdef, params, rest, batch, step, routing: str = "topk"):
  # copy: modules that advance their own RNG counters (noisy MoE gates) mutate `rest`
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits, _, aux = model(batch["inputs"], step=step, routing=routing)
  nll = cross_entropy(logits, batch["targets"])
  return total_loss(nll, aux), (nll, aux, nnx.state(model, nnx.Not(nnx.Param)))


def _scalar_metrics(aux: dict) -> dict:
  out = {f"aux_loss/{k}": v for k, v in aux.get("losses", {}).items()}
  out.update({f"stats/{k}": v for k, v in aux.get("stats", {}).items()})
  return out


def make_train_step(graphdef, tx, grad_accum: int, schedule) -> Callable:
  """Builds the pure train step; micro-batches are scanned when grad_accum > 1."""
  grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)

  def step_fn(state, batch):
    params, rest, step = state["params"], state["rest"], state["step"]
    if grad_accum == 1:
      (loss, (nll, aux, rest)), grads = grad_fn(graphdef, params, rest, batch, step)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def body(carry, mb):
        g_acc, r = carry
        (l, (n, a, r)), g = grad_fn(graphdef, params, r, mb, step)
        return (jax.tree.map(jnp.add, g_acc, g), r), (l, n, a)

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, rest), (loss, nll, aux) = jax.lax.scan(body, (zeros, rest), micro)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      loss, nll, aux = jax.tree.map(lambda x: x.mean(0), (loss, nll, aux))
    updates, opt = tx.update(grads, state["opt"], params)
    params = optax.apply_updates(params, updates)
    model = nnx.merge(graphdef, params, rest, copy=True)
    if hasattr(model, "post_update"):   # e.g. loss-free balancing biases
      model.post_update(aux.get("stats", {}))
    rest = nnx.state(model, nnx.Not(nnx.Param))
    metrics = {"loss": loss, "nll": nll, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(step), **_scalar_metrics(aux)}
    new_state = {"params": params, "opt": opt, "rest": rest, "step": step + 1}
    return new_state, metrics

  return step_fn


def make_eval_step(graphdef) -> Callable:
  """Held-out NLL with the inference-time (causal) routing and with the training routing.

  For MoR, `eval_nll` routes each token causally, as decoding does, and
  `eval_nll_topk` is the reference code's evaluation (top-k over the whole
  sequence); for dense models the two are equal.
  """
  def eval_fn(state, batch):
    args = (graphdef, state["params"], state["rest"], batch, state["step"])
    _, (nll, aux, _) = _forward(*args, routing="causal")
    _, (nll_topk, aux_topk, _) = _forward(*args, routing="topk")
    return {"eval_nll": nll, "eval_nll_topk": nll_topk, **_scalar_metrics(aux_topk)}
  return eval_fn


def num_steps(cfg: Config) -> tuple[int, float]:
  """Steps to run and training FLOPs per step; a FLOP budget caps the step count.

  The budget counts FLOPs in cfg.train.flop_convention (default "paper": forward
  FLOPs, as the paper's budgets do; see mor.flops).
  """
  per_step = flops.train_flops_per_step(cfg.model, cfg.data.seq_len, cfg.data.batch_size)
  steps = cfg.train.steps
  if cfg.train.flop_budget > 0:
    budget_per_step = flops.budget_flops_per_step(cfg.model, cfg.data.seq_len,
                                                  cfg.data.batch_size, cfg.train.flop_convention)
    budget_steps = int(cfg.train.flop_budget // budget_per_step)
    steps = min(steps, budget_steps) if steps else budget_steps
  return steps, per_step


def setup(cfg: Config, mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Builds the mesh, shardings and jitted init/train/eval functions for cfg.

  Cached per (config, mesh), so resuming or sweeping in one process reuses the
  compiled steps.
  """
  return _setup(cfg, mesh if mesh is not None else sharding.make_mesh(cfg.mesh))


@functools.lru_cache(maxsize=16)
def _setup(cfg: Config, mesh: jax.sharding.Mesh) -> Setup:
  steps, per_step = num_steps(cfg)
  tx = make_optimizer(cfg.train, max(steps, 1))
  abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  abstract_model.eval()   # deterministic modules (MoE noise, eval capacity) for evaluation
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

  def init_fn(key):
    model = build_model(cfg.model, nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": params, "opt": tx.init(params), "rest": rest,
            "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  init = jax.jit(init_fn, out_shardings=shardings)
  step_fn = make_train_step(graphdef, tx, cfg.train.grad_accum,
                            lr_schedule(cfg.train, max(steps, 1)))
  train_step = jax.jit(sharding.under_mesh(step_fn, mesh),
                       in_shardings=(shardings, batch_sh),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  eval_step = jax.jit(sharding.under_mesh(make_eval_step(eval_graphdef), mesh),
                      in_shardings=(shardings, batch_sh),
                      out_shardings=sharding.replicated(mesh))
  return Setup(cfg, mesh, graphdef, tx, shardings, batch_sh, init, train_step, eval_step, steps,
               per_step)


def init_state(s: Setup, seed: int | None = None):
  seed = s.cfg.train.seed if seed is None else seed
  return s.init(jax.random.key(seed))


def to_global(s: Setup, local_batch: dict) -> dict:
  """Assembles each process's slice of the batch into one global sharded array."""
  return {k: jax.make_array_from_process_local_data(s.batch_sharding, v)
          for k, v in local_batch.items()}


def model_from_state(s: Setup, state) -> nnx.Module:
  """The NNX model for analysis (notebooks, decoding) from a train state."""
  return nnx.merge(s.graphdef, state["params"], state["rest"])


def check_finite(metrics: dict, step: int) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"loss is {loss} at step {step}: stopping; the last good "
                             "checkpoint is kept")


class _Preempted:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

  def __init__(self):
    self.flag = False
    try:
      self.old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      self.old = None

  def _handle(self, *_):
    self.flag = True

  def restore(self):
    if self.old is not None:
      signal.signal(signal.SIGTERM, self.old)


def evaluate(s: Setup, state, batches: list[dict]) -> dict:
  """Mean held-out metrics over fixed batches."""
  rows = [s.eval_step(state, to_global(s, b)) for b in batches]
  return {k: float(np.mean([float(jnp.mean(r[k])) for r in rows])) for k in rows[0]
          if np.ndim(rows[0][k]) == 0}


def run(cfg: Config, workdir: str, data=None) -> dict:
  """Trains cfg in workdir, resuming from its newest checkpoint; returns a summary.

  `data` defaults to `mor.data.make_data(cfg.data, ...)` for this process.
  """
  from mor import checkpoint, data as data_lib, metrics as metrics_lib, uptrain
  os.makedirs(workdir, exist_ok=True)
  cfg_dict = config_lib.to_dict(cfg)
  if data is None:
    data = data_lib.make_data(cfg.data, cfg.model.vocab_size, jax.process_index(),
                              jax.process_count())
  s = setup(cfg)
  mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
  shapes = jax.eval_shape(s.init, jax.random.key(0))
  restored = checkpoint.restore_latest(mngr, shapes, s.state_shardings, cfg_dict)
  if restored is None:
    state = uptrain.maybe_init_from_source(cfg, init_state(s), s)
  else:
    state, meta = restored
    data.train.set_state(meta["data"])
  start = int(state["step"])
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg_dict, f, indent=1)
  writer = metrics_lib.MetricsWriter(workdir)
  progress = metrics_lib.Progress(s.steps, start)
  peak = cfg.train.peak_flops or metrics_lib.peak_flops_per_device()
  eval_batches = data.eval_batches(cfg.train.eval_batches)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  t, preempt, last = cfg.train, _Preempted(), {}
  tic, tic_step = time.perf_counter(), start
  try:
    for step in range(start, s.steps):
      state, m = s.train_step(state, to_global(s, next(data.train)))
      done = step + 1
      if done % t.log_every == 0 or done == s.steps:
        check_finite(m, done)
        dt = (time.perf_counter() - tic) / (done - tic_step)
        tic, tic_step = time.perf_counter(), done
        last = {k: metrics_lib._to_python(v) for k, v in m.items()}
        last.update(perplexity=math.exp(min(last["nll"], 50)), step_time_s=dt,
                    tokens_per_s=tokens_per_step / dt,
                    tflops_per_s=s.flops_per_step / dt / 1e12,
                    mfu=s.flops_per_step / dt / (peak * jax.device_count()),
                    flops_spent=s.flops_per_step * done, tokens_seen=tokens_per_step * done)
        writer.write(done, last)
        progress.log(done, {k: last[k] for k in ("loss", "tokens_per_s", "mfu")})
      if t.eval_every and done % t.eval_every == 0 and done != s.steps:
        writer.write(done, evaluate(s, state, eval_batches))
      if (t.checkpoint_every and done % t.checkpoint_every == 0) or preempt.flag:
        check_finite(m, done)
        checkpoint.save(mngr, done, state, data.train.get_state(), cfg_dict)
      if preempt.flag:
        mngr.wait_until_finished()
        print(f"SIGTERM: saved step {done} and stopped", file=sys.stderr)
        return {"step": done, "preempted": True}
    final = int(state["step"])
    ev = evaluate(s, state, eval_batches) if eval_batches else {}
    writer.write(final, ev)
    if mngr.latest_step() != final:
      checkpoint.save(mngr, final, state, data.train.get_state(), cfg_dict)
    mngr.wait_until_finished()
  finally:
    preempt.restore()
    mngr.close()
  return {"step": final, "flops_spent": s.flops_per_step * final,
          "tokens_seen": tokens_per_step * final, **last, **ev,
          "state": state, "setup": s}
