"""Depth-task tables, plots and the issue's three claims, from `mor.depth.evaluate_all` rows.

Every number is a mean over seeds with its spread (max - min); an order between
two rows is called only beyond the larger spread (`mor.report.order_by_spread`).
Errors are per-token error rates (%) at each difficulty; "train" and "hard"
averages are unweighted means over the training difficulties and over those >= 3.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np

from mor import depth, plots, report, sweep

HARD = 3   # claim (i): difficulty >= 3


def _k(d: dict, k: int):
  return d.get(str(k), d.get(k))


def _mean_over(d: dict, ks: Sequence[int]) -> float:
  vals = [_k(d, k) for k in ks if _k(d, k) is not None]
  return 100 * float(np.mean(vals)) if vals else float("nan")


def run_summary(r: dict) -> dict:
  """Scalar numbers of one run, errors in %."""
  tmax = r["train_max_difficulty"]
  ks = sorted(int(k) for k in r["error"])
  train_ks = [k for k in ks if k <= tmax]
  out = {"name": r["name"], "row": r["row"], "seed": r["seed"], "step": r["step"],
         "flops": r["flops"], "tokens": r["tokens"], "unique_params": r["unique_params"],
         "inference_flops_per_token": r["forward_flops_per_token"],
         "err_train": _mean_over(r["error"], train_ks),
         "err_hard": _mean_over(r["error"], [k for k in train_ks if k >= HARD]),
         "err_beyond": _mean_over(r["beyond"]["error"],
                                  [int(k) for k in r["beyond"]["error"] if int(k) > tmax])}
  out.update({f"err_k{k}": 100 * _k(r["error"], k) for k in ks})
  out.update({f"err_k{k}": 100 * v for k, v in ((int(k), v) for k, v in
                                                 r["beyond"]["error"].items()) if k > tmax})
  if "skip" in r:
    out["err_train_skip"] = _mean_over(r["skip"]["error"], train_ks)
    out["recursion_contribution"] = out["err_train_skip"] - out["err_train"]
  if "routing" in r:
    c = r["routing"]["causal"]
    out["spearman"] = c["spearman"]
    out["spearman_topk"] = r["routing"]["topk"]["spearman"]
    out.update({f"depth_k{k}": _k(c["mean_depth"], k) for k in ks})
    t = r["routing"]["topk"]
    out["depth_causal"] = float(np.mean([_k(c["mean_depth"], k) for k in train_ks]))
    out["depth_topk"] = float(np.mean([_k(t["mean_depth"], k) for k in train_ks]))
    if "error" in t:   # evaluations from EVAL_VERSION 4 on
      out["err_train_topk"] = _mean_over(t["error"], train_ks)
      out.update({f"agree_{k}": 100 * v for k, v in r["routing"]["agreement"].items()})
  return out


def _by_row(rows: Sequence[dict]) -> dict[str, list[dict]]:
  return report.group([run_summary(r) for r in rows])


def _stat(runs: list[dict], key: str) -> tuple[float, float]:
  v = [r[key] for r in runs if key in r and r[key] == r[key]]
  return (float(np.mean(v)), float(np.max(v) - np.min(v))) if v else (float("nan"), 0.0)


def _nan_stat(values) -> tuple[float, float]:
  v = [x for x in values if x == x]
  return (float(np.mean(v)), float(np.ptp(v))) if v else (float("nan"), 0.0)


def _fmt(mean: float, spread: float, digits: int = 1) -> str:
  return "" if mean != mean else f"{mean:.{digits}f} ± {spread / 2:.{digits}f}"


def _ordered(rows_by: dict, names: Sequence[str]) -> list[str]:
  return [n for n in names if n in rows_by] + [n for n in rows_by if n not in names]


def claims(rows: Sequence[dict]) -> list[str]:
  """Plain-language verdicts on the issue's claims (i)-(iii), with their numbers."""
  by = _by_row(rows)
  out = []
  vals = lambda row, key: [r[key] for r in by.get(row, []) if key in r]
  if {"recursive", "vanilla_unique", "vanilla_applied"} <= set(by):
    rec, uni, app = (vals(n, "err_hard") for n in ("recursive", "vanilla_unique",
                                                   "vanilla_applied"))
    o = report.order_by_spread("recursive", rec, "vanilla_unique", uni)
    o2 = report.order_by_spread("recursive", rec, "vanilla_applied", app)
    held = o == "recursive < vanilla_unique"
    out.append(f"(i) error at difficulty >= {HARD}: recursive {np.mean(rec):.1f}%, vanilla with "
               f"the unique layers {np.mean(uni):.1f}%, vanilla with the applied depth "
               f"{np.mean(app):.1f}% (ordering: {o}; vs applied depth: {o2}). "
               f"{'Holds' if held else 'Does not hold'}: the recursive model "
               f"{'beats' if held else 'does not beat'} equal unique parameters beyond the seed "
               f"spread; the gap to equal applied depth is {np.mean(rec) - np.mean(app):+.1f} "
               "points.")
  rec_err, rec_fl = vals("recursive", "err_train"), vals("recursive", "inference_flops_per_token")
  for row in [n for n in by if n.startswith("mor")]:
    sp = vals(row, "spearman")
    err, fl = vals(row, "err_train"), vals(row, "inference_flops_per_token")
    o = report.order_by_spread(row, err, "recursive", rec_err) if rec_err else "n/a"
    cheaper = bool(rec_fl) and np.mean(fl) < np.mean(rec_fl)
    equal_or_better = o in ("tie", f"{row} < recursive")
    out.append(f"(ii) {row}: Spearman(routed depth, difficulty) on held-out tokens "
               f"{np.mean(sp):.2f} (seeds {', '.join(f'{s:.2f}' for s in sp)}; "
               f"{'>=' if np.mean(sp) >= 0.5 else '<'} 0.5); error on trained difficulties "
               f"{np.mean(err):.1f}% vs recursive {np.mean(rec_err):.1f}% ({o}) at "
               f"{np.mean(fl) / np.mean(rec_fl):.2f}x its inference FLOPs per token: "
               f"{'fewer FLOPs at equal or better error' if cheaper and equal_or_better else 'not fewer FLOPs at equal error'}.")
  if {"mor_tc_oracle", "mor_tc_shifted"} <= set(by):
    o, c = (vals(n, "err_train") for n in ("mor_tc_oracle", "mor_tc_shifted"))
    oh, ch = (vals(n, "err_hard") for n in ("mor_tc_oracle", "mor_tc_shifted"))
    order = report.order_by_spread("mor_tc_oracle", o, "mor_tc_shifted", c)
    fl = [np.mean(vals(n, "inference_flops_per_token")) for n in ("mor_tc_oracle",
                                                                  "mor_tc_shifted")]
    out.append(f"(iv) routing by the true difficulty against the same depths given at random: "
               f"error {np.mean(o):.1f}% vs {np.mean(c):.1f}% ({order}), at difficulty >= "
               f"{HARD} {np.mean(oh):.1f}% vs {np.mean(ch):.1f}%, inference FLOPs per token "
               f"{fl[0] / 1e6:.2f}M vs {fl[1] / 1e6:.2f}M: routing by difficulty "
               f"{'pays' if order == 'mor_tc_oracle < mor_tc_shifted' else 'does not pay beyond the seed spread'}"
               " here.")
  out += _test_time_claim(rows)
  return out


