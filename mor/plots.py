"""Loss curves of a sweep: training NLL against FLOPs and against tokens, all runs in one figure."""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")   # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mor import metrics as metrics_lib  # noqa: E402


def curves(workdir: str) -> dict[str, np.ndarray]:
  """Training rows (step, flops, tokens, nll) and eval rows (step, eval_nll) of a run."""
  rows = metrics_lib.read_metrics(workdir) if os.path.exists(
      os.path.join(workdir, "metrics.jsonl")) else []
  tr = [r for r in rows if "nll" in r and "flops_spent" in r]
  ev = [r for r in rows if "eval_nll" in r]
  return {"flops": np.array([r["flops_spent"] for r in tr]),
          "tokens": np.array([r["tokens_seen"] for r in tr]),
          "step": np.array([r["step"] for r in tr]), "nll": np.array([r["nll"] for r in tr]),
          "eval_step": np.array([r["step"] for r in ev]),
          "eval_nll": np.array([r["eval_nll"] for r in ev])}


def smooth(y: np.ndarray, alpha: float = 0.3) -> np.ndarray:
  """Exponential moving average (training NLL is noisy at small batch)."""
  out, acc = np.empty_like(y, dtype=float), None
  for i, v in enumerate(y):
    acc = v if acc is None else alpha * v + (1 - alpha) * acc
    out[i] = acc
  return out


def plot_loss(runs: Sequence[tuple[str, str]], x: str, path: str, title: str = "") -> str:
  """One figure, one line per (label, workdir): smoothed training NLL vs x ('flops'|'tokens').

  Held-out NLL points are drawn where the run logged them, at the matching x.
  """
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for label, wd in runs:
    c = curves(wd)
    if not len(c["nll"]):
      continue
    line, = ax.plot(c[x], smooth(c["nll"]), label=label, lw=1.4)
    if len(c["eval_nll"]):
      ex = np.interp(c["eval_step"], c["step"], c[x])
      ax.plot(ex, c["eval_nll"], "o", color=line.get_color(), ms=4)
  ax.set_xlabel("training FLOPs" if x == "flops" else "training tokens")
  ax.set_ylabel("NLL (nats/token; line: train EMA, dots: held-out)")
  ax.set_title(title or f"loss vs {x}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
