"""Depth-task experiments: the table's rows, per-difficulty evaluation, test-time depth.

The testbed (mor.data.tasks) knows each token's difficulty, so a run is scored
per difficulty: error (argmax != answer) and NLL at each difficulty, the same
with every shared recursion skipped (the recursion contribution), each MoR
token's routed depth against its difficulty (mean per difficulty and Spearman),
the forward FLOPs the routing spent, test-time depth (more or fewer recursions
than trained, on difficulties up to data.task.eval_max_difficulty) and the
router-free KL exit (mor.exits). `results` turns the cached evaluations into the
tables; experiments/depth_tasks.py is the command.

Rows, all trained for the same steps on the same tokens (as the issue's pilot; each row's
FLOPs are reported), N_r = 3 with cycle sharing over 6 applied layers (a unit of 2 blocks
applied 3 times; no unique first/last layer, see docs/results.md for why):
  vanilla_unique   vanilla with the recursive model's 2 unique layers (equal parameters)
  vanilla_applied  vanilla with its 6 applied layers (equal depth and FLOPs per token)
  recursive        the plain recursive model
  mor_ec, mor_tc   MoR expert-choice (capacities 3/3, 2/3, 1/3) and token-choice
`depth_sweep(..., budget=B)` trains every row at one forward-FLOP budget instead.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats as scipy_stats

from mor import config as config_lib, flops as flops_lib, routers, sweep
from mor.config import Config, DataConfig, ModelConfig, RouterConfig, TaskConfig, TrainConfig

N_R = 3
LAYERS = 6
SHARING = "cycle"
TASK_MODEL = dict(vocab_size=64, d_model=128, num_heads=4, num_kv_heads=4, ffn_dim=384,
                  max_seq_len=64)
TASK_DATA = dict(seq_len=64, batch_size=32)
TASK_TRAIN = dict(lr=1e-3, schedule="wsd", warmup_frac=0.05, decay_frac=0.2, log_every=25,
                  eval_every=0, eval_batches=4, checkpoint_every=200, keep_checkpoints=1)
STEPS = {"hops": 1200, "assign": 1200}   # every row, equal tokens
_TC = {"routing": "token_choice", "gate": "softmax", "alpha": 1.0}
ROWS = {   # name -> (kind, layers, router overrides)
    "vanilla_unique": ("vanilla", LAYERS // N_R, {}),
    "vanilla_applied": ("vanilla", LAYERS, {}),
    "recursive": ("recursive", LAYERS, {}),
    "mor_ec": ("mor", LAYERS, {"routing": "expert_choice"}),
    "mor_tc": ("mor", LAYERS, _TC),
    # the router study (not in the default table): what the causal decision and the gate cost
    "mor_ec_aux_router": ("mor", LAYERS, {"routing": "expert_choice", "causal": "aux_router"}),
    "mor_ec_alpha1": ("mor", LAYERS, {"routing": "expert_choice", "alpha": 1.0}),
    "mor_ec_alpha1_aux_router": ("mor", LAYERS, {"routing": "expert_choice", "alpha": 1.0,
                                                 "causal": "aux_router"}),
    # token-choice with the depths given: each token's difficulty (capped at N_r), and the
    # control with another position's difficulty (same histogram); slots for 2x the mean
    "mor_tc_oracle": ("mor", LAYERS, dict(_TC, depth_from="difficulty", balance_coef=0.0,
                                          capacity_factor=2.0)),
    "mor_tc_shifted": ("mor", LAYERS, dict(_TC, depth_from="shifted_difficulty",
                                           balance_coef=0.0, capacity_factor=2.0)),
}
TABLE_ROWS = ("vanilla_unique", "vanilla_applied", "recursive", "mor_ec", "mor_tc")
LABELS = {"vanilla_unique": "Vanilla, unique layers only (2)",
          "vanilla_applied": "Vanilla, applied depth (6)",
          "recursive": "Recursive, cycle 2 x 3", "mor_ec": "MoR expert-choice N_r=3",
          "mor_tc": "MoR token-choice N_r=3",
          "mor_ec_aux_router": "MoR-EC, auxiliary router",
          "mor_ec_alpha1": "MoR-EC, gate alpha 1",
          "mor_ec_alpha1_aux_router": "MoR-EC, alpha 1, auxiliary router",
          "mor_tc_oracle": "MoR-TC, depth = difficulty (oracle)",
          "mor_tc_shifted": "MoR-TC, depth = another token's difficulty"}
EVAL_VERSION = 4


def row_config(task: str, row: str, **overrides) -> Config:
  """One row's config (overrides: sections as in config.replace, e.g. train={'lr': 2e-3})."""
  config_lib._choice("task", task, config_lib.TASKS)
  config_lib._choice("row", row, tuple(ROWS))
  kind, layers, router = ROWS[row]
  cfg = Config(model=ModelConfig(kind=kind, num_layers=layers, num_recursions=N_R,
                                 sharing=SHARING, router=RouterConfig(**router),
                                 **TASK_MODEL),
               data=DataConfig(corpus=f"task:{task}", task=TaskConfig(), **TASK_DATA),
               train=TrainConfig(steps=STEPS[task], **TASK_TRAIN))
  cfg = config_lib.validate(cfg)
  return config_lib.replace(cfg, **overrides) if overrides else cfg


