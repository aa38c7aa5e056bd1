"""Loss curves of a sweep: training NLL against FLOPs and against tokens, all runs in one figure.

`plot_loss_groups` draws one line per table row: the mean over its seeds with a
min..max band. Its FLOP axis is forward FLOPs (the paper's convention): the
metrics log training FLOPs (3 x forward), divided by 3 here.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")   # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mor import metrics as metrics_lib  # noqa: E402


def _save(fig, ax, path: str) -> str:
  """Grid, legend and layout shared by every plot here; writes path (folders made) and closes fig."""
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


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
  return _save(fig, ax, path)


def plot_loss_groups(groups: Sequence[tuple[str, Sequence[str]]], x: str, path: str,
                     title: str = "", points: int = 200) -> str:
  """One line per (label, [workdirs of its seeds]): mean smoothed training NLL, min..max band.

  x is 'flops' (forward FLOPs, paper convention) or 'tokens'. Seeds are put on a
  common grid up to the shortest seed's end; held-out points are their mean.
  """
  from mor.flops import CONVENTION_FACTOR
  scale = 1.0 / CONVENTION_FACTOR["training"] if x == "flops" else 1.0
  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
  for label, wds in groups:
    cs = [c for c in (curves(wd) for wd in wds) if len(c["nll"]) > 1]
    if not cs:
      continue
    end = min(c[x][-1] for c in cs) * scale
    grid = np.linspace(max(c[x][0] for c in cs) * scale, end, points)
    ys = np.stack([np.interp(grid, c[x] * scale, smooth(c["nll"])) for c in cs])
    line, = ax.plot(grid, ys.mean(0), label=f"{label} (n={len(cs)})", lw=1.4)
    if len(cs) > 1:
      ax.fill_between(grid, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, lw=0)
    evs = [c for c in cs if len(c["eval_nll"])]
    if evs:
      c = evs[0]
      ex = np.interp(c["eval_step"], c["step"], c[x]) * scale
      ey = np.mean([e["eval_nll"][:len(c["eval_nll"])] for e in evs
                    if len(e["eval_nll"]) >= len(c["eval_nll"])], axis=0)
      ax.plot(ex, ey, "o", color=line.get_color(), ms=4)
  ax.set_xlabel("forward FLOPs (paper convention)" if x == "flops" else "training tokens")
  ax.set_ylabel("NLL (nats/token; line: train EMA, dots: held-out)")
  ax.set_title(title or f"loss vs {x}", fontsize=9)
  return _save(fig, ax, path)


def plot_contribution(rows: Sequence[dict], path: str, title: str = "") -> str | None:
  """Recursion contribution (NLL skipped - full) against tokens, one line per table row.

  rows are evaluation rows with a 'curve' (mor.analysis.contribution_curve); the
  line is the mean over seeds at each checkpoint, the band min..max. None when no
  row has a curve.
  """
  groups: dict[str, list[list[dict]]] = {}
  for r in rows:
    if r.get("curve"):
      groups.setdefault(r.get("row") or r["name"], []).append(r["curve"])
  if not groups:
    return None
  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
  for label, cs in groups.items():
    n = min(len(c) for c in cs)
    x = np.mean([[p["tokens"] for p in c[:n]] for c in cs], axis=0)
    y = np.array([[p["gain"] for p in c[:n]] for c in cs])
    line, = ax.plot(x, y.mean(0), "o-", label=f"{label} (n={len(cs)})", lw=1.4, ms=3)
    if len(cs) > 1:
      ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2, lw=0)
  ax.axhline(0.0, color="black", lw=0.8)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("recursion contribution (nats): NLL skipped - full")
  ax.set_title(title or "what the shared recursions add", fontsize=9)
  return _save(fig, ax, path)
