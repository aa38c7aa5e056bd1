"""Depth tasks at equal FLOPs: python -m experiments.depth_tasks --task hops [--seeds 2].

Trains the table's rows, mor.depth.TABLE_ROWS (vanilla with the unique layers, vanilla
with the applied depth, the recursive model, MoR expert- and token-choice), or any rows of
mor.depth.ROWS (--rows, --name: the router study's variants), on a generated task with
known per-token difficulty, for equal steps (or one forward-FLOP budget), seed by seed
(all rows of seed 0 first); then scores each run per difficulty (error, routed
depth, recursion contribution, test-time depth, KL exit) and writes
RESULTS/TASK_cpu.{md,csv}, TASK_cpu_runs.csv and plots. Finished runs are skipped and
evaluations cached, so the table can be built over several sittings; a killed run
resumes from its last checkpoint.
"""
from __future__ import annotations

from absl import app, flags, logging

from mor import config, depth, depth_report, sweep

_TASK = flags.DEFINE_enum("task", "hops", list(config.TASKS), "Which depth task.")
_ROWS = flags.DEFINE_list("rows", list(depth.TABLE_ROWS),
                          f"Rows, any of {', '.join(depth.ROWS)}.")
_NAME = flags.DEFINE_string("name", "", "Table name (files RESULTS/NAME.md, runs/NAME); "
                            "'' = TASK_cpu.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per row (initialisation and data order).")
_BUDGET = flags.DEFINE_float("budget", 0.0, "Forward FLOPs per run; 0 = the task's default.")
_ROOT = flags.DEFINE_string("root", "", "Workdirs root; '' = runs/TASK_cpu.")
_RESULTS = flags.DEFINE_string("results", "results", "Folder for tables and plots.")
_BATCHES = flags.DEFINE_integer("eval_batches", 16, "Held-out batches per evaluation.")
_THRESHOLDS = flags.DEFINE_list("kl_thresholds", ["0.01", "0.1", "0.5"],
                                "KL-exit thresholds (nats) to compare; empty = none.")
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Train only.")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate finished runs; train nothing.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    runs = depth.depth_sweep(_TASK.value, _ROWS.value, _SEEDS.value, _BUDGET.value or None)
    thresholds = [float(t) for t in _THRESHOLDS.value if t]
  except (config.ConfigError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  runs = sorted(runs, key=lambda r: r.seed)   # a first sitting gives every row one seed
  stem = _NAME.value or f"{_TASK.value}_cpu"
  root = _ROOT.value or f"runs/{stem}"
  if not _EVAL_ONLY.value:
    sweep.train_all(runs, root)
  if not _SKIP_EVAL.value:
    rows = depth.evaluate_all(runs, root, _BATCHES.value, thresholds)
    depth_report.write(rows, runs, root, _RESULTS.value, stem, _TASK.value)


if __name__ == "__main__":
  app.run(main)
