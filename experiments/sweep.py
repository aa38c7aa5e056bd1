"""A FLOP-matched sweep of any of the paper's variants (and the MoE baseline).

  python -m experiments.sweep --variants vanilla,mor_ec3,moe --scale cpu --budget 1e12 \
      --root runs/sweep --tasks hellaswag,piqa --limit 40

Any config field is swept by naming it after the variant, e.g. the gate scale alpha and the
combine rule:
  --variants mor_ec3:model.router.alpha=0.1,mor_ec3:model.router.alpha=1.0,\
mor_ec3:model.router.combine=straight_through
Budgets count FLOPs in each run's train.flop_convention (default: the paper's forward FLOPs).

Each run trains in ROOT/NAME and resumes (finished runs are skipped); results go to
RESULTS/STEM.{csv,md} (STEM: --stem, default sweep_SCALE) and loss plots. Multi-host
launching: see mor/sweep.py.
"""
from __future__ import annotations

from absl import app, flags, logging

from mor import config, distributed, presets, sweep

_VARIANTS = flags.DEFINE_list("variants", ["vanilla", "mor_ec3"],
                              f"Any of {', '.join(presets.VARIANTS)}, moe.")
_SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "135m", "360m", "730m", "1.7b"], "Size.")
_BUDGET = flags.DEFINE_float("budget", 0.0, "FLOPs per run (paper convention: forward); 0 = the "
                             "scale's default.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Runs per variant (init and data order).")
_ROOT = flags.DEFINE_string("root", "runs/sweep", "Workdirs root.")
_RESULTS = flags.DEFINE_string("results", "results", "Folder for tables and plots.")
_STEM = flags.DEFINE_string("stem", "", "Name of the results files; '' = sweep_SCALE.")
_TASKS = flags.DEFINE_list("tasks", [], "Tasks (e.g. lambada,hellaswag); empty = NLL only.")
_LIMIT = flags.DEFINE_integer("limit", 40, "Items per task (MMLU: limit/20 per subject).")
_HELDOUT = flags.DEFINE_integer("heldout_batches", sweep.HELDOUT_BATCHES,
                                "Held-out batches per evaluation (as experiments.reproduce).")
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Train only (e.g. on every cluster host).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate finished runs; train nothing.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    runs = sweep.variant_sweep(_VARIANTS.value, _SCALE.value, _BUDGET.value or None,
                               _SEEDS.value)
  except config.ConfigError as e:
    raise app.UsageError(str(e)) from None
  distributed.initialize()
  tasks = [t for t in _TASKS.value if t]
  out = sweep.run(runs, _ROOT.value, evaluate=not _SKIP_EVAL.value,
                  train_runs=not _EVAL_ONLY.value, tasks=tasks, limit=_LIMIT.value or None,
                  heldout_batches=_HELDOUT.value)
  sweep.write_results(runs, _ROOT.value, out["rows"], _RESULTS.value,
                      _STEM.value or f"sweep_{_SCALE.value}", tasks)


if __name__ == "__main__":
  app.run(main)
