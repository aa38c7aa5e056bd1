"""Sweeps: one FLOP budget, resume/skip, evaluation rows, tables and plots."""
import csv
import io
import os

from mor import config, plots, report, sweep, train
from test_train import ArrayData


def tiny(kind, **model):
  base = config.to_dict(config.tiny_config(kind))
  # small enough that compiling dominates; 4 layers = 1 + 2 x (1 shared) + 1 with N_r = 2
  base["model"].update(vocab_size=256, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64,
                       num_layers=4, num_recursions=2, max_seq_len=16, **model)
  base["data"].update(seq_len=16, batch_size=8)   # 8 test devices
  base["train"].update(log_every=1, eval_every=0, eval_batches=0, checkpoint_every=0,
                       peak_flops=1e11)
  return config.from_dict(base)


def test_sweep_trains_skips_and_tabulates(tmp_path, monkeypatch):
  cfgs = [("rec", tiny("recursive")), ("mor", tiny("mor"))]
  budget = 4.5 * train.num_steps(cfgs[0][1])[1]
  runs = sweep.make_sweep(cfgs, budget)
  assert all(r.cfg.train.flop_budget == budget and r.cfg.train.steps == 0 for r in runs)
  calls = []
  real_run = train.run
  monkeypatch.setattr(train, "run", lambda *a, **k: calls.append(a[1]) or real_run(*a, **k))
  root = str(tmp_path)
  out = sweep.run(runs, root, data_factory=ArrayData, heldout_batches=1)
  assert out["status"] == {"rec": "trained", "mor": "trained"} and len(calls) == 2
  rows = out["rows"]
  assert [r["name"] for r in rows] == ["rec", "mor"]
  assert rows[0]["step"] == 4 and rows[1]["step"] == 5        # MoR: fewer FLOPs per step
  assert all(r["flops"] <= budget for r in rows)
  assert set(rows[1]["heldout"]) == {"causal", "topk"} and set(rows[0]["heldout"]) == {"causal"}
  assert "no tokenizer" in rows[0]["note"] and not rows[0]["tasks"]

  again = sweep.run(runs, root, data_factory=ArrayData, heldout_batches=1)
  assert again["status"] == {"rec": "skipped", "mor": "skipped"} and len(calls) == 2
  assert again["rows"] == rows                                  # cached evaluation

  text = report.to_csv(rows)
  header = next(csv.reader(io.StringIO(text)))
  assert header == report.columns()
  assert header[:7] == ["model", "N_r", "unique_params", "flops", "tokens", "nll_causal",
                        "nll_topk_reference"] and "acc_average" in header
  md = report.to_markdown(rows)
  lines = md.splitlines()
  assert lines[0].startswith("| model | N_r | unique params") and "NLL (top-k" in lines[0]
  assert len({ln.count("|") for ln in lines[:4]}) == 1         # header, rule, 2 rows agree
  assert "MoR expert-choice (mor)" in md and "Note: no tokenizer" in md

  paths = sweep.write_results(runs, root, rows, str(tmp_path / "res"), "t")
  assert all(os.path.getsize(p) > 0 for p in paths) and len(paths) == 4
  assert len(plots.curves(sweep.workdir(root, runs[1]))["nll"]) == rows[1]["step"]


def test_reproduce_sweep_has_the_papers_rows():
  runs = sweep.reproduce_sweep("cpu")
  assert [r.name for r in runs] == [*sweep.REPRODUCE_VARIANTS, "moe"]
  assert len({r.cfg.train.flop_budget for r in runs}) == 1
  per_token = {r.name: train.num_steps(r.cfg)[1] for r in runs}
  assert abs(per_token["moe"] / per_token["vanilla"] - 1) < 0.01   # matched FLOPs
  plan = sweep.plan(sweep.variant_sweep(["vanilla"], "360m"))
  assert plan[0]["unique_params"] > 3e8 and plan[0]["N_r"] == 1