def depth_sweep(task: str, rows: Sequence[str] = TABLE_ROWS, seeds: int = 2,
                budget: float | None = None, **overrides) -> list[sweep.Run]:
  """The table's runs, `seeds` seeds per row (train.seed = data.seed = K), all seed 0 first.

  Equal steps (STEPS) by default; budget: every row at that many forward FLOPs instead.
  """
  configs = [(r, row_config(task, r, **overrides)) for r in rows]
  if budget:
    runs = sweep.make_sweep(configs, budget, seeds)
  else:
    runs = [sweep.Run(f"{r}@s{k}", config_lib.replace(c, train={"seed": k}, data={"seed": k}),
                      r, k) for r, c in configs for k in range(seeds)]
  return sorted(runs, key=lambda r: r.seed)


# ---------------------------------------------------------------------------
# Evaluation
def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Rank correlation (ties averaged); nan when either side is constant."""
  a, b = np.ravel(a), np.ravel(b)
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float("nan")
  return float(scipy_stats.spearmanr(a, b).statistic)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_depth"))
def _all_modes(graphdef, state, inputs_BxS, targets_BxS, difficulty_BxS, max_depth: int) -> dict:
  """Per-token [wrong, nll] of every evaluation mode in one program (one compile per model).

  causal: the model's inference forward (MoR: causal routing, with its depth);
  topk (MoR): the training routing's depth; skip: shared recursions removed;
  depth_d, d = 1..max_depth: the shared unit applied d times (test-time depth).
  """
  from mor import decode
  from mor.evals.nll import skip_recursions_logits
  model = nnx.merge(graphdef, state, copy=True)
  model.eval()

  def score(logits_BxSxV):
    logp = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, targets_BxS[..., None], -1)[..., 0]
    return {"wrong": jnp.argmax(logits_BxSxV, -1) != targets_BxS, "nll": nll}

  out = {}
  if model.cfg.kind == "mor":
    forced = (None if model.cfg.router.depth_from == "router" else
              routers.data_depth(model.cfg, difficulty_BxS))   # the oracle rows' given depths
    logits, depth, _ = model._forward(inputs_BxS, None, "causal", None, None, forced)
    out["causal"] = dict(score(logits), depth=depth)
    logits, depth, _ = model._forward(inputs_BxS, None, "topk", None, None, forced)
    out["topk"] = dict(score(logits), depth=depth)
  else:
    out["causal"] = score(model(inputs_BxS)[0])
  if model.cfg.kind in ("recursive", "mor"):
    out["skip"] = score(skip_recursions_logits(model, inputs_BxS))
    if model.cfg.kind == "recursive":   # one unit pass per depth instead of d per depth
      depths = decode.depth_logits_upto(model, inputs_BxS, max_depth)
    else:
      depths = [decode.depth_forward(model, inputs_BxS, d) for d in range(1, max_depth + 1)]
    for d, logits in enumerate(depths, 1):
      out[f"depth_{d}"] = score(logits)
  return out


def _flat(arrays) -> np.ndarray:
  """Per-batch arrays ([B, S] each) as one flat array, batch after batch."""
  return np.concatenate([np.ravel(x) for x in arrays])


def _scored(batches) -> np.ndarray:
  """The flat mask of scored positions of batches."""
  return _flat([b["mask"] for b in batches]).astype(bool)


def per_difficulty(values_BxS: Sequence[np.ndarray], batches: Sequence[dict]) -> dict[int, float]:
  """Mean of a [B, S] quantity per difficulty over the scored positions of batches."""
  v = _flat(values_BxS).astype(np.float64)
  d, m = _flat([b["difficulty"] for b in batches]), _scored(batches)
  return {int(k): float(v[m & (d == k)].mean()) for k in np.unique(d[m])}


def _evaluate_modes(model, batches, max_depth: int) -> dict:
  """{mode: {"error", "nll" per difficulty, and "depth" [B, S] arrays where routed}}."""
  graphdef, state = nnx.split(model)
  outs = [jax.device_get(_all_modes(graphdef, state, jnp.asarray(b["inputs"]),
                                    jnp.asarray(b["targets"]), jnp.asarray(b["difficulty"]),
                                    max_depth)) for b in batches]
  res = {}
  for mode in outs[0]:
    res[mode] = {"error": per_difficulty([o[mode]["wrong"] for o in outs], batches),
                 "nll": per_difficulty([o[mode]["nll"] for o in outs], batches)}
    if "depth" in outs[0][mode]:
      res[mode]["depth"] = [np.asarray(o[mode]["depth"]) for o in outs]
  return res


def routed_flops_per_token(cfg: ModelConfig, depth_BxS: np.ndarray) -> float:
  """Forward FLOPs per token of a model whose tokens ran depth_BxS recursions (realised)."""
  s = depth_BxS.shape[-1]
  active = [float((depth_BxS >= r + 1).sum(-1).mean()) for r in range(int(depth_BxS.max()))]
  return flops_lib.routed_forward_flops_per_token(cfg, s, active)


def evaluate_depth_run(run: sweep.Run, wd: str, data, num_batches: int = 16,
                       exit_thresholds: Sequence[float] = ()) -> dict:
  """Every per-difficulty measurement of one finished run (see the module docstring).

  Two held-out sets, both from the task's evaluation stream: difficulties in the
  training range (every measurement) and up to data.task.eval_max_difficulty
  ("beyond": error at the trained and at test-time depths only).
  """
  from mor.analysis import load_run
  from mor.models import count_params
  model, cfg, step = load_run(wd)
  m, t = cfg.model, cfg.data.task
  recursive = m.kind in ("recursive", "mor")
  n_r = m.num_recursions if recursive else 1
  batches = data.eval_batches(num_batches, max_difficulty=t.max_difficulty)
  wide = data.eval_batches(num_batches, max_difficulty=t.eval_max_difficulty)
  per_step = flops_lib.budget_flops_per_step(m, cfg.data.seq_len, cfg.data.batch_size)
  out = {"name": run.name, "row": run.row_name, "seed": run.seed, "kind": m.kind, "step": step,
         "layers": m.num_layers, "N_r": n_r, "train_max_difficulty": t.max_difficulty,
         "unique_params": count_params(model)["unique_non_embedding"],
         "flops": per_step * step, "tokens": step * cfg.data.batch_size * cfg.data.seq_len,
         "forward_flops_per_token": flops_lib.forward_flops_per_token(m, cfg.data.seq_len),
         "version": EVAL_VERSION}
  # given depths (oracle rows) have no test-time depth or exit rule to compare
  given = m.kind == "mor" and m.router.depth_from != "router"
  test_depth = 0 if given else 2 * n_r
  res = _evaluate_modes(model, batches, test_depth)
  beyond = _evaluate_modes(model, wide, test_depth)
  out.update(error=res["causal"]["error"], nll=res["causal"]["nll"],
             beyond={"error": beyond["causal"]["error"]})
  if recursive:
    out["skip"] = {k: res["skip"][k] for k in ("error", "nll")}
  if recursive and not given:
    out["test_time"] = {d: res[f"depth_{d}"]["error"] for d in range(1, 2 * n_r + 1)}
    out["beyond"]["test_time"] = {d: beyond[f"depth_{d}"]["error"]
                                  for d in range(1, 2 * n_r + 1)}
  if m.kind == "mor":
    out["routing"] = {mode: _routing_stats(m, res[mode]["depth"], batches)
                      for mode in ("causal", "topk")}
    # the training routing's error and how often inference routes a token as training did
    out["routing"]["topk"].update(error=res["topk"]["error"], nll=res["topk"]["nll"])
    out["routing"]["agreement"] = _agreement(res["causal"]["depth"], res["topk"]["depth"],
                                             batches)
    out["forward_flops_per_token"] = out["routing"]["causal"]["flops_per_token"]
  if recursive and exit_thresholds and not given:
    # exits within the trained depth: recursions past N_r only hurt here (test_time)
    out["kl_exit"] = {str(th): _kl_exit_stats(model, batches, th, n_r)
                      for th in exit_thresholds}
    out["kl_exit_cached"] = _kl_exit_cached_check(model, batches[0], exit_thresholds[-1], n_r)
  return out


def _routing_stats(m: ModelConfig, depth: list, batches) -> dict:
  d, mask, dep = _flat([b["difficulty"] for b in batches]), _scored(batches), _flat(depth)
  return {"mean_depth": per_difficulty(depth, batches), "spearman": spearman(dep[mask], d[mask]),
          "flops_per_token": routed_flops_per_token(m, np.concatenate(depth))}


def _agreement(causal: list, topk: list, batches) -> dict:
  """Scored tokens whose causal (inference) depth equals their top-k (training) depth.

  "all": the fraction over every scored token; "step_r": among tokens that reached
  recursion r - 1 under both routings, the fraction whose go-deeper decision at r
  agrees (the paper's sampling accuracy, per step).
  """
  mask = _scored(batches)
  c, t = _flat(causal)[mask], _flat(topk)[mask]
  out = {"all": float(np.mean(c == t))}
  for r in range(2, int(max(c.max(), t.max(), 1)) + 1):
    both = (c >= r - 1) & (t >= r - 1)
    if both.any():
      out[f"step_{r}"] = float(np.mean((c[both] >= r) == (t[both] >= r)))
  return out


def _kl_exit_stats(model, batches, threshold: float, max_depth: int) -> dict:
  from mor import exits
  wrong, depths, flops = [], [], []
  for b in batches:
    logits, dep = exits.kl_exit_forward(model, jnp.asarray(b["inputs"]), threshold, max_depth)
    wrong.append(np.asarray(logits).argmax(-1) != b["targets"])
    depths.append(np.asarray(dep))
    flops.append(exits.kl_exit_flops_per_token(model.cfg, np.asarray(dep), breakdown=True))
  d, mask, dep = _flat([b["difficulty"] for b in batches]), _scored(batches), _flat(depths)
  return {"error": per_difficulty(wrong, batches), "mean_depth": per_difficulty(depths, batches),
          "spearman": spearman(dep[mask], d[mask]),
          "flops_per_token": float(np.mean([f["model"] for f in flops])),
          "kl_overhead_flops_per_token": float(np.mean([f["kl_overhead"] for f in flops]))}


def _kl_exit_cached_check(model, batch: dict, threshold: float, max_depth: int,
                          rows: int = 4) -> dict:
  """The KL exit in cached token-by-token decoding against the full-sequence pass."""
  from mor import exits
  x = jnp.asarray(batch["inputs"][:rows])
  full_logits, full_depth = exits.kl_exit_forward(model, x, threshold, max_depth)
  logits, dep = exits.kl_exit_decode(model, x, threshold, max_depth)
  wrong = np.asarray(logits).argmax(-1) != batch["targets"][:rows]
  return {"threshold": threshold, "rows": rows,
          "max_abs_logit_diff": float(np.max(np.abs(np.asarray(logits) - np.asarray(full_logits)))),
          "depths_equal": bool(np.array_equal(np.asarray(dep), np.asarray(full_depth))),
          "error": float(wrong[batch["mask"][:rows] == 1].mean()),
          "mean_depth": float(np.asarray(dep).mean())}


def evaluate_all(runs: Sequence[sweep.Run], root: str, num_batches: int = 16,
                 exit_thresholds: Sequence[float] = (), log=print) -> list[dict]:
  """One evaluation per finished run, cached in ROOT/NAME/depth_eval.json."""
  from mor.data import make_data
  rows = []
  key = {"batches": num_batches, "thresholds": list(exit_thresholds), "version": EVAL_VERSION}
  for r in runs:
    wd = sweep.workdir(root, r)
    if not sweep.is_finished(root, r):
      log(f"[depth] {r.name}: not finished, not evaluated")
      continue
    path = os.path.join(wd, "depth_eval.json")
    cached = json.load(open(path)) if os.path.exists(path) else None
    if cached and cached.get("key") == key and cached["row"]["step"] == sweep.latest_step(wd):
      rows.append(cached["row"])
      continue
    log(f"[depth] {r.name}: evaluating")
    row = evaluate_depth_run(r, wd, make_data(r.cfg.data, r.cfg.model.vocab_size), num_batches,
                             exit_thresholds)
    row = json.loads(json.dumps(row))   # int keys -> str, as the cache reads them back
    with open(path, "w") as f:
      json.dump({"key": key, "row": row}, f, indent=1)
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# Per-token analysis (notebooks/recursion_depth.ipynb)
def token_depths(model, cfg: Config, num_batches: int = 4) -> dict:
  """Held-out scored tokens of a MoR depth-task run: difficulty and routed depth per routing.

  {"difficulty": int[N], "causal": int[N], "topk": int[N], "inputs": int[B, S] (first batch),
   "depth_BxS": the first batch's causal depths}.
  """
  from mor.data import make_data
  data = make_data(cfg.data, cfg.model.vocab_size)
  batches = data.eval_batches(num_batches, max_difficulty=cfg.data.task.max_difficulty)
  res = _evaluate_modes(model, batches, 0) if cfg.model.kind == "mor" else None
  if res is None:
    raise ValueError(f"token_depths needs a MoR run, got model.kind={cfg.model.kind!r}")
  mask = _scored(batches)
  flat = lambda xs: _flat(xs)[mask]
  return {"difficulty": flat([b["difficulty"] for b in batches]),
          "causal": flat(res["causal"]["depth"]), "topk": flat(res["topk"]["depth"]),
          "inputs": batches[0]["inputs"], "targets": batches[0]["targets"],
          "difficulty_BxS": batches[0]["difficulty"], "depth_BxS": res["causal"]["depth"][0]}


def hops_pieces(inputs_S: np.ndarray, t: TaskConfig) -> list[str]:
  """Display strings of hops input ids: symbol letter and hop count, e.g. 'b3 '."""
  rel = np.asarray(inputs_S) - (t.symbols + 1)
  return [f"{'abcdefghijklmnop'[s]}{k + 1} " for s, k in zip(rel // t.eval_max_difficulty,
                                                            rel % t.eval_max_difficulty)]


def standin_run(workdir: str, steps: int = 20) -> str:
  """A tiny MoR expert-choice hops run (for the notebook when no real run exists)."""
  from mor import train
  cfg = row_config("hops", "mor_ec", model={"d_model": 32, "num_heads": 2, "num_kv_heads": 2,
                                            "ffn_dim": 64},
                   data={"batch_size": 8}, train={"steps": steps, "log_every": 10,
                                                  "checkpoint_every": 0, "eval_batches": 0})
  train.run(cfg, workdir)
  return workdir
