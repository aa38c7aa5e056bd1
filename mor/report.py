"""Results tables in the paper's columns, with seeds and the recursion controls, as CSV and Markdown.

One table row per configuration (`row`), aggregated over its seeds: the mean
and the spread (max - min over seeds) of held-out NLL with each model's causal
routing; for recursive and MoR rows the NLL with every shared recursion skipped
(same weights, prefix and suffix only) and the recursion contribution
(skipped minus full); the reference's top-k NLL (MoR only, labelled); each
task's accuracy (%) and their average. FLOPs are in the runs' budget convention
(default the paper's: forward FLOPs).

`ordering(rows, a, b)` calls an order between two rows only where the gap of the
means exceeds the larger of their spreads; otherwise it says "tie".
"""
from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np

# The paper's accuracy tasks; lives here (not in mor.sweep) so report never imports sweep.
DEFAULT_TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge",
                 "mmlu")

LABELS = {"vanilla": "Vanilla", "recursive": "Recursive", "moe": "MoE (matched FLOPs)"}
BASE_COLUMNS = ("model", "N_r", "unique_params", "flops", "tokens", "seeds", "nll_causal",
                "nll_causal_spread", "nll_skip", "recursion_gain", "recursion_gain_spread",
                "nll_topk_reference")
RUN_COLUMNS = ("name", "row", "seed", "step", "flops", "tokens", "nll_causal", "nll_skip",
               "recursion_gain", "nll_topk_reference")


def model_label(row: dict) -> str:
  """A readable row name, e.g. 'MoR expert-choice (mor_ec3)'."""
  name = row.get("row") or row["name"]
  base = name.split(":")[0]
  if base == "vanilla_unshared":
    return f"Control: vanilla, unshared layers only ({name})"
  if row["kind"] == "mor":
    kind = "MoR token-choice" if "_tc" in base else "MoR expert-choice"
    kind += ", KV sharing" if "share" in base else ""
    return f"{kind} ({name})"
  return f"{LABELS.get(row['kind'], row['kind'])} ({name})"


def columns(tasks: Sequence[str] = DEFAULT_TASKS) -> list[str]:
  return [*BASE_COLUMNS, *(f"acc_{t}" for t in tasks), "acc_average", "note"]


def _stats(values: list) -> tuple:
  vals = [v for v in values if v != "" and v is not None]
  if not vals:
    return "", ""
  return float(np.mean(vals)), float(np.max(vals) - np.min(vals))


def group(rows: Sequence[dict]) -> dict[str, list[dict]]:
  """Runs by table row, in first-seen order."""
  out: dict[str, list[dict]] = {}
  for r in rows:
    out.setdefault(r.get("row") or r["name"], []).append(r)
  return out


def table_rows(rows: Sequence[dict], tasks: Sequence[str] = DEFAULT_TASKS) -> list[dict]:
  """One flat dict per table row (mean and spread over its seeds); missing values are ''."""
  out = []
  for name, runs in group(rows).items():
    first = runs[0]
    causal = _stats([r["heldout"].get("causal", "") for r in runs])
    skip = _stats([r["heldout"].get("skip", "") for r in runs])
    gain = _stats([r.get("recursion_gain", "") for r in runs])
    flat = {"model": model_label(first), "N_r": first["num_recursions"],
            "unique_params": first["unique_params"],
            "flops": float(np.mean([r["flops"] for r in runs])),
            "tokens": float(np.mean([r["tokens"] for r in runs])), "seeds": len(runs),
            "nll_causal": causal[0], "nll_causal_spread": causal[1], "nll_skip": skip[0],
            "recursion_gain": gain[0], "recursion_gain_spread": gain[1],
            "nll_topk_reference": _stats([r["heldout"].get("topk", "") for r in runs])[0],
            "note": "; ".join(sorted({r.get("note", "") for r in runs if r.get("note")}))}
    for t in (*tasks, "average"):
      v = _stats([r["tasks"].get(t, "") for r in runs])[0]
      flat[f"acc_{t}"] = "" if v == "" else 100 * v
    out.append(flat)
  return out


