"""Training: sharded init, a pure jitted train step, evaluation and the loop.

The step is a pure function `(state, batch) -> (state, metrics)` over the
`nnx.split` state, jitted with explicit in/out shardings and donated buffers
(this is what pjit became); the learning-rate schedule's numbers are a runtime
argument bound per run, so runs that differ in steps or lr share one compile. Side effects (data, metrics, checkpoints) live in
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

from mor import checkpoint, config as config_lib, flops, routers, sharding, uptrain
from mor import data as data_lib, metrics as metrics_lib
from mor.config import Config, TrainConfig
from mor.models import build_model


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A jitted `(state, batch, schedule_args)` program with one run's schedule bound.

  Called, lowered or traced as `(state, batch)`; `program` and `schedule` are the
  parts, for `jax.export` (which takes the jitted function itself).
  """
  program: Any
  schedule: dict

  def __call__(self, state, batch):
    return self.program(state, batch, self.schedule)

  def lower(self, state, batch):
    return self.program.lower(state, batch, self.schedule)

  def trace(self, state, batch):
    return self.program.trace(state, batch, self.schedule)


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
  train_step: BoundStep
  eval_step: Callable
  steps: int
  flops_per_step: float


# TrainConfig fields the compiled step depends on; every other field (steps, lr and the
# schedule's shape, seeds, logging, budgets) reaches it as a runtime argument or not at
# all, so runs that differ only there share one compile (sweeps, seeds, resumes, tests).
STEP_FIELDS = ("schedule", "b1", "b2", "weight_decay", "clip", "grad_accum")
RUN_FIELDS = ("steps", "flop_budget", "flop_convention", "lr", "min_lr_ratio", "warmup_frac",
              "decay_frac", "seed", "log_every", "eval_every", "eval_batches",
              "checkpoint_every", "keep_checkpoints", "peak_flops", "tensorboard", "wandb")


def schedule_args(t: TrainConfig, steps: int) -> dict:
  """The learning-rate schedule's numbers for a run of `steps` steps (runtime step inputs)."""
  steps = max(steps, 1)
  warm = max(1, int(t.warmup_frac * steps))
  decay = max(1, int(t.decay_frac * steps))
  return {"lr": np.float32(t.lr), "floor": np.float32(t.lr * t.min_lr_ratio),
          "warm": np.int32(warm), "total": np.int32(max(steps, warm + 1)),
          "decay": np.int32(decay), "decay_start": np.int32(warm + max(0, steps - warm - decay))}


def lr_at(step: jax.Array, a: dict, kind: str) -> jax.Array:
  """Learning rate at `step`: linear warm-up from 0 over a["warm"] steps, then

  wsd: flat, then linear to a["floor"] over the last a["decay"] steps;
  cosine: cosine to a["floor"] at a["total"]; constant: flat.
  """
  step = jnp.asarray(step, jnp.float32)
  lr, floor = a["lr"], a["floor"]
  warm = jnp.asarray(a["warm"], jnp.float32)
  up = lr * jnp.minimum(step / warm, 1.0)
  if kind == "constant":
    after = lr
  elif kind == "cosine":
    frac = jnp.clip((step - warm) / (a["total"] - warm), 0.0, 1.0)
    after = floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  else:
    frac = jnp.clip((step - a["decay_start"]) / a["decay"], 0.0, 1.0)
    after = lr + (floor - lr) * frac
  return jnp.where(step < warm, up, after)


def lr_schedule(t: TrainConfig, steps: int) -> optax.Schedule:
  """Warmup-stable-decay (linear warm-up, flat, linear cool-down), cosine or constant."""
  a = schedule_args(t, steps)
  return lambda step: lr_at(step, a, t.schedule)


def make_optimizer(t: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; norms and biases (1-D) are not decayed."""
  mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(t.clip) if t.clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask))


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
  """Mean token negative log-likelihood, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxSxV.astype(jnp.float32), targets_BxS).mean()


