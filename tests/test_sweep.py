"""Sweeps: one FLOP budget, seeds, resume/skip, evaluation rows with controls, tables and plots."""
import csv
import io
import os

import pytest

from mor import config, flops, plots, presets, report, sweep, train
from test_train import ArrayData


def tiny(kind, **model):
  base = config.to_dict(presets.tiny_config(kind))
  # small enough that compiling dominates; 4 layers = 1 + 2 x (1 shared) + 1 with N_r = 2
  base["model"].update(vocab_size=256, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64,
                       num_layers=4, num_recursions=2, max_seq_len=16, **model)
  base["data"].update(seq_len=16, batch_size=8)   # 8 test devices
  base["train"].update(log_every=1, eval_every=0, eval_batches=0, checkpoint_every=0,
                       peak_flops=1e11)
  return config.from_dict(base)


def _fwd_step(cfg):
  return flops.budget_flops_per_step(cfg.model, cfg.data.seq_len, cfg.data.batch_size)


def test_sweep_trains_skips_and_tabulates(tmp_path, monkeypatch):
  """Seeds, the skip control and the tables; catches a seed that shares init or data order."""
  cfgs = [("rec", tiny("recursive")), ("mor", tiny("mor"))]
  budget = 4.5 * _fwd_step(cfgs[0][1])           # paper convention: forward FLOPs
  runs = sweep.make_sweep(cfgs, budget, seeds=2, checkpoints=2)
  assert [r.name for r in runs] == ["rec@s0", "rec@s1", "mor@s0", "mor@s1"]
  assert all(r.cfg.train.flop_budget == budget and r.cfg.train.steps == 0 for r in runs)
  assert [(r.cfg.train.seed, r.cfg.data.seed) for r in runs[:2]] == [(0, 0), (1, 1)]
  calls = []
  real_run = train.run
  monkeypatch.setattr(train, "run", lambda *a, **k: calls.append(a[1]) or real_run(*a, **k))
  root = str(tmp_path)
  out = sweep.run(runs, root, data_factory=ArrayData, heldout_batches=1, tasks=())
  assert set(out["status"].values()) == {"trained"} and len(calls) == 4
  rows = out["rows"]
  assert [r["row"] for r in rows] == ["rec", "rec", "mor", "mor"]
  assert rows[0]["step"] == 4 and rows[2]["step"] == 5        # MoR: fewer FLOPs per step
  assert all(r["flops"] <= budget for r in rows)
  assert set(rows[2]["heldout"]) == {"causal", "topk", "skip"}
  assert set(rows[0]["heldout"]) == {"causal", "skip"}
  for r in rows:
    assert r["recursion_gain"] == pytest.approx(r["heldout"]["skip"] - r["heldout"]["causal"])
    # the contribution curve: one point per kept checkpoint, the last one is the final model
    assert [p["step"] for p in r["curve"]] == ([2, 4] if r["row"] == "rec" else [3, 5])
    assert r["curve"][-1]["causal"] == pytest.approx(r["heldout"]["causal"], rel=1e-6)
    assert r["curve"][-1]["skip"] == pytest.approx(r["heldout"]["skip"], rel=1e-6)
    assert r["curve"][0]["causal"] != r["curve"][-1]["causal"]
  assert rows[0]["heldout"]["causal"] != rows[1]["heldout"]["causal"]   # seeds differ

  again = sweep.run(runs, root, data_factory=ArrayData, heldout_batches=1, tasks=())
  assert set(again["status"].values()) == {"skipped"} and len(calls) == 4
  assert again["rows"] == rows                                  # cached evaluation

  flat = report.table_rows(rows)
  assert [f["seeds"] for f in flat] == [2, 2]
  nll = [r["heldout"]["causal"] for r in rows[:2]]
  assert flat[0]["nll_causal"] == pytest.approx(sum(nll) / 2)
  assert flat[0]["nll_causal_spread"] == pytest.approx(abs(nll[0] - nll[1]))
  text = report.to_csv(rows)
  header = next(csv.reader(io.StringIO(text)))
  assert header == report.columns()
  assert header[:8] == ["model", "N_r", "unique_params", "flops", "tokens", "seeds",
                        "nll_causal", "nll_causal_spread"] and "recursion_gain" in header
  md = report.to_markdown(rows)
  lines = md.splitlines()
  assert lines[0].startswith("| model | N_r | unique params") and "NLL (top-k" in lines[0]
  assert "recursions skipped" in lines[0]
  assert len({ln.count("|") for ln in lines[:4]}) == 1         # header, rule, 2 rows agree
  assert "MoR expert-choice (mor)" in md

  paths = sweep.write_results(runs, root, rows, str(tmp_path / "res"), "t", tasks=())
  assert all(os.path.getsize(p) > 0 for p in paths) and len(paths) == 6   # + contribution
  assert len(plots.curves(sweep.workdir(root, runs[2]))["nll"]) == rows[2]["step"]