def order_by_spread(a: str, a_values: Sequence[float], b: str, b_values: Sequence[float]) -> str:
  """'a < b', 'a > b' or 'tie': an order only where the gap of the means exceeds the larger
  spread (max - min over seeds) of the two; the one rule every table here calls orders by."""
  spread = lambda v: float(np.max(v) - np.min(v))
  return _order(a, b, float(np.mean(a_values) - np.mean(b_values)),
                max(spread(a_values), spread(b_values)))


def _order(a: str, b: str, gap: float, spread: float) -> str:
  if abs(gap) <= spread:
    return "tie"
  return f"{a} < {b}" if gap < 0 else f"{a} > {b}"


def ordering(rows: Sequence[dict], a: str, b: str, key: str = "nll_causal") -> str:
  """'a < b', 'a > b' (lower NLL is better) or 'tie' where the gap is within the seed spread."""
  flat = {r["model"]: r for r in table_rows(rows)}
  pick = lambda n: next(v for k, v in flat.items() if k.endswith(f"({n})"))
  ra, rb = pick(a), pick(b)
  return _order(a, b, ra[key] - rb[key], max(ra[f"{key}_spread"], rb[f"{key}_spread"]))


def to_csv(rows: Sequence[dict], tasks: Sequence[str] = DEFAULT_TASKS) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, columns(tasks), lineterminator="\n")
  w.writeheader()
  w.writerows(table_rows(rows, tasks))
  return buf.getvalue()


def runs_csv(rows: Sequence[dict]) -> str:
  """Every run (seed) on its own line: the numbers the table aggregates."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, RUN_COLUMNS, lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({"name": r["name"], "row": r.get("row") or r["name"], "seed": r.get("seed", 0),
                "step": r["step"], "flops": r["flops"], "tokens": r["tokens"],
                "nll_causal": r["heldout"].get("causal", ""),
                "nll_skip": r["heldout"].get("skip", ""),
                "recursion_gain": r.get("recursion_gain", ""),
                "nll_topk_reference": r["heldout"].get("topk", "")})
  return buf.getvalue()


def _fmt(col: str, v) -> str:
  if v == "" or v is None:
    return ""
  if col == "unique_params":
    return f"{v / 1e6:.2f}M"
  if col == "flops":
    return f"{v:.3g}"
  if col == "tokens":
    return f"{v / 1e6:.2f}M" if v >= 1e5 else str(int(v))
  if col.startswith("nll") or col.startswith("recursion_gain"):
    return f"{v:.4f}"
  if col.startswith("acc"):
    return f"{v:.1f}"
  return str(v)


HEADINGS = {"unique_params": "unique params (non-emb.)", "flops": "FLOPs (fwd, paper conv.)",
            "nll_causal": "NLL (causal), mean", "nll_causal_spread": "spread",
            "nll_skip": "NLL, recursions skipped", "recursion_gain": "recursion contribution",
            "recursion_gain_spread": "spread ",
            "nll_topk_reference": "NLL (top-k, reference eval)", "acc_average": "avg acc"}


def to_markdown(rows: Sequence[dict], tasks: Sequence[str] = DEFAULT_TASKS) -> str:
  """A GitHub table; columns that are empty in every row are dropped, notes go below."""
  flat = table_rows(rows, tasks)
  cols = [c for c in columns(tasks) if c != "note" and any(f[c] != "" for f in flat)]
  lines = ["| " + " | ".join(HEADINGS.get(c, c.replace("acc_", "")) for c in cols) + " |",
           "| " + " | ".join("---" for _ in cols) + " |"]
  lines += ["| " + " | ".join(_fmt(c, f[c]) for c in cols) + " |" for f in flat]
  lines += ["", "spread: max - min over seeds (each seed: its own initialisation and data "
            "order). recursion contribution: held-out NLL with every shared recursion skipped "
            "minus the full model's (causal routing), same weights."]
  notes = sorted({f["note"] for f in flat if f["note"]})
  lines += [f"Note: {n}" for n in notes]
  return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict], out_dir: str, stem: str = "table",
                 tasks: Sequence[str] = DEFAULT_TASKS) -> tuple[str, ...]:
  """Writes OUT_DIR/STEM.csv, STEM.md and STEM_runs.csv (per seed); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = (os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.md"),
           os.path.join(out_dir, f"{stem}_runs.csv"))
  for path, text in zip(paths, (to_csv(rows, tasks), to_markdown(rows, tasks), runs_csv(rows))):
    with open(path, "w") as f:
      f.write(text)
  return paths
