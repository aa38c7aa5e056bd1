"""Loading finished runs and looking inside them: routing depth, router scores, expert load.

The recursion-depth notebook (notebooks/recursion_depth.ipynb) is a thin
caller of these functions. Everything works without a tokenizer (runs trained
on in-memory arrays): text is then shown as token ids.
"""
from __future__ import annotations

import html
import os
from typing import Sequence

import jax
import numpy as np

from mor import checkpoint, config, interop, metrics as metrics_lib, train

DEPTH_COLORS = ("#f0f0f0", "#c6dbef", "#6baed6", "#2171b5", "#08306b", "#000000")
TOKEN_KINDS = ("word_start", "punctuation", "digit", "other")


def load_run(workdir: str, step: int | None = None):
  """(model, cfg, step) from the newest (or the given step's) checkpoint, writing nothing."""
  saved = checkpoint.read_config(workdir)
  cfg = config.from_dict(saved)
  s = train.setup(cfg)
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    shapes = jax.eval_shape(s.init, jax.random.key(0))
    if step is None:
      # compare against the saved dict itself: a JSON round trip turns tuples into lists
      state, meta = checkpoint.restore_latest(mngr, shapes, s.state_shardings, saved)
    else:
      import orbax.checkpoint as ocp
      state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
          checkpoint.abstract_like(shapes, s.state_shardings)))).state
      meta = {"step": step}
  finally:
    mngr.close()
  return train.model_from_state(s, state), cfg, int(meta["step"])


def export_checkpoint(workdir: str, folder: str, dtype: str = "float32") -> None:
  """Exports the newest training checkpoint of a workdir (mor.train.run) to Llama format.

  Lives here, above the trainer, so that mor.interop (below it) never imports mor.train.
  """
  interop.export_llama(load_run(workdir)[0], folder, dtype)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints kept in workdir, oldest first."""
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    return sorted(int(x) for x in mngr.all_steps())
  finally:
    mngr.close()


def contribution_curve(workdir: str, batches) -> list[dict]:
  """What the shared recursions add as training goes on, at every kept checkpoint.

  One dict per step: tokens seen, held-out NLL of the full model (causal routing),
  with every recursion skipped (prefix and suffix only), and their difference.
  """
  from mor.evals.nll import heldout_nll
  out = []
  for step in checkpoint_steps(workdir):
    model, cfg, _ = load_run(workdir, step)
    full = heldout_nll(model, batches, routing="causal")["nll"]
    skip = heldout_nll(model, batches, skip_recursions=True)["nll"]
    out.append({"step": step, "tokens": step * cfg.data.batch_size * cfg.data.seq_len,
                "causal": full, "skip": skip, "gain": skip - full})
  return out


def load_tokenizer(cfg: config.Config):
  """The run's tokenizer, or None when it cannot be rebuilt (e.g. array-trained runs)."""
  try:
    from mor.data import make_data
    return make_data(cfg.data, cfg.model.vocab_size)
  except Exception:  # no corpus here, or a corpus-free run: fall back to token ids
    return None


def is_mor(cfg: config.Config) -> bool:
  return cfg.model.kind == "mor"


def depths(model, tokens_BxS: np.ndarray, routing: str = "causal") -> np.ndarray:
  """Recursion depth of each token (0..N_r) under the given routing."""
  return np.asarray(model.routing_decisions(np.asarray(tokens_BxS, np.int32), routing=routing))


def pieces(tokenizer, ids: Sequence[int]) -> list[str]:
  """Display strings per token: SentencePiece pieces, or the ids themselves."""
  if tokenizer is None:
    return [f"{int(i)} " for i in ids]
  return [tokenizer.id_to_piece(int(i)).replace("\u2581", " ") for i in ids]


def token_kind(piece: str) -> str:
  core = piece.strip()
  if core and all(not c.isalnum() for c in core):
    return "punctuation"
  if any(c.isdigit() for c in core):
    return "digit"
  if piece.startswith(" "):
    return "word_start"
  return "other"


