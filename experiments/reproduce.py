"""The paper's main table at matched FLOPs: python -m experiments.reproduce --scale cpu.

  --scale cpu                  eight tiny runs, ~30 min on 2 idle CPU cores (default budget)
  --scale paper --size 360m    the paper's settings (16.5e18 FLOPs); prints the plan unless --run

Writes RESULTS/reproduce_SCALE.{csv,md} and loss_vs_{flops,tokens}_reproduce_SCALE.png. Re-running
resumes (finished runs are skipped). Multi-host launching: see mor/sweep.py.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

from mor import distributed, sweep

_SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "CPU-sized or paper-sized runs.")
_SIZE = flags.DEFINE_enum("size", "360m", ["135m", "360m", "730m", "1.7b"], "Paper size.")
_ROOT = flags.DEFINE_string("root", "", "Workdirs root; '' = runs/reproduce[_SIZE].")
_RESULTS = flags.DEFINE_string("results", "results", "Folder for tables and plots.")
_BUDGET = flags.DEFINE_float("budget", 0.0, "Training FLOPs per run; 0 = the scale's default.")
_LIMIT = flags.DEFINE_integer("limit", 40, "Items per task (MMLU: limit/20 per subject).")
_TASKS = flags.DEFINE_list("tasks", list(sweep.DEFAULT_TASKS), "Tasks; empty = NLL only.")
_RUN = flags.DEFINE_bool("run", False, "At paper scale: train (default: print the plan).")
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Train only (e.g. on every cluster host).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate finished runs; train nothing.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  scale = "cpu" if _SCALE.value == "cpu" else _SIZE.value
  runs = sweep.reproduce_sweep(scale, _BUDGET.value or None)
  for row in sweep.plan(runs):
    print(json.dumps(row))
  if scale != "cpu" and not _RUN.value and not _EVAL_ONLY.value:
    print("plan only: add --run to train (on a cluster; see mor/sweep.py)")
    return
  distributed.initialize()
  root = _ROOT.value or ("runs/reproduce" if scale == "cpu" else f"runs/reproduce_{scale}")
  tasks = [t for t in _TASKS.value if t]
  out = sweep.run(runs, root, evaluate=not _SKIP_EVAL.value, train_runs=not _EVAL_ONLY.value,
                  tasks=tasks, limit=_LIMIT.value or None)
  sweep.write_results(runs, root, out["rows"], _RESULTS.value, f"reproduce_{scale}", tasks)


if __name__ == "__main__":
  app.run(main)
