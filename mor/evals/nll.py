"""Masked token log-likelihoods of any model, and held-out NLL / perplexity.

`row_scores` is the one jitted forward every evaluation goes through: a pure
function of (graphdef, state, batch) with the graph definition and the routing
mode static, so it compiles once per batch shape and model. The model runs in
eval mode (`nnx.Module.eval()`: no MoE router noise, the eval capacity factor)
whatever mode the caller's model is in; the caller's model is not changed.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROUTINGS = ("causal", "topk")


def check_routing(routing: str) -> str:
  if routing not in ROUTINGS:
    raise ValueError(f"routing={routing!r}; choose causal (inference-time routing) or topk "
                     "(the reference's top-k routing over the full sequence)")
  return routing


def skip_recursions_logits(model: nnx.Module, tokens_BxS: jax.Array) -> jax.Array:
  """Logits of a recursive or MoR model with every shared recursion skipped.

  Embedding, the plan's unshared prefix and suffix blocks, final norm, head: the
  control that says what the shared recursions add (for cycle or sequence
  sharing, with no unshared blocks, only embedding and head remain).
  """
  from mor.models.transformer import default_positions
  if model.cfg.kind not in ("recursive", "mor"):
    raise ValueError(f"skip_recursions needs a recursive or mor model, got {model.cfg.kind!r}")
  pos_BxS = default_positions(tokens_BxS)
  x = model.embed_tokens(tokens_BxS)
  for b in (*model.plan.prefix, *model.plan.suffix):
    x = model.apply_block(b, x, pos_BxS)[0]
  return model.logits(x)


@functools.partial(jax.jit, static_argnames=("graphdef", "routing", "skip"))
def _row_scores(graphdef, state, inputs_BxS, targets_BxS, mask_BxS, routing, skip=False):
  model = nnx.merge(graphdef, state, copy=True)  # a private copy: eval() must not leak out
  model.eval()
  if skip:
    logits_BxSxV = skip_recursions_logits(model, inputs_BxS)
  else:
    logits_BxSxV, _, _ = model(inputs_BxS, routing=routing)
  logp_BxS = -optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, targets_BxS)
  greedy_BxS = jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS
  m_BxS = mask_BxS.astype(jnp.float32)
  return {"logprob": (logp_BxS * m_BxS).sum(1),
          "greedy": jnp.all(greedy_BxS | ~mask_BxS.astype(bool), axis=1),
          "tokens": m_BxS.sum(1)}


def row_scores(model_or_split, inputs_BxS, targets_BxS, mask_BxS,
               routing: str = "causal", skip_recursions: bool = False) -> dict[str, np.ndarray]:
  """Per row: sum of log p(target) over masked positions, all-greedy flag, token count.

  model_or_split is an NNX model or its `nnx.split(model)` pair (split once and
  reuse it in loops: splitting walks the whole graph).
  """
  graphdef, state = (nnx.split(model_or_split) if isinstance(model_or_split, nnx.Module)
                     else model_or_split)
  out = _row_scores(graphdef, state, jnp.asarray(inputs_BxS, jnp.int32),
                    jnp.asarray(targets_BxS, jnp.int32), jnp.asarray(mask_BxS, bool),
                    check_routing(routing), bool(skip_recursions))
  return {k: np.asarray(v) for k, v in out.items()}


def heldout_nll(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]],
                routing: str = "causal", skip_recursions: bool = False) -> dict:
  """Token-weighted mean NLL (nats/token) and perplexity over held-out batches.

  Batches are `Data.eval_batches` dicts with `inputs` and `targets` [B, S]; an
  optional `mask` [B, S] (1 = count the token) excludes padding.
  skip_recursions: score the model with its shared recursions removed
  (`skip_recursions_logits`), the control for what recursion adds.
  """
  split = nnx.split(model)
  total, count = 0.0, 0.0
  for b in batches:
    mask = b.get("mask")
    mask = np.ones(np.shape(b["targets"]), bool) if mask is None else mask
    r = row_scores(split, b["inputs"], b["targets"], mask, routing, skip_recursions)
    total -= float(r["logprob"].astype(np.float64).sum())
    count += float(r["tokens"].sum())
  if count == 0:
    raise ValueError("heldout_nll got no tokens; pass at least one non-empty batch")
  nll = total / count
  return {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": int(count)}
