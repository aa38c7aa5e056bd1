"""Evaluate a finished run from its workdir: held-out NLL and task accuracies per routing."""
from __future__ import annotations

from mor.analysis import load_run
from mor.evals.harness import evaluate_tasks
from mor.evals.nll import ROUTINGS, heldout_nll

LABELS = {"causal": "causal", "topk": "topk_reference"}


def evaluate_run(workdir: str, tasks: list[str], *, routings=("causal",), limit=None,
                 num_fewshot=0, batch_size=16, max_len=None, heldout_batches=-1, root=None,
                 data=None) -> dict:
  """A JSON-ready report; `data` defaults to the run's `mor.data.make_data`."""
  from mor.data import make_data
  for r in routings:
    if r not in ROUTINGS:
      raise ValueError(f"--routing={r!r}; choose from {', '.join(ROUTINGS)}")
  model, cfg, step = load_run(workdir)
  data = data if data is not None else make_data(cfg.data, cfg.model.vocab_size)
  n_heldout = cfg.train.eval_batches if heldout_batches < 0 else heldout_batches
  out = {"workdir": workdir, "step": step, "model_kind": cfg.model.kind,
         "num_fewshot": num_fewshot, "limit": limit, "heldout": {}, "tasks": {}}
  batches = data.eval_batches(n_heldout) if n_heldout else []
  for r in routings:
    if batches:
      out["heldout"][LABELS[r]] = heldout_nll(model, batches, routing=r)
    if tasks:
      out["tasks"][LABELS[r]] = evaluate_tasks(
          model, data.tokenizer, tasks, num_fewshot=num_fewshot, limit=limit, routing=r,
          batch_size=batch_size, max_len=max_len, root=root)
  return out
