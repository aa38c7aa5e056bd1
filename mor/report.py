"""Results tables in the paper's columns, as CSV and Markdown.

Columns: model, N_r, unique (non-embedding) parameters, training FLOPs, tokens,
held-out NLL with each model's causal routing, the reference's top-k NLL (MoR
only, labelled), each task's accuracy (%), and their average.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Sequence

# The paper's accuracy tasks; lives here (not in mor.sweep) so report never imports sweep.
DEFAULT_TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge",
                 "mmlu")

LABELS = {"vanilla": "Vanilla", "recursive": "Recursive", "moe": "MoE (matched FLOPs)"}
BASE_COLUMNS = ("model", "N_r", "unique_params", "flops", "tokens", "nll_causal",
                "nll_topk_reference")


def model_label(row: dict) -> str:
  """A readable row name, e.g. 'MoR expert-choice (mor_ec3)'."""
  name = row["name"]
  if row["kind"] == "mor":
    kind = "MoR token-choice" if "tc" in name else "MoR expert-choice"
    kind += ", KV sharing" if "share" in name else ""
    return f"{kind} ({name})"
  return f"{LABELS.get(row['kind'], row['kind'])} ({name})"


def columns(tasks: Sequence[str] = DEFAULT_TASKS) -> list[str]:
  return [*BASE_COLUMNS, *(f"acc_{t}" for t in tasks), "acc_average", "note"]


def table_rows(rows: Sequence[dict], tasks: Sequence[str] = DEFAULT_TASKS) -> list[dict]:
  """Flat dicts with the `columns`; missing values are ''."""
  out = []
  for r in rows:
    flat = {"model": model_label(r), "N_r": r["num_recursions"],
            "unique_params": r["unique_params"], "flops": r["flops"], "tokens": r["tokens"],
            "nll_causal": r["heldout"].get("causal", ""),
            "nll_topk_reference": r["heldout"].get("topk", ""), "note": r.get("note", "")}
    for t in (*tasks, "average"):
      v = r["tasks"].get(t)
      flat[f"acc_{t}"] = "" if v is None else 100 * v
    out.append(flat)
  return out


def to_csv(rows: Sequence[dict], tasks: Sequence[str] = DEFAULT_TASKS) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, columns(tasks), lineterminator="\n")
  w.writeheader()
  w.writerows(table_rows(rows, tasks))
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
  if col.startswith("nll"):
    return f"{v:.4f}"
  if col.startswith("acc"):
    return f"{v:.1f}"
  return str(v)


def to_markdown(rows: Sequence[dict], tasks: Sequence[str] = DEFAULT_TASKS) -> str:
  """A GitHub table; columns that are empty in every row are dropped, notes go below."""
  flat = table_rows(rows, tasks)
  cols = [c for c in columns(tasks) if c != "note" and any(f[c] != "" for f in flat)]
  head = {"unique_params": "unique params (non-emb.)", "nll_causal": "NLL (causal)",
          "nll_topk_reference": "NLL (top-k, reference eval)", "acc_average": "avg acc"}
  lines = ["| " + " | ".join(head.get(c, c.replace("acc_", "")) for c in cols) + " |",
           "| " + " | ".join("---" for _ in cols) + " |"]
  lines += ["| " + " | ".join(_fmt(c, f[c]) for c in cols) + " |" for f in flat]
  notes = sorted({f["note"] for f in flat if f["note"]})
  lines += [""] + [f"Note: {n}" for n in notes] if notes else []
  return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict], out_dir: str, stem: str = "table",
                 tasks: Sequence[str] = DEFAULT_TASKS) -> tuple[str, str]:
  """Writes OUT_DIR/STEM.csv and STEM.md; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = (os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.md"))
  with open(paths[0], "w") as f:
    f.write(to_csv(rows, tasks))
  with open(paths[1], "w") as f:
    f.write(to_markdown(rows, tasks))
  return paths
