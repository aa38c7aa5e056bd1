"""Timing helpers shared by the benchmarks in experiments/ (they print JSON)."""
from __future__ import annotations

import time

import jax

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


def bench_train_step(cfg: Config, repeats: int = 5, devices=None) -> dict:
  """Step time, throughput, analytic and compiler FLOPs and peak memory of one train step."""
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = train.init_state(s)
  rng = jax.random.key(1)
  toks = jax.random.randint(rng, (cfg.data.batch_size, cfg.data.seq_len + 1), 0,
                            cfg.model.vocab_size)
  batch = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, s.batch_sharding)
  stats = compiled_stats(s.train_step, state, batch)
  holder = {"state": state}

  def step():
    holder["state"], m = s.train_step(holder["state"], batch)
    return m["loss"]

  dt = time_fn(step, repeats)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  peak = metrics.peak_flops_per_device() * s.mesh.devices.size
  return {"step_time_s": dt, "tokens_per_s": tokens / dt,
          "flops_analytic": flops.train_flops_per_step(cfg.model, cfg.data.seq_len,
                                                       cfg.data.batch_size, causal=False),
          "flops_analytic_causal": s.flops_per_step, **stats,
          "mfu": s.flops_per_step / dt / peak, "peak_flops": peak,
          "devices": s.mesh.devices.size}