def _test_time_claim(rows: Sequence[dict]) -> list[str]:
  out = []
  for row, runs in report.group(rows).items():
    if "test_time" not in runs[0]:
      continue
    n_r, tmax = runs[0]["N_r"], runs[0]["train_max_difficulty"]
    ks = sorted(int(k) for k in runs[0]["error"])
    deeper = [d for d in range(n_r + 1, 2 * n_r + 1)]
    at = lambda d, kk: [_mean_over(r["test_time"][str(d)], kk) for r in runs]
    wide = lambda d, kk: [_mean_over(r["beyond"]["test_time"][str(d)], kk) for r in runs]
    easy, hard = [1, 2], [k for k in ks if HARD <= k <= tmax]
    beyond = sorted(int(k) for k in runs[0]["beyond"]["error"] if int(k) > tmax)
    base_e, base_h, base_b = at(n_r, easy), at(n_r, hard), wide(n_r, beyond)
    best_e = max(deeper, key=lambda d: np.mean(at(d, easy)))     # the worst deeper depth for easy
    worst_e = at(best_e, easy)
    o_easy = report.order_by_spread("deeper", worst_e, "trained", base_e)
    best_h = min(deeper, key=lambda d: np.mean(at(d, hard)))
    o_hard = report.order_by_spread("deeper", at(best_h, hard), "trained", base_h)
    best_b = min(deeper, key=lambda d: np.mean(wide(d, beyond)))
    o_b = report.order_by_spread("deeper", wide(best_b, beyond), "trained", base_b)
    out.append(f"(iii) {row}: easy tokens (difficulty 1-2) err {np.mean(base_e):.1f}% at N_r={n_r}, "
               f"worst {np.mean(worst_e):.1f}% at {best_e} recursions ({o_easy}: "
               f"{'degrades' if o_easy == 'deeper > trained' else 'no degradation beyond the spread'}); "
               f"hard trained difficulties {np.mean(base_h):.1f}% -> best {np.mean(at(best_h, hard)):.1f}% "
               f"at {best_h} ({o_hard}); beyond training {np.mean(base_b):.1f}% -> best "
               f"{np.mean(wide(best_b, beyond)):.1f}% at {best_b} ({o_b}).")
  return out