def lm_head_cross_entropy(h_BxSxD: jax.Array, w_DxV: jax.Array, targets_BxS: jax.Array,
                          chunk_tokens: int = 1024, mask_BxS: jax.Array | None = None
                          ) -> jax.Array:
  """cross_entropy(h @ w, targets) without materialising all [B*S, V] logits.

  mask_BxS (optional, 1 = scored): the mean runs over the masked positions only
  (depth tasks score answers, not every token).

  A scan over sequence chunks (about `chunk_tokens` tokens of the batch each;
  the batch axis stays whole, so data-parallel sharding is untouched) computes
  each chunk's f32 logits, its log-sum-exp and, under differentiation, the
  gradients of h and w at once (softmax minus one-hot): the logits never leave
  the chunk and no pass re-reads them; three matmuls per chunk, as the plain
  version does. 1024 tokens was fastest at V = 8192 on the 2-core CPU (docs/notes/train_step.md).
  """
  b, s, d = h_BxSxD.shape
  c = max(1, min(s, chunk_tokens // b))
  pad = -s % c
  tgt_BxS = targets_BxS.astype(jnp.int32)
  weight_BxS = (jnp.ones((b, s), jnp.float32) if mask_BxS is None
                else mask_BxS.astype(jnp.float32))
  count = b * s if mask_BxS is None else jnp.maximum(weight_BxS.sum(), 1.0)
  if pad:
    h_BxSxD = jnp.pad(h_BxSxD, ((0, 0), (0, pad), (0, 0)))
    tgt_BxS, weight_BxS = jnp.pad(tgt_BxS, ((0, 0), (0, pad))), jnp.pad(weight_BxS,
                                                                      ((0, 0), (0, pad)))
  return _chunked_ce(h_BxSxD, w_DxV.astype(h_BxSxD.dtype), tgt_BxS, weight_BxS, c) / count


def _ce_scan(h_BxSxD, w_DxV, tgt_BxS, weight_BxS, c: int, grads: bool):
  """Sum of weighted NLL; with grads also its gradients d/dh [B, S, D] and d/dw [D, V]."""
  b, s, d = h_BxSxD.shape
  v, dt, nc = w_DxV.shape[1], h_BxSxD.dtype, s // c
  chunks = lambda x: jnp.moveaxis(x.reshape(b, nc, c, *x.shape[2:]), 1, 0)
  xs = (chunks(h_BxSxD), chunks(tgt_BxS), chunks(weight_BxS))

  def body(carry, x):
    nll, dw_DxV = carry
    h_CxD, t_C, wt_C = (y.reshape(b * c, *y.shape[2:]) for y in x)
    logits_CxV = jnp.dot(h_CxD, w_DxV, preferred_element_type=jnp.float32)
    m_Cx1 = jnp.max(logits_CxV, axis=-1, keepdims=True)
    e_CxV = jnp.exp(logits_CxV - m_Cx1)
    sum_Cx1 = jnp.sum(e_CxV, axis=-1, keepdims=True)
    tl_C = jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]
    nll = nll + jnp.sum(wt_C * (m_Cx1[:, 0] + jnp.log(sum_Cx1[:, 0]) - tl_C))
    if not grads:
      return (nll, dw_DxV), None
    onehot_CxV = jnp.arange(v, dtype=jnp.int32)[None] == t_C[:, None]
    g_CxV = ((e_CxV / sum_Cx1 - onehot_CxV) * wt_C[:, None]).astype(dt)
    dh_CxD = jnp.dot(g_CxV, w_DxV.T, preferred_element_type=jnp.float32).astype(dt)
    dw_DxV = dw_DxV + jnp.dot(h_CxD.T, g_CxV, preferred_element_type=jnp.float32)
    return (nll, dw_DxV), dh_CxD.reshape(b, c, d)

  dw0 = jnp.zeros((d, v), jnp.float32) if grads else jnp.zeros((), jnp.float32)
  (nll, dw_DxV), dh = jax.lax.scan(body, (jnp.float32(0), dw0), xs)
  dh_BxSxD = None if dh is None else jnp.moveaxis(dh, 0, 1).reshape(b, s, d)
  return nll, dh_BxSxD, dw_DxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(h_BxSxD, w_DxV, tgt_BxS, weight_BxS, c):
  return _ce_scan(h_BxSxD, w_DxV, tgt_BxS, weight_BxS, c, grads=False)[0]


def _chunked_ce_fwd(h_BxSxD, w_DxV, tgt_BxS, weight_BxS, c):
  nll, dh_BxSxD, dw_DxV = _ce_scan(h_BxSxD, w_DxV, tgt_BxS, weight_BxS, c, grads=True)
  return nll, (dh_BxSxD, dw_DxV.astype(w_DxV.dtype), tgt_BxS, weight_BxS)


def _chunked_ce_bwd(c, res, g):
  del c
  dh_BxSxD, dw_DxV, tgt_BxS, weight_BxS = res
  return ((g * dh_BxSxD).astype(dh_BxSxD.dtype), (g * dw_DxV).astype(dw_DxV.dtype),
          np.zeros(tgt_BxS.shape, jax.dtypes.float0), jnp.zeros_like(weight_BxS))


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def total_loss(nll: jax.Array, aux: dict) -> jax.Array:
  """The one place auxiliary losses join the language-model loss (already weighted)."""
  return nll + sum(aux.get("losses", {}).values(), jnp.float32(0))


def _forward(graphdef, params, rest, batch, step, routing: str = "topk"):
  # copy: modules that advance their own RNG counters (noisy MoE gates) mutate `rest`
  model = nnx.merge(graphdef, params, rest, copy=True)
  # the head and the loss run chunked (lm_head_cross_entropy): all logits never exist
  kw = {}
  if model.cfg.router.depth_from != "router":   # a depth task's oracle depths (MoR, TC)
    kw["depth_BxS"] = routers.data_depth(model.cfg, batch["difficulty"])
  h, _, aux = model(batch["inputs"], step=step, routing=routing, head=False, **kw)
  nll = lm_head_cross_entropy(h, model.head_weight(), batch["targets"],
                              mask_BxS=batch.get("mask"))
  return total_loss(nll, aux), (nll, aux, nnx.state(model, nnx.Not(nnx.Param)))


def _scalar_metrics(aux: dict) -> dict:
  out = {f"aux_loss/{k}": v for k, v in aux.get("losses", {}).items()}
  out.update({f"stats/{k}": v for k, v in aux.get("stats", {}).items()})
  return out


def make_train_step(graphdef, t: TrainConfig) -> Callable:
  """The pure step `(state, batch, schedule_args) -> (state, metrics)`.

  Micro-batches are scanned when t.grad_accum > 1. The optimizer is built inside
  the step from the runtime schedule numbers (`schedule_args`); its state has the
  same structure as the one `make_optimizer(t, lr_schedule(t, steps))` initialises.
  """
  grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)
  grad_accum = t.grad_accum

  def step_fn(state, batch, sched):
    schedule = lambda count: lr_at(count, sched, t.schedule)
    tx = make_optimizer(t, schedule)
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

  The jitted programs are cached per (model, STEP_FIELDS, mesh): resuming, seeds
  and sweeps over steps, learning rates or budgets in one process reuse one compile.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
  steps, per_step = num_steps(cfg)
  p = _programs(cfg.model, tuple((f, getattr(cfg.train, f)) for f in STEP_FIELDS), mesh)
  sched = jax.device_put(schedule_args(cfg.train, steps), sharding.replicated(mesh))
  train_step = BoundStep(p["train_step"], sched)
  return Setup(cfg, mesh, p["graphdef"], make_optimizer(cfg.train, lr_schedule(cfg.train, steps)),
               p["shardings"], p["batch_sharding"], p["init"], train_step, p["eval_step"], steps,
               per_step)


