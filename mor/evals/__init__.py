"""Evaluation: held-out NLL, and zero/few-shot multiple-choice and cloze tasks.

  heldout_nll(model, data.eval_batches(n), routing="causal")
  evaluate_tasks(model, tokenizer, ["hellaswag", "piqa"], num_fewshot=0, routing="causal")

routing="causal" is each model's inference-time routing; "topk" is the
reference's evaluation (top-k routing over the full sequence), for comparison.
"""
from mor.evals.harness import (Request, encode_requests, evaluate_items, evaluate_tasks,
                               fewshot_prefixes, score_requests)
from mor.evals.nll import ROUTINGS, heldout_nll, row_scores
from mor.evals.tasks import TASKS, Item, TaskDataMissing, fewshot_pool, load_jsonl, load_task

__all__ = ["ROUTINGS", "TASKS", "Item", "Request", "TaskDataMissing", "encode_requests",
           "evaluate_items", "evaluate_tasks", "fewshot_pool", "fewshot_prefixes", "heldout_nll",
           "load_jsonl", "load_task", "row_scores", "score_requests"]