def depth_html(toks: Sequence[str], depth_S: np.ndarray, n_r: int) -> str:
  """Tokens as HTML spans shaded by depth (darker = more recursions), with a legend."""
  def color(d):
    return DEPTH_COLORS[min(int(d), len(DEPTH_COLORS) - 1)]
  spans = []
  for t, d in zip(toks, depth_S):
    fg = "white" if d >= 3 else "black"
    spans.append(f'<span title="depth {int(d)}" style="background:{color(d)};color:{fg};'
                 f'white-space:pre">{html.escape(t)}</span>')
  legend = " ".join(f'<span style="background:{color(d)};color:{"white" if d >= 3 else "black"}">'
                    f"&nbsp;depth {d}&nbsp;</span>" for d in range(1, n_r + 1))
  return (f'<div style="font-family:monospace;line-height:1.6">{legend}<br><br>'
          f'{"".join(spans)}</div>')


def depth_by_position(depth_BxS: np.ndarray, n_r: int, bins: int = 8) -> np.ndarray:
  """[bins, N_r + 1] fraction of tokens at each depth, per position bin."""
  s = depth_BxS.shape[1]
  edges = np.linspace(0, s, bins + 1).astype(int)
  out = np.zeros([bins, n_r + 1])
  for i in range(bins):
    d = depth_BxS[:, edges[i]:edges[i + 1]].ravel()
    out[i] = np.bincount(d, minlength=n_r + 1)[: n_r + 1] / max(d.size, 1)
  return out


def depth_by_kind(depth_BxS: np.ndarray, tokens_BxS: np.ndarray, tokenizer,
                  n_r: int) -> dict[str, np.ndarray]:
  """{kind: fraction of tokens at each depth}; kind from the token's text (ids: 'other')."""
  kinds = np.array([[token_kind(p) for p in pieces(tokenizer, row)] for row in tokens_BxS]
                   if tokenizer is not None else np.full(tokens_BxS.shape, "other"))
  out = {}
  for k in TOKEN_KINDS:
    d = depth_BxS[kinds == k]
    if d.size:
      out[k] = np.bincount(d, minlength=n_r + 1)[: n_r + 1] / d.size
  return out


def capacity_per_depth(depth_BxS: np.ndarray, cfg: config.Config) -> dict[str, np.ndarray]:
  """Realised fraction of tokens reaching each recursion vs the configured capacity."""
  n = cfg.model.num_recursions
  realised = np.array([(depth_BxS >= r).mean() for r in range(1, n + 1)])
  caps = cfg.model.router.capacities or tuple((n - r + 1) / n for r in range(1, n + 1))
  return {"realised": realised, "configured": np.asarray(caps, float)}


def routing_agreement(model, tokens_BxS: np.ndarray) -> dict:
  """How often causal (inference) and top-k (reference) routing give the same depth."""
  causal, topk = depths(model, tokens_BxS, "causal"), depths(model, tokens_BxS, "topk")
  n = int(max(causal.max(), topk.max()))
  confusion = np.zeros([n + 1, n + 1], int)
  np.add.at(confusion, (topk.ravel(), causal.ravel()), 1)
  return {"agreement": float((causal == topk).mean()), "confusion": confusion,
          "mean_depth_causal": float(causal.mean()), "mean_depth_topk": float(topk.mean())}


