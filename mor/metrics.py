"""Metrics: JSON lines, TensorBoard event files, optional W&B, console progress, peak FLOP rate.

Every scalar goes to DIR/metrics.jsonl (one object per line) and, as the same
numbers, to TensorBoard event files in DIR (`tensorboard --logdir DIR`). The
event files are written with the `tensorboard` package's own TF-free writer
(`EventFileWriter` and its protos, the writer torch.utils.tensorboard uses):
TensorFlow is not needed, and the one package that views the files also writes
them, so nothing else (tensorboardX) is pulled in. Tags are `train/<key>` and
`eval/<key>` (train and eval rows carry some equal keys, e.g. `stats/...`); a
1-D metric such as `stats/score_hist` becomes one scalar per entry, `<key>/<i>`.
Weights & Biases is optional: imported only when `train.wandb` names a project.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

# Dense bf16 peak per device (FLOP/s), for MFU on accelerators.
ACCELERATOR_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
                     "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
                     "TPU v6 lite": 918e12}


def _to_python(v):
  a = np.asarray(v)
  if a.ndim == 0:
    return a.item()
  return a.tolist()


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
  """Flat {tag: float} of the numbers in a metrics row (1-D lists -> `tag/i`)."""
  out = {}
  for k, v in values.items():
    if isinstance(v, bool) or k == "step":
      continue
    if isinstance(v, (int, float)):
      out[prefix + k] = float(v)
    elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
      out.update({f"{prefix}{k}/{i}": float(x) for i, x in enumerate(v)})
  return out


def import_wandb(project: str):
  """The wandb module, or a one-line error naming train.wandb when it is not installed."""
  try:
    import wandb  # optional: only a run that asks for W&B needs it
  except ImportError:
    raise ImportError(f"train.wandb={project!r} needs the wandb package: pip install wandb "
                      "(or pip install -e '.[wandb]'); train.wandb='' turns W&B off") from None
  return wandb


class MetricsWriter:
  """metrics.jsonl, TensorBoard events and (optionally) W&B, written by process 0 only."""

  def __init__(self, workdir: str, tensorboard: bool = True, wandb_project: str = "",
               config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.events = self.wandb_run = None
    wandb = import_wandb(wandb_project) if wandb_project else None  # fail before any work
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      self.events = EventFileWriter(workdir, flush_secs=30)
    if wandb is not None:
      self.wandb_run = wandb.init(project=wandb_project, dir=workdir, config=config,
                                  name=os.path.basename(os.path.abspath(workdir)))

  def write(self, step: int, values: dict, kind: str = "train") -> None:
    """Appends one row; kind ("train" or "eval") prefixes the TensorBoard and W&B tags."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    tags = scalars(row, f"{kind}/")
    if self.events is not None and tags:
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v)
                                           for t, v in tags.items()])
      self.events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                            summary=summary))
    if self.wandb_run is not None and tags:
      self.wandb_run.log(tags, step=int(step))

  def flush(self) -> None:
    if self.events is not None:
      self.events.flush()

  def close(self) -> None:
    if self.events is not None:
      self.events.close()
      self.events = None
    if self.wandb_run is not None:
      self.wandb_run.finish()
      self.wandb_run = None


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Console progress: a tqdm bar on a terminal, else one plain line per log step.

  Both show the same fields (step/total, the logged values, ETA); the bar also
  advances on every step in between. Process 0 only.
  """

  def __init__(self, total: int, start: int = 0, stream: TextIO | None = None,
               bar: bool | None = None):
    self.total, self.start, self.t0 = total, start, time.time()
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = jax.process_index() == 0
    isatty = getattr(self.stream, "isatty", lambda: False)()
    self.bar = None
    if self.enabled and (isatty if bar is None else bar):
      self.bar = tqdm(total=total, initial=start, file=self.stream, unit="step",
                      dynamic_ncols=True, smoothing=0.1, leave=True)

  @staticmethod
  def fields(values: dict) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in values.items() if isinstance(v, (int, float))}

  def line(self, step: int, values: dict) -> str:
    done = max(step - self.start, 1)
    rate = (time.time() - self.t0) / done
    eta = rate * (self.total - step)
    shown = " ".join(f"{k}={v}" for k, v in self.fields(values).items())
    return f"[{step}/{self.total}] {shown} eta={eta:.0f}s"

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (no output in plain-line mode)."""
    if self.bar is not None and step > self.bar.n:
      self.bar.update(step - self.bar.n)

  def log(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    if self.bar is None:
      print(self.line(step, values), file=self.stream, flush=True)
      return
    self.bar.set_postfix(self.fields(values), refresh=False)
    self.advance(step)
    self.bar.refresh()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


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


def accelerator_peak() -> float:
  """The first device's table peak (dense bf16 FLOP/s), or 0.0 when it has none (CPU)."""
  kind = str(getattr(jax.devices()[0], "device_kind", "")).lower()
  return next((peak for name, peak in ACCELERATOR_PEAKS.items() if name.lower() in kind), 0.0)


def peak_flops_per_device(repeats: int = 8) -> float:
  """The accelerator's table peak, or on CPU the median measured f32 matmul rate.

  The median of several runs (not the best) so that one lucky or unlucky sample
  on a shared host does not move MFU; benchmarks that need a comparable number
  measure it beside each timing (mor.bench), training re-measures it (PeakMeter),
  or it is pinned (train.peak_flops).
  """
  table = accelerator_peak()
  if table:
    return table
  host = float(np.median(matmul_flop_rate(repeats=repeats)))
  # fake CPU devices share the host's cores: each gets its share of the peak
  return host / (jax.local_device_count() if jax.devices()[0].platform == "cpu" else 1)


# seconds between two CPU peak measurements during training (tests set it to 0)
PEAK_RESAMPLE_S = 60.0


class PeakMeter:
  """Per-device peak FLOP/s for a training run's MFU, kept current on a shared CPU.

  pinned > 0 (train.peak_flops) or an accelerator's table peak is returned as is.
  On CPU the matmul rate moves with the host's load (107-194 GFLOP/s within one
  run has been seen), so a peak measured once at start-up makes MFU drift, even
  above 1. Calling the meter at a log line re-measures the rate (the median of 3
  matmuls, ~0.1-0.5 s) when PEAK_RESAMPLE_S have passed since the last sample, so
  each window's MFU is against a rate taken beside it at under 1% overhead.
  """

  def __init__(self, pinned: float = 0.0, clock=time.monotonic):
    self.fixed = pinned or accelerator_peak()
    self.clock, self.value, self.taken = clock, 0.0, None

  def __call__(self) -> float:
    if self.fixed:
      return self.fixed
    now = self.clock()
    if self.taken is None or now - self.taken >= PEAK_RESAMPLE_S:
      self.value = peak_flops_per_device(repeats=3)
      self.taken = self.clock()
    return self.value