def test_ordering_is_called_only_beyond_the_spread():
  def row(name, *nll):
    return [{"name": f"{name}@s{i}", "row": name, "kind": "vanilla", "num_recursions": 1,
             "unique_params": 1, "flops": 1, "tokens": 1, "step": 1, "tasks": {},
             "heldout": {"causal": v}} for i, v in enumerate(nll)]
  rows = row("a", 5.0, 5.1) + row("b", 5.3, 5.32) + row("c", 5.05, 5.12)
  assert report.ordering(rows, "a", "b") == "a < b"
  assert report.ordering(rows, "b", "a") == "b > a"
  assert report.ordering(rows, "a", "c") == "tie"


@pytest.mark.parametrize("table", list(sweep.TABLES))
def test_tables_have_the_papers_rows_and_the_control(table):
  runs = sweep.reproduce_sweep("cpu", table=table)
  rows = list(dict.fromkeys(r.row_name for r in runs))
  assert rows == list(sweep.TABLES[table]) and "vanilla_unshared" in rows
  assert len(runs) == sweep.CPU_SEEDS * len(rows) and sweep.CPU_SEEDS >= 2
  assert len({r.cfg.train.flop_budget for r in runs}) == 1
  assert all(r.cfg.train.flop_convention == "paper" for r in runs)
  cfgs = {r.row_name: r.cfg.model for r in runs}
  if table == "sharing":
    assert {c.sharing for n, c in cfgs.items() if n != "vanilla_unshared"} == set(config.SHARING)
  if table == "kv":
    assert [(c.router.routing, c.router.kv) for n, c in cfgs.items() if c.kind == "mor"] == [
        ("expert_choice", "cache"), ("expert_choice", "share"), ("token_choice", "cache"),
        ("token_choice", "share")]


def test_any_field_sweeps_by_name():
  """alpha (and any field) is swept with NAME:section.field=value; bad ones fail in one line."""
  runs = sweep.variant_sweep(["mor_ec3", "mor_ec3:model.router.alpha=1.0",
                              "mor_ec3:model.router.combine=straight_through"], "cpu", 1e12)
  assert [r.cfg.model.router.alpha for r in runs] == [0.1, 1.0, 0.1]
  assert runs[2].cfg.model.router.combine == "straight_through"
  assert runs[1].name == "mor_ec3:model.router.alpha=1.0"
  with pytest.raises(config.ConfigError, match="model.router.combine='x' is not allowed"):
    sweep.variant_sweep(["mor_ec3:model.router.combine=x"], "cpu", 1e12)
  with pytest.raises(config.ConfigError, match="unknown field"):
    sweep.variant_sweep(["mor_ec3:model.router.alfa=1"], "cpu", 1e12)


def test_moe_baseline_matches_vanilla_flops():
  per_token = {r.name: train.num_steps(r.cfg)[1]
               for r in sweep.variant_sweep(["vanilla", "moe"], "cpu")}
  assert abs(per_token["moe"] / per_token["vanilla"] - 1) < 0.01   # matched FLOPs
  plan = sweep.plan(sweep.variant_sweep(["vanilla"], "360m"))
  assert plan[0]["unique_params"] > 3e8 and plan[0]["N_r"] == 1
