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


# ---------------------------------------------------------------------------
# Depth tasks (mor.depth): rows are `mor.depth.evaluate_all` results.
def _per_k(runs: Sequence[dict], get) -> tuple[list[int], np.ndarray]:
  """Difficulties and a [seeds, difficulties] array of get(run) dicts keyed by difficulty."""
  ks = sorted({int(k) for r in runs for k in get(r)})
  return ks, np.array([[get(r).get(str(k), np.nan) for k in ks] for r in runs], float)


def _band(ax, x, vals, label, **kw):
  line, = ax.plot(x, np.nanmean(vals, 0), marker="o", label=label, **kw)
  ax.fill_between(x, np.nanmin(vals, 0), np.nanmax(vals, 0), alpha=0.15, color=line.get_color())


def plot_depth_task(rows: Sequence[dict], out_dir: str, stem: str) -> list[str]:
  """Error per difficulty, routed depth per difficulty, test-time depth, FLOPs vs error."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r["row"], []).append(r)
  tmax = rows[0]["train_max_difficulty"]
  paths = []
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  every = lambda r: {**r["error"], **{k: v for k, v in r["beyond"]["error"].items()
                                      if int(k) > tmax}}
  for name, runs in groups.items():
    ks, err = _per_k(runs, every)
    _band(ax, ks, 100 * err, name)
    if "skip" in runs[0] and name == "recursive":
      ks, sk = _per_k(runs, lambda r: r["skip"]["error"])
      _band(ax, ks, 100 * sk, "recursive, recursions skipped", linestyle="--")
  ax.axvspan(tmax + 0.5, max(ks) + 0.5, color="grey", alpha=0.1, label="beyond training")
  ax.set(xlabel="difficulty", ylabel="per-token error (%)",
         title=f"{stem}: error per difficulty (mean of seeds, band = min..max)")
  paths.append(_save(fig, ax, os.path.join(out_dir, f"error_per_difficulty_{stem}.png")))

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for name, runs in groups.items():
    if "routing" in runs[0]:
      ks, dep = _per_k(runs, lambda r: r["routing"]["causal"]["mean_depth"])
      _band(ax, ks, dep, f"{name} (router, causal)")
    for th in runs[0].get("kl_exit", {}):
      ks, dep = _per_k(runs, lambda r, th=th: r["kl_exit"][th]["mean_depth"])
      _band(ax, ks, dep, f"{name} (KL exit < {th})", linestyle=":")
  ax.set(xlabel="difficulty (ground truth)", ylabel="mean recursions applied",
         title=f"{stem}: routed depth vs difficulty")
  paths.append(_save(fig, ax, os.path.join(out_dir, f"routed_depth_{stem}.png")))

  tt = [(n, runs) for n, runs in groups.items() if "test_time" in runs[0]]
  if tt:
    fig, axes = plt.subplots(1, len(tt), figsize=(4.2 * len(tt), 4), dpi=100, squeeze=False)
    for ax, (name, runs) in zip(axes[0], tt):
      depths = sorted(int(d) for d in runs[0]["test_time"])
      ks = sorted(int(k) for k in runs[0]["error"])
      for k in ks:
        vals = np.array([[r["test_time"][str(d)].get(str(k), np.nan) for d in depths]
                         for r in runs])
        _band(ax, depths, 100 * vals, f"k={k}", linestyle="-" if k <= tmax else "--")
      ax.axvline(runs[0]["N_r"], color="k", lw=0.8)
      ax.set(xlabel="recursions applied", ylabel="error (%)", title=name)
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out_dir, f"test_time_depth_{stem}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for name, runs in groups.items():
    ks = [k for k in sorted(int(k) for k in runs[0]["error"]) if k <= tmax]
    err = [100 * np.mean([r["error"][str(k)] for k in ks]) for r in runs]
    fl = [r["forward_flops_per_token"] / 1e6 for r in runs]
    ax.scatter(fl, err, label=name)
    for th in runs[0].get("kl_exit", {}):
      ex = [r["kl_exit"][th] for r in runs]
      ax.scatter([e["flops_per_token"] / 1e6 for e in ex],
                 [100 * np.mean([e["error"][str(k)] for k in ks]) for e in ex], marker="x",
                 label=f"{name}, KL exit < {th}")
  ax.set(xlabel="inference forward MFLOPs per token", ylabel=f"error (%), difficulty <= {tmax}",
         title=f"{stem}: error vs FLOPs spent (one point per seed)")
  paths.append(_save(fig, ax, os.path.join(out_dir, f"flops_vs_error_{stem}.png")))
  return paths


def plot_depth_vs_difficulty(difficulty_N: np.ndarray, depth_N: np.ndarray, n_r: int,
                             title: str, path: str | None = None):
  """Share of each difficulty's tokens routed to each depth (columns sum to 1), mean marked."""
  ks = np.arange(1, int(difficulty_N.max()) + 1)
  share = np.array([[np.mean(depth_N[difficulty_N == k] == d) if np.any(difficulty_N == k)
                     else np.nan for k in ks] for d in range(n_r + 1)])
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
  im = ax.imshow(share, origin="lower", cmap="Blues", vmin=0, vmax=1, aspect="auto",
                 extent=(ks[0] - 0.5, ks[-1] + 0.5, -0.5, n_r + 0.5))
  means = [depth_N[difficulty_N == k].mean() for k in ks]
  ax.plot(ks, means, "o-", color="tab:red", label="mean depth")
  fig.colorbar(im, ax=ax, label="share of the difficulty's tokens")
  ax.set(xlabel="ground-truth difficulty", ylabel="recursions applied", title=title)
  if path:
    return _save(fig, ax, path)
  ax.legend(fontsize=7)
  return fig
