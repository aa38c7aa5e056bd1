"""Timing helpers shared by the benchmarks in experiments/ (they print JSON)."""
from __future__ import annotations

import math
import time

import jax
import numpy as np

from mor import flops, metrics, sharding, train
from mor.config import Config


def compiled_stats(fn, *args) -> dict:
  """Compiler FLOPs and memory (arguments + outputs + temporaries) of jit(fn)(*args)."""
  compiled = fn.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
            mem.alias_size_in_bytes)
  return {"flops_compiler": float(cost.get("flops", 0.0)), "peak_mem_bytes": peak}


def time_fn(fn, repeats: int) -> float:
  """Median wall time of fn() over repeats calls, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def _median(xs: list[float]) -> float:
  return float(np.median(np.asarray(xs)))


def train_bench_config(name: str, *, vocab: int = 4096, num_heads: int = 4,
                       num_kv_heads: int = 2, ffn_dim: int = 0, remat: bool = False,
                       attention: str = "", **shape) -> Config:
  """config.bench_config(name, **shape) with the vocabulary, heads, FFN width and attention set."""
  import dataclasses
  from mor import config as config_lib
  cfg = config_lib.bench_config(name, **shape)
  over = dict(vocab_size=vocab, num_heads=num_heads, num_kv_heads=num_kv_heads, remat=remat)
  if ffn_dim:
    over["ffn_dim"] = ffn_dim
  if attention:
    over["attention"] = attention
  model = dataclasses.replace(cfg.model, **over)
  return config_lib.validate(dataclasses.replace(cfg, model=model))


def prepare_train_step(cfg: Config, devices=None) -> tuple:
  """(step() -> loss, static record) for one train step of cfg on random tokens."""
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = train.init_state(s)
  toks = jax.random.randint(jax.random.key(1), (cfg.data.batch_size, cfg.data.seq_len + 1), 0,
                            cfg.model.vocab_size)
  batch = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, s.batch_sharding)
  stats = compiled_stats(s.train_step, state, batch)
  holder = {"state": state}

  def step():
    holder["state"], m = s.train_step(holder["state"], batch)
    return m["loss"]

  rec = {"flops_analytic": flops.train_flops_per_step(cfg.model, cfg.data.seq_len,
                                                      cfg.data.batch_size, causal=False),
         "flops_analytic_causal": s.flops_per_step, **stats, "devices": s.mesh.devices.size}
  return step, rec


def bench_train_steps(cfgs: dict[str, Config], repeats: int = 5, devices=None,
                      peak_flops: float = 0.0, matmul_samples: int = 2) -> list[dict]:
  """Step time, tokens/s, FLOPs, memory and MFU of several train steps, timed interleaved.

  Each round times one step of every model, each followed by `matmul_samples`
  jitted f32 2048^3 matmuls, so the peak is measured beside each model's timing
  on the same (possibly busy) machine. MFU (causal model FLOPs) is against the
  median of those samples for each model, or against `peak_flops` (per device)
  when given; mfu_round_median is the median over rounds of each step against the
  matmul rate measured right after it. Step times are medians over `repeats`
  rounds after one warm-up (step_time_min_s: the least disturbed round).
  """
  prepared = {name: prepare_train_step(cfg, devices) for name, cfg in cfgs.items()}
  for step, _ in prepared.values():
    jax.block_until_ready(step())
  times = {name: [] for name in cfgs}
  rates = {name: [] for name in cfgs}
  for _ in range(repeats):
    for name, (step, _) in prepared.items():
      t = time.perf_counter()
      jax.block_until_ready(step())
      times[name].append(time.perf_counter() - t)
      rates[name].append(_median(metrics.matmul_flop_rate(repeats=matmul_samples)))
  records = []
  for name, cfg in cfgs.items():
    rec = prepared[name][1]
    dt = _median(times[name])
    ndev = rec["devices"]
    measured = _median(rates[name])          # whole host
    peak = peak_flops * ndev if peak_flops else measured
    tokens = cfg.data.batch_size * cfg.data.seq_len
    # each round's step against the matmul rate measured right after it: robust to a load
    # that changes during the run (the shared machine's usual state)
    paired = [rec["flops_analytic_causal"] / t / r for t, r in zip(times[name], rates[name])]
    records.append({"model": name, "step_time_s": dt, "step_time_min_s": min(times[name]),
                    "step_times_s": [round(t, 4) for t in times[name]],
                    "tokens_per_s": tokens / dt, **rec,
                    "mfu": rec["flops_analytic_causal"] / dt / peak,
                    "mfu_noncausal": rec["flops_analytic"] / dt / peak,
                    "mfu_round_median": _median(paired),
                    "peak_flops": peak, "peak_flops_measured": measured,
                    "peak_flops_pinned": bool(peak_flops)})
  return records


def bench_train_step(cfg: Config, repeats: int = 5, devices=None,
                     peak_flops: float = 0.0) -> dict:
  """bench_train_steps for one config (see there)."""
  rec = bench_train_steps({"model": cfg}, repeats, devices, peak_flops)[0]
  del rec["model"]
  return rec


UNIT = {2: 15, 3: 10, 4: 8}   # the paper's plans: 1 + B x N_r + 1 layers


def bench_decode(args) -> tuple[list[dict], dict]:
  """Decoding tokens/s, KV bytes and peak memory: vanilla, recursive and MoR in one run.

  `args` carries d_model, num_heads, num_kv_heads, vocab, batch, max_len,
  recursions ("2,3,4"), steps, rounds and no_vanilla_engine (see
  experiments/bench_decode.py). Returns (records, timings).
  """
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mor import decode
  from mor.config import ModelConfig, RouterConfig
  from mor.models import build_model
  from mor.serving import Engine

  t_start = time.perf_counter()
  T, B = args.max_len, args.batch

  def cfg(kind, layers, n=1, caps=()):
    return ModelConfig(kind=kind, vocab_size=args.vocab, num_layers=layers,
                       d_model=args.d_model, num_heads=args.num_heads,
                       num_kv_heads=args.num_kv_heads, ffn_dim=3 * args.d_model,
                       max_seq_len=T, num_recursions=n, sharing="middle_cycle",
                       router=RouterConfig(capacities=tuple(caps)))

  def plain(model, batch):
    """Timed call, compiled stats and KV bytes of `steps` jitted decode steps."""
    graphdef, state = nnx.split(model)

    def run(state, caches):
      m = nnx.merge(graphdef, state)
      def body(caches, t):
        logits, caches = decode.decode_step(m, jnp.zeros((batch,), jnp.int32),
                                            jnp.full((batch,), t, jnp.int32), caches)
        return caches, decode.sample(logits, None)
      return jax.lax.scan(body, caches, jnp.arange(args.steps))

    fn = jax.jit(run)
    caches = model.init_caches(batch, T)
    kv = sum(c.num_bytes for c in caches)
    stats = compiled_stats(fn, state, caches)
    return (lambda: fn(state, caches)), args.steps * batch, kv, stats

  def served(model, batch, n, **kw):
    """Timed engine advance over a request queue; tokens counted from the engine."""
    eng = Engine(model, batch, T, steps_per_call=max(8, int(args.steps * 34 / (2 + 8 * n))),
                 **kw)
    rng = np.random.default_rng(0)
    for _ in range(6 * batch):          # far more work than the timed rounds need
      eng.submit(rng.integers(0, args.vocab, 4), T - 4)
    holder = {"st": eng.start()}
    stats = compiled_stats(eng._chunk_fn(), eng.params, holder["st"])
    holder["st"], _ = eng.advance(holder["st"])          # warm-up: slots fill up

    def call():
      before = eng.stats["tokens_processed"]
      holder["st"], _ = eng.advance(holder["st"])
      holder["tokens"] = eng.stats["tokens_processed"] - before
      return holder["st"].counters
    return call, holder, eng.kv_bytes()["total"], stats, eng

  # ---- build every run, then time them in interleaved rounds.
  runs = []
  # the recursive model uses the N_r = 4 plan (34 layers): its vanilla is always built
  for layers in sorted({34} | {2 + UNIT[n] * n for n in map(int, args.recursions.split(","))}):
    van = build_model(cfg("vanilla", layers), 0)
    fn, toks, kv, st = plain(van, B)
    runs.append(dict(model=f"vanilla{layers}", num_recursions=1, layers=layers, batch=B,
                     path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv, **st))
    if not args.no_vanilla_engine:
      fn, holder, kv, st, eng = served(van, B, 4)
      runs.append(dict(model=f"vanilla{layers}", num_recursions=1, layers=layers, batch=B,
                       path="engine", fn=fn, holder=holder, kv_bytes=kv, **st))
  rec = build_model(cfg("recursive", 34, 4), 0)
  fn, toks, kv, st = plain(rec, B)
  runs.append(dict(model="recursive", num_recursions=4, layers=34, batch=B,
                   path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv, **st))
  vanilla_kv = {r["layers"]: r["kv_bytes"] for r in runs if r["model"].startswith("vanilla")}
  for n in map(int, args.recursions.split(",")):
    layers = 2 + UNIT[n] * n
    caps = [(n - r) / n for r in range(n)]
    mor = build_model(cfg("mor", layers, n, caps), 0)
    kw = dict(forced_depths=tuple(range(n, 0, -1)),
              slots=[min(1.0, c + 2.0 / T) for c in caps])   # the schedule never overflows
    per_slot = Engine(mor, 1, T, **kw).kv_bytes()["total"]
    budget = int(vanilla_kv[layers] // per_slot)
    for batch in (B, budget):
      fn, holder, kv, st, eng = served(mor, batch, n, **kw)
      runs.append(dict(model=f"mor_ec{n}", num_recursions=n, layers=layers, batch=batch,
                       path="engine", fn=fn, holder=holder, kv_bytes=kv,
                       compute_ratio=layers / (2 + UNIT[n] * sum(caps)), **st))
  build_s = time.perf_counter() - t_start

  best = [math.inf] * len(runs)
  for _ in range(args.rounds):
    for i, r in enumerate(runs):
      t = time.perf_counter()
      jax.block_until_ready(r["fn"]())
      dt = time.perf_counter() - t
      toks = r["holder"]["tokens"] if "holder" in r else r["tokens"]
      best[i] = min(best[i], dt / toks)

  records = []
  for r, s_per_tok in zip(runs, best):
    rec = {k: r[k] for k in ("model", "num_recursions", "layers", "batch", "path",
                             "kv_bytes", "peak_mem_bytes")}
    rec["tokens_per_s"] = 1.0 / s_per_tok
    if "compute_ratio" in r:
      rec["compute_ratio"] = r["compute_ratio"]
    records.append(rec)
  for rec in records:
    base = max(x["tokens_per_s"] for x in records
               if x["model"] == f"vanilla{rec['layers']}" and x["batch"] == B)
    rec["ratio_to_vanilla"] = rec["tokens_per_s"] / base
    rec["kv_ratio_to_vanilla"] = rec["kv_bytes"] / vanilla_kv[rec["layers"]] * B / rec["batch"]
    if "compute_ratio" in rec:
      rec["fraction_of_compute_ratio"] = rec["ratio_to_vanilla"] / rec["compute_ratio"]
  return records, {"setup_s": round(build_s, 1),
                   "total_s": round(time.perf_counter() - t_start, 1)}