# ---------------------------------------------------------------------------
def _difficulties(rows: Sequence[dict], beyond: bool = False) -> list[int]:
  ks = {int(k) for r in rows for k in r["error"]}
  if beyond:
    ks |= {int(k) for r in rows for k in r["beyond"]["error"]}
  return sorted(ks)


def markdown(rows: Sequence[dict], task: str) -> str:
  by, ks, kall = _by_row(rows), _difficulties(rows), _difficulties(rows, beyond=True)
  names = _ordered(by, list(depth.ROWS))
  tmax = rows[0]["train_max_difficulty"]
  lines = [f"# Depth task `{task}` (CPU)", "",
           f"Per-token error (%) on held-out examples, mean ± half the spread over seeds "
           f"(spread = max - min). Trained on difficulties 1-{tmax}; columns past {tmax} come "
           f"from a second held-out set with difficulties up to {max(kall)} (beyond training). "
           "Train FLOPs: forward FLOPs of the steps taken (paper convention).", ""]
  head = (["model", "seeds", "unique params", "steps", "train FLOPs (fwd)"] +
          [f"k={k}" for k in kall] + [f"k<={tmax}", f"k>={HARD}", "inference FLOPs/token"])
  lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for n in names:
    runs = by[n]
    cells = [depth.LABELS.get(n, n), str(len(runs)), f"{runs[0]['unique_params'] / 1e6:.3f}M",
             f"{_stat(runs, 'step')[0]:.0f}", f"{_stat(runs, 'flops')[0]:.3g}"]
    cells += [_fmt(*_stat(runs, f"err_k{k}")) for k in kall]
    cells += [_fmt(*_stat(runs, "err_train")), _fmt(*_stat(runs, "err_hard")),
              f"{_stat(runs, 'inference_flops_per_token')[0] / 1e6:.2f}M"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Recursion contribution (error with every shared recursion skipped, "
            "same weights)", "", "| model | err, full | err, recursions skipped | contribution |",
            "| --- | --- | --- | --- |"]
  for n in names:
    if "recursion_contribution" in by[n][0]:
      lines.append(f"| {depth.LABELS.get(n, n)} | {_fmt(*_stat(by[n], 'err_train'))} | "
                   f"{_fmt(*_stat(by[n], 'err_train_skip'))} | "
                   f"{_fmt(*_stat(by[n], 'recursion_contribution'))} |")
  lines += ["", "## Routed depth per difficulty (MoR, causal inference routing)", "",
            "| model | " + " | ".join(f"k={k}" for k in ks) + " | Spearman | "
            "Spearman, top-k routing |", "|" + " --- |" * (len(ks) + 3)]
  for n in names:
    if "spearman" in by[n][0]:
      lines.append(f"| {depth.LABELS.get(n, n)} | " +
                   " | ".join(_fmt(*_stat(by[n], f"depth_k{k}"), 2) for k in ks) +
                   f" | {_fmt(*_stat(by[n], 'spearman'), 2)} | "
                   f"{_fmt(*_stat(by[n], 'spearman_topk'), 2)} |")
  lines += _routing_markdown(by, names, tmax)
  lines += _test_time_markdown(rows, ks, "test_time", "training-range held-out set")
  lines += _test_time_markdown(rows, [k for k in kall if k > tmax], "beyond",
                               "beyond-training set; its hop-count ids were never trained")
  lines += _kl_markdown(rows)
  lines += ["", "## Claims", ""] + [f"- {c}" for c in claims(rows)]
  return "\n".join(lines) + "\n"


def _routing_markdown(by: dict, names: Sequence[str], tmax: int) -> list[str]:
  """Inference (causal) routing against the training (top-k) routing it should reproduce."""
  names = [n for n in names if "agree_all" in by[n][0]]
  if not names:
    return []
  steps = sorted({k for n in names for k in by[n][0] if k.startswith("agree_step_")})
  lines = ["", "## Inference routing against training routing (MoR)", "",
           f"Error on difficulties 1-{tmax} and mean routed depth (unweighted over difficulties)"
           " with the causal decisions decoding uses and with the top-k routing of training; "
           "agreement: scored tokens given the same depth by both (%), and per recursion step "
           "the same go-deeper decision among tokens that reached the step before it under both.",
           "", "| model | err, causal | err, top-k | depth, causal | depth, top-k | agreement | " +
           " | ".join(f"agreement, step {k.rsplit('_', 1)[1]}" for k in steps) + " |",
           "|" + " --- |" * (6 + len(steps))]
  for n in names:
    runs = by[n]
    cells = [depth.LABELS.get(n, n), _fmt(*_stat(runs, "err_train")),
             _fmt(*_stat(runs, "err_train_topk")), _fmt(*_stat(runs, "depth_causal"), 2),
             _fmt(*_stat(runs, "depth_topk"), 2), _fmt(*_stat(runs, "agree_all"))]
    cells += [_fmt(*_stat(runs, k)) for k in steps]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _test_time_markdown(rows, ks, which: str, what: str) -> list[str]:
  lines = ["", f"## Test-time depth, {what} (error % per difficulty against applied recursions)",
           ""]
  for row, runs in report.group(rows).items():
    if "test_time" not in runs[0]:
      continue
    if which == "beyond":
      runs = [dict(r, test_time=r["beyond"]["test_time"]) for r in runs]
    lines += [f"**{depth.LABELS.get(row, row)}** (trained with N_r = {runs[0]['N_r']})", "",
              "| recursions | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|" + " --- |" * (len(ks) + 1)]
    for d in sorted(int(x) for x in runs[0]["test_time"]):
      vals = [[100 * _k(r["test_time"][str(d)], k) for r in runs] for k in ks]
      lines.append(f"| {d} | " + " | ".join(
          _fmt(np.mean(v), np.max(v) - np.min(v)) for v in vals) + " |")
    lines.append("")
  return lines


def _kl_markdown(rows) -> list[str]:
  lines = ["## Router-free KL exit vs fixed depth vs learned routers", "",
           "| model | exit rule | err k<=train | mean depth | inference FLOPs/token | "
           "KL probes, FLOPs/token | Spearman |", "| --- | --- | --- | --- | --- | --- | --- |"]
  any_kl = False
  for row, runs in report.group(rows).items():
    summ = [run_summary(r) for r in runs]
    tmax = runs[0]["train_max_difficulty"]
    ks = [k for k in _difficulties(runs) if k <= tmax]
    label = depth.LABELS.get(row, row)
    if "routing" in runs[0]:
      md = [np.mean([_k(r["routing"]["causal"]["mean_depth"], k) for k in ks]) for r in runs]
      lines.append(f"| {label} | learned router (causal) | {_fmt(*_stat(summ, 'err_train'))} | "
                   f"{np.mean(md):.2f} | {_stat(summ, 'inference_flops_per_token')[0] / 1e6:.2f}M"
                   f" | | {_fmt(*_stat(summ, 'spearman'), 2)} |")
    elif "test_time" in runs[0]:
      lines.append(f"| {label} | fixed depth {runs[0]['N_r']} | {_fmt(*_stat(summ, 'err_train'))}"
                   f" | {runs[0]['N_r']} | "
                   f"{_stat(summ, 'inference_flops_per_token')[0] / 1e6:.2f}M | | |")
    for th in runs[0].get("kl_exit", {}):
      any_kl = True
      ex = [r["kl_exit"][th] for r in runs]
      err = [_mean_over(e["error"], ks) for e in ex]
      md = [np.mean([_k(e["mean_depth"], k) for k in ks]) for e in ex]
      sp = [e["spearman"] for e in ex]
      lines.append(f"| {label} | KL < {th} | {_fmt(np.mean(err), np.ptp(err))} | "
                   f"{np.mean(md):.2f} | {np.mean([e['flops_per_token'] for e in ex]) / 1e6:.2f}M"
                   f" | {np.mean([e['kl_overhead_flops_per_token'] for e in ex]) / 1e6:.2f}M"
                   f" | {_fmt(*_nan_stat(sp), 2)} |")
    cached = [r["kl_exit_cached"] for r in runs if "kl_exit_cached" in r]
    if cached:
      lines.append(f"| {label} | KL < {cached[0]['threshold']}, cached token-by-token decoding "
                   f"({cached[0]['rows']} rows) | {100 * np.mean([c['error'] for c in cached]):.1f}"
                   f" (all k) | {np.mean([c['mean_depth'] for c in cached]):.2f} | depths equal "
                   f"the full pass: {all(c['depths_equal'] for c in cached)}; max logit diff "
                   f"{max(c['max_abs_logit_diff'] for c in cached):.1e} | | |")
  return lines if any_kl else lines[:1] + ["(no KL-exit evaluation in these rows)"]


def runs_csv(rows: Sequence[dict]) -> str:
  summ = [run_summary(r) for r in rows]
  cols = list(dict.fromkeys(k for s in summ for k in s))
  buf = io.StringIO()
  w = csv.DictWriter(buf, cols, lineterminator="\n")
  w.writeheader()
  w.writerows(summ)
  return buf.getvalue()


def table_csv(rows: Sequence[dict]) -> str:
  by = _by_row(rows)
  keys = list(dict.fromkeys(k for runs in by.values() for r in runs for k in r
                            if isinstance(r[k], float) and k not in ("seed",)))
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["row", "seeds"] + [c for k in keys for c in (k, f"{k}_spread")])
  for n, runs in by.items():
    w.writerow([n, len(runs)] + [f"{v:.6g}" for k in keys for v in _stat(runs, k)])
  return buf.getvalue()


def write(rows: Sequence[dict], runs: Sequence[sweep.Run], root: str, out_dir: str,
          stem: str, task: str) -> list[str]:
  """RESULTS/STEM.md, STEM.csv, STEM_runs.csv and the plots; returns the paths."""
  if not rows:
    print("[depth] no finished runs to report")
    return []
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, text in ((f"{stem}.md", markdown(rows, task)), (f"{stem}.csv", table_csv(rows)),
                     (f"{stem}_runs.csv", runs_csv(rows))):
    paths.append(os.path.join(out_dir, name))
    with open(paths[-1], "w") as f:
      f.write(text)
  paths += plots.plot_depth_task(rows, out_dir, stem)
  for p in paths:
    print(f"wrote {p}")
  return paths