@functools.lru_cache(maxsize=16)
def _programs(model_cfg, step_fields, mesh: jax.sharding.Mesh) -> dict:
  """The jitted init, train and eval programs, shared by configs that differ only in RUN_FIELDS."""
  t = TrainConfig(**dict(step_fields))
  # optax builds the state structure without calling the schedule: any schedule will do
  tx = make_optimizer(t, optax.constant_schedule(0.0))
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
  abstract_model.eval()   # deterministic modules (MoE noise, eval capacity) for evaluation
  eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

  def init_fn(key):
    model = build_model(model_cfg, nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": params, "opt": tx.init(params), "rest": rest,
            "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  init = jax.jit(init_fn, out_shardings=shardings)
  rep = sharding.replicated(mesh)
  train_step = jax.jit(sharding.under_mesh(make_train_step(graphdef, t), mesh),
                       in_shardings=(shardings, batch_sh, rep),
                       out_shardings=(shardings, rep), donate_argnums=0)
  eval_step = jax.jit(sharding.under_mesh(make_eval_step(eval_graphdef), mesh),
                      in_shardings=(shardings, batch_sh), out_shardings=rep)
  return {"graphdef": graphdef, "shardings": shardings, "batch_sharding": batch_sh,
          "init": init, "train_step": train_step, "eval_step": eval_step}


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


def _log_line(s: Setup, m: dict, done: int, dt: float, peak: float) -> dict:
  """The metrics row of a log step: the step's outputs plus throughput and FLOPs spent."""
  tokens_per_step = s.cfg.data.batch_size * s.cfg.data.seq_len
  row = {k: metrics_lib._to_python(v) for k, v in m.items()}
  row.update(perplexity=math.exp(min(row["nll"], 50)), step_time_s=dt,
             tokens_per_s=tokens_per_step / dt, tflops_per_s=s.flops_per_step / dt / 1e12,
             mfu=s.flops_per_step / dt / (peak * jax.device_count()), peak_flops=peak,
             flops_spent=s.flops_per_step * done, tokens_seen=tokens_per_step * done)
  return row


def run(cfg: Config, workdir: str, data=None) -> dict:
  """Trains cfg in workdir, resuming from its newest checkpoint; returns a summary.

  `data` defaults to `mor.data.make_data(cfg.data, ...)` for this process; any
  object with `train` (an iterator with JSON-able get_state/set_state) and
  `eval_batches(n)` works.
  """
  os.makedirs(workdir, exist_ok=True)
  cfg_dict = config_lib.to_dict(cfg)
  # first: a missing optional package (wandb) fails before any data or compile work
  writer = metrics_lib.MetricsWriter(workdir, cfg.train.tensorboard, cfg.train.wandb, cfg_dict)
  if data is None:
    data = data_lib.make_data(cfg.data, cfg.model.vocab_size, jax.process_index(),
                              jax.process_count())
  fingerprint = getattr(data, "fingerprint", "")
  s = setup(cfg)
  mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
  shapes = jax.eval_shape(s.init, jax.random.key(0))
  restored = checkpoint.restore_latest(mngr, shapes, s.state_shardings, cfg_dict)
  if restored is None:
    state = uptrain.maybe_init_from_source(cfg, init_state(s), s)
  else:
    state, meta = restored
    checkpoint.restore_data(mngr, int(meta["step"]), data.train, meta, fingerprint)
  start = int(state["step"])
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg_dict, f, indent=1)
  progress = metrics_lib.Progress(s.steps, start)
  peak = metrics_lib.PeakMeter(cfg.train.peak_flops)
  eval_batches = data.eval_batches(cfg.train.eval_batches)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  t, preempt, last = cfg.train, _Preempted(), {}
  tic, tic_step = time.perf_counter(), start

  def save(step):
    checkpoint.save(mngr, step, state, data.train, cfg_dict, fingerprint)

  try:
    for step in range(start, s.steps):
      state, m = s.train_step(state, to_global(s, next(data.train)))
      done = step + 1
      progress.advance(done)
      if done % t.log_every == 0 or done == s.steps:
        check_finite(m, done)
        dt = (time.perf_counter() - tic) / (done - tic_step)
        last = _log_line(s, m, done, dt, peak())   # may re-measure the CPU peak
        tic_step = done
        writer.write(done, last)
        progress.log(done, {k: last[k] for k in ("loss", "tokens_per_s", "mfu")})
      if t.eval_every and done % t.eval_every == 0 and done != s.steps:
        writer.write(done, evaluate(s, state, eval_batches), kind="eval")
      if (t.checkpoint_every and done % t.checkpoint_every == 0) or preempt.flag:
        check_finite(m, done)
        save(done)
      if preempt.flag:
        mngr.wait_until_finished()
        progress.close()
        print(f"SIGTERM: saved step {done} and stopped", file=sys.stderr)
        return {"step": done, "preempted": True}
      if tic_step == done:   # the next window times steps alone: not the peak, eval or save
        tic = time.perf_counter()
    final = int(state["step"])
    ev = evaluate(s, state, eval_batches) if eval_batches else {}
    writer.write(final, ev, kind="eval")
    if mngr.latest_step() != final:
      save(final)
    mngr.wait_until_finished()
  finally:
    progress.close()
    writer.close()
    preempt.restore()
    mngr.close()
  return {"step": final, "flops_spent": s.flops_per_step * final,
          "tokens_seen": tokens_per_step * final, **last, **ev,
          "state": state, "setup": s}
