"""Metrics: a JSON-lines writer, console progress with ETA, and the peak FLOP rate."""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per device (FLOP/s), for MFU on accelerators.
ACCELERATOR_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
                     "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
                     "TPU v6 lite": 918e12}


def _to_python(v):
  a = np.asarray(v)
  if a.ndim == 0:
    return a.item()
  return a.tolist()


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """One console line per log step: step/total, loss, throughput and ETA."""

  def __init__(self, total: int, start: int = 0):
    self.total, self.start, self.t0 = total, start, time.time()

  def line(self, step: int, values: dict) -> str:
    done = max(step - self.start, 1)
    rate = (time.time() - self.t0) / done
    eta = rate * (self.total - step)
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
    return f"[{step}/{self.total}] {shown} eta={eta:.0f}s"

  def log(self, step: int, values: dict) -> None:
    if jax.process_index() == 0:
      print(self.line(step, values), file=sys.stderr, flush=True)


def matmul_flop_rate(n: int = 2048, repeats: int = 8) -> list[float]:
  """FLOP/s of `repeats` jitted f32 n^3 matmuls on the first device (one sample each)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    rates.append(2 * n ** 3 / (time.perf_counter() - t))
  return rates


def peak_flops_per_device(repeats: int = 8) -> float:
  """The accelerator's table peak, or on CPU the median measured f32 matmul rate.

  The median of several runs (not the best) so that one lucky or unlucky sample
  on a shared host does not move MFU; benchmarks that need a comparable number
  measure it beside each timing (mor.bench) or pin it (train.peak_flops).
  """
  dev = jax.devices()[0]
  for name, peak in ACCELERATOR_PEAKS.items():
    if name.lower() in str(getattr(dev, "device_kind", "")).lower():
      return peak
  host = float(np.median(matmul_flop_rate(repeats=repeats)))
  # fake CPU devices share the host's cores: each gets its share of the peak
  return host / (jax.local_device_count() if dev.platform == "cpu" else 1)