def router_scores(model, tokens_BxS: np.ndarray) -> list[np.ndarray]:
  """Router scores from one top-k (training-mode) forward pass.

  Expert-choice: sigmoid(logit) of the candidates at each recursion step (one
  array per step; step r's candidates are the tokens that reached it).
  Token-choice: one [tokens, N_r] array of the router's probabilities per depth.
  """
  from mor import routers as R
  captured = []
  if model.expert_choice:
    cls, name = R.ExpertChoiceRouter, "logit"
    grab = lambda out: np.asarray(jax.nn.sigmoid(out), np.float32).ravel()
  else:
    cls, name = R.TokenChoiceRouter, "__call__"
    grab = lambda out: np.asarray(out.scores_BxSxN, np.float32).reshape(-1, model.cfg.num_recursions)
  original = getattr(cls, name)

  def spy(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    captured.append(grab(out))
    return out

  setattr(cls, name, spy)   # eager forward: the spy sees concrete arrays
  try:
    model.routing_decisions(np.asarray(tokens_BxS, np.int32), routing="topk")
  finally:
    setattr(cls, name, original)
  return captured


def metric_series(workdir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metrics.jsonl key (vectors stay vectors)."""
  rows = [r for r in metrics_lib.read_metrics(workdir) if key in r]
  return (np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], float))


def expert_load(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{metric key: (steps, [T, E] tokens per expert)} for every MoE layer in metrics.jsonl."""
  rows = metrics_lib.read_metrics(workdir) if os.path.exists(
      os.path.join(workdir, "metrics.jsonl")) else []
  keys = sorted({k for r in rows for k in r if k.endswith("tokens_per_expert")})
  return {k: metric_series(workdir, k) for k in keys}


def sample_tokens(cfg: config.Config, n_rows: int = 8):
  """(tokens [n, S], targets [n, S], tokenizer or None) to analyse a run on.

  MOR_TOKENS=path.npy ([N, S + 1] int rows) skips the corpus (runs trained on
  arrays have no tokenizer); otherwise the run's held-out batches.
  """
  path = os.environ.get("MOR_TOKENS")
  if path:
    rows = np.load(path)[:n_rows]
    return rows[:, :-1].astype(np.int32), rows[:, 1:].astype(np.int32), None
  from mor.data import make_data
  data = make_data(cfg.data, cfg.model.vocab_size)
  b = data.eval_batches(max(1, -(-n_rows // cfg.data.batch_size)))
  inputs = np.concatenate([x["inputs"] for x in b])[:n_rows]
  targets = np.concatenate([x["targets"] for x in b])[:n_rows]
  return inputs, targets, data.tokenizer


def nll(model, inputs_BxS: np.ndarray, targets_BxS: np.ndarray, routing: str = "causal",
        max_depth: int | None = None) -> float:
  """Mean token NLL; max_depth (MoR causal routing) changes the number of recursions."""
  import optax
  kw = {} if max_depth is None else {"max_depth": max_depth}
  if is_mor_model(model):   # plain transformers take no routing argument
    kw["routing"] = routing
  logits = model(np.asarray(inputs_BxS, np.int32), **kw)[0]
  return float(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(np.float32), np.asarray(targets_BxS)).mean())


def is_mor_model(model) -> bool:
  return hasattr(model, "routing_decisions")


def nll_at_depths(model, inputs_BxS, targets_BxS, depths_: Sequence[int]) -> dict[int, float]:
  """Test-time depth scaling: causal-routing NLL when at most d recursions are allowed."""
  return {int(d): nll(model, inputs_BxS, targets_BxS, "causal", int(d)) for d in depths_}


def plot_depth_bars(fracs: dict | np.ndarray, title: str, xlabels=None):
  """Stacked bars: fraction of tokens at each depth, per group (position bin or kind)."""
  import matplotlib.pyplot as plt
  if isinstance(fracs, dict):
    xlabels, fracs = list(fracs), np.array(list(fracs.values()))
  fig, ax = plt.subplots(figsize=(7, 3))
  bottom = np.zeros(len(fracs))
  for d in range(fracs.shape[1]):
    ax.bar(range(len(fracs)), fracs[:, d], bottom=bottom, label=f"depth {d}",
           color=DEPTH_COLORS[min(d, len(DEPTH_COLORS) - 1)], edgecolor="grey")
    bottom += fracs[:, d]
  ax.set_xticks(range(len(fracs)), xlabels if xlabels is not None else range(len(fracs)))
  ax.set_ylabel("fraction of tokens")
  ax.set_title(title)
  ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
  fig.tight_layout()
  return fig
