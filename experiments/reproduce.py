"""The paper's tables at matched FLOPs: python -m experiments.reproduce --scale cpu [--table NAME].

  --table main                 the paper's main table (Table 3) plus the unshared-layers control
  --table sharing              sharing strategies (cycle / sequence / middle-cycle /
                               middle-sequence), recursive N_r = 3, plus the control
  --table kv                   KV caching vs KV sharing, expert- and token-choice, plus the control
  --scale cpu                  the CPU scale (mor.config.CPU_*), 2 seeds per row, about an hour
                               for the main table on 2 idle cores
  --scale paper --size 360m    the paper's settings (16.5e18 forward FLOPs); prints the plan
                               unless --run

Budgets count FLOPs in the paper's convention (forward FLOPs; train.flop_convention).
Writes RESULTS/STEM.{csv,md}, STEM_runs.csv (every seed) and loss_vs_{flops,tokens}_STEM.png,
STEM = reproduce_SCALE for the main table, TABLE_SCALE otherwise. Re-running resumes
(finished runs are skipped, evaluations cached). Multi-host launching: see mor/sweep.py.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

from mor import config, distributed, sweep

_SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "CPU-sized or paper-sized runs.")
_SIZE = flags.DEFINE_enum("size", "360m", ["135m", "360m", "730m", "1.7b"], "Paper size.")
_TABLE = flags.DEFINE_enum("table", "main", list(sweep.TABLES), "Which of the paper's tables.")
_SEEDS = flags.DEFINE_integer("seeds", 0, "Runs per row (init and data order); 0 = the scale's.")
_ROOT = flags.DEFINE_string("root", "", "Workdirs root; '' = runs/STEM.")
_RESULTS = flags.DEFINE_string("results", "results", "Folder for tables and plots.")
_BUDGET = flags.DEFINE_float("budget", 0.0, "Forward (paper-convention) FLOPs per run; 0 = the "
                             "scale's default.")
_LIMIT = flags.DEFINE_integer("limit", 40, "Items per task (MMLU: limit/20 per subject).")
_TASKS = flags.DEFINE_list("tasks", [], "Tasks (e.g. lambada,hellaswag); empty = NLL only.")
_HELDOUT = flags.DEFINE_integer("heldout_batches", sweep.HELDOUT_BATCHES,
                                "Held-out batches per evaluation.")
_RUN = flags.DEFINE_bool("run", False, "At paper scale: train (default: print the plan).")
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Train only (e.g. on every cluster host).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate finished runs; train nothing.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  scale = "cpu" if _SCALE.value == "cpu" else _SIZE.value
  try:
    runs = sweep.reproduce_sweep(scale, _BUDGET.value or None, _SEEDS.value or None, _TABLE.value)
  except config.ConfigError as e:
    raise app.UsageError(str(e)) from None
  for row in sweep.plan(runs):
    print(json.dumps(row))
  if scale != "cpu" and not _RUN.value and not _EVAL_ONLY.value:
    print("plan only: add --run to train (on a cluster; see mor/sweep.py)")
    return
  distributed.initialize()
  stem = f"reproduce_{scale}" if _TABLE.value == "main" else f"{_TABLE.value}_{scale}"
  root = _ROOT.value or f"runs/{stem}"
  tasks = [t for t in _TASKS.value if t]
  out = sweep.run(runs, root, evaluate=not _SKIP_EVAL.value, train_runs=not _EVAL_ONLY.value,
                  tasks=tasks, limit=_LIMIT.value or None, heldout_batches=_HELDOUT.value)
  sweep.write_results(runs, root, out["rows"], _RESULTS.value, stem, tasks)


if __name__ == "__main__":
  app.run(main)
