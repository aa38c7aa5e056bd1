"""Depth-task experiments (mor.depth, mor.depth_report): counters, scores and the table path."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mor import config as C, depth, depth_report, flops, presets, report, routers, sweep


def test_routed_flops_equal_static_counts_and_a_hand_count():
  for row in ("recursive", "mor_ec", "mor_tc"):
    m = depth.row_config("hops", row).model
    caps = list(routers.capacities(m, 64)) if m.kind == "mor" else [64] * m.num_recursions
    assert flops.routed_forward_flops_per_token(m, 64, caps) == pytest.approx(
        flops.forward_flops_per_token(m, 64), rel=1e-12)
  share = presets.variant_config("mor_ec3_share").model
  assert flops.routed_forward_flops_per_token(share, 64, list(routers.capacities(share, 64))) == \
      pytest.approx(flops.forward_flops_per_token(share, 64), rel=1e-12)
  # by hand: recursive, cycle 2 x 3, S = 8, recursion 1 on all 8 tokens, recursion 2 on 4 only
  m = C.ModelConfig(kind="recursive", num_layers=2, num_recursions=2, sharing="cycle",
                    vocab_size=10, d_model=4, num_heads=2, num_kv_heads=1, ffn_dim=6)
  d, h, kv, f = 4, 2, 1, 6
  def layer(n):   # tokens n, keys among them, causal (n + 1) / 2 (n == keys)
    return n * (2 * d * h * 2 + 2 * h * 2 * d + 4 * d * kv * 2 + 4 * (n + 1) / 2 * h * 2 + 6 * d * f)
  want = (layer(8) + layer(4)) / 8 + 2 * d * 10
  assert flops.routed_forward_flops_per_token(m, 8, [8, 4]) == pytest.approx(want)


def test_spearman_and_per_difficulty():
  assert depth.spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1)
  assert depth.spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1)
  # ties averaged: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> r = 0.8660
  assert depth.spearman(np.array([0, 0, 1]), np.array([1, 2, 3])) == pytest.approx(0.8660254)
  assert np.isnan(depth.spearman(np.ones(5), np.arange(5)))
  batches = [{"difficulty": np.array([[1, 2, 2, 0]]), "mask": np.array([[1, 1, 1, 0]])}]
  got = depth.per_difficulty([np.array([[1.0, 3.0, 5.0, 100.0]])], batches)
  assert got == {1: 1.0, 2: 4.0}


def test_data_depth_oracle_and_its_control_by_hand():
  diff = np.array([[1, 2, 3, 4, 5, 0], [2, 2, 1, 1, 4, 3]])
  oracle = depth.row_config("hops", "mor_tc_oracle").model
  shifted = depth.row_config("hops", "mor_tc_shifted").model
  np.testing.assert_array_equal(routers.data_depth(oracle, diff),
                                [[1, 2, 3, 3, 3, 1], [2, 2, 1, 1, 3, 3]])
  # half a sequence away (cyclically): position i takes position i - 3's difficulty
  np.testing.assert_array_equal(routers.data_depth(shifted, diff),
                                [[3, 3, 1, 1, 2, 3], [1, 3, 3, 2, 2, 1]])
  with pytest.raises(C.ConfigError, match="depth_from"):
    C.validate(C.replace(depth.row_config("hops", "mor_tc_oracle"), data={"corpus": "default"}))
  with pytest.raises(C.ConfigError, match="depth_from"):
    depth.row_config("hops", "mor_ec", model={"router": {"depth_from": "difficulty"}})
  with pytest.raises(C.ConfigError, match="depth_from"):
    depth.row_config("hops", "mor_tc", model={"router": {"depth_from": "oracle"}})


def test_training_forward_takes_the_batch_difficulty_as_depth():
  """train._forward on an oracle row: realised depths are the batch's difficulties."""
  from flax import nnx
  from mor import train
  from mor.models import build_model
  cfg = depth.row_config("hops", "mor_tc_oracle", **TINY)
  graphdef, params, rest = nnx.split(build_model(cfg.model, nnx.Rngs(0)), nnx.Param, ...)
  tok = np.arange(2 * 16).reshape(2, 16) % 40
  # top-k (training) has static slots, 16/16/11 here (capacity factor 2): depth 3 overflows
  for k, causal, topk in ((1, [1, 0, 0], [1, 0, 0]), (2, [1, 1, 0], [1, 1, 0]),
                          (4, [1, 1, 1], [1, 1, 11 / 16])):
    batch = {"inputs": tok, "targets": tok, "mask": np.ones_like(tok),
             "difficulty": np.full_like(tok, k)}
    for routing, want in (("causal", causal), ("topk", topk)):
      _, (_, aux, _) = train._forward(graphdef, params, rest, batch, 0, routing)
      np.testing.assert_allclose(aux["stats"]["tokens_per_depth"], want, err_msg=routing)


def test_agreement_by_hand():
  """Tokens (causal, top-k): (1, 1) (2, 1) (3, 3) (2, 3) (1, 2), and one unscored (3, 1)."""
  batches = [{"mask": np.array([[1, 1, 1, 1, 1, 0]])}]
  got = depth._agreement([np.array([[1, 2, 3, 2, 1, 3]])], [np.array([[1, 1, 3, 3, 2, 1]])],
                         batches)
  # step 2: all five reached 1 under both; same decision (>= 2) for tokens 1, 3, 4 -> 3/5
  # step 3: reached 2 under both: tokens 3, 4; same decision for token 3 only -> 1/2
  assert got == {"all": pytest.approx(2 / 5), "step_2": pytest.approx(3 / 5),
                 "step_3": pytest.approx(1 / 2)}


def test_order_by_spread_calls_order_only_beyond_the_spread():
  assert report.order_by_spread("a", [1.0, 1.2], "b", [2.0, 2.1]) == "a < b"
  assert report.order_by_spread("a", [1.0, 2.0], "b", [1.9, 2.1]) == "tie"
  assert report.order_by_spread("a", [3.0, 3.1], "b", [1.0, 1.05]) == "a > b"


def test_rows_and_bad_names():
  cfgs = {r: depth.row_config("hops", r) for r in depth.ROWS}
  assert cfgs["vanilla_unique"].model.num_layers == depth.LAYERS // depth.N_R
  assert cfgs["vanilla_applied"].model.num_layers == depth.LAYERS
  assert cfgs["mor_tc"].model.router.routing == "token_choice"
  assert len({c.train.steps for c in cfgs.values()}) == 1       # equal tokens by default
  runs = depth.depth_sweep("hops", ("recursive", "mor_ec"), seeds=2)
  assert [r.seed for r in runs] == [0, 0, 1, 1] and runs[2].cfg.data.seed == 1
  budgeted = depth.depth_sweep("hops", ("vanilla_unique", "recursive"), seeds=1, budget=1e12)
  assert all(r.cfg.train.flop_budget == 1e12 for r in budgeted)
  with pytest.raises(C.ConfigError, match="row"):
    depth.row_config("hops", "nope")
  with pytest.raises(C.ConfigError, match="task"):
    depth.row_config("sudoku", "recursive")


TINY = dict(model={"d_model": 32, "num_heads": 2, "num_kv_heads": 2, "ffn_dim": 64,
                   "max_seq_len": 16, "vocab_size": 40},
            data={"seq_len": 16, "batch_size": 8},
            train={"steps": 3, "log_every": 1, "checkpoint_every": 0, "eval_batches": 1})


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("depth"))
  runs = depth.depth_sweep("hops", ("recursive", "mor_ec", "mor_tc_oracle"), seeds=1, **TINY)
  sweep.train_all(runs, root, log=lambda *a: None)
  rows = depth.evaluate_all(runs, root, num_batches=1, exit_thresholds=[0.05], log=lambda *a: 0)
  return runs, root, rows


def test_evaluation_matches_an_independent_forward(tiny_table):
  """Per-difficulty error of the cached evaluation = argmax of the model's own forward."""
  from mor import decode
  from mor.analysis import load_run
  from mor.data import make_data
  runs, root, rows = tiny_table
  by = {r["row"]: r for r in rows}
  for name in ("recursive", "mor_ec"):
    run = next(r for r in runs if r.row_name == name)
    model, cfg, _ = load_run(sweep.workdir(root, run))
    b = make_data(cfg.data, cfg.model.vocab_size).eval_batches(1, max_difficulty=4)[0]
    routing = {"routing": "causal"} if name == "mor_ec" else {}
    logits = np.asarray(model(jnp.asarray(b["inputs"]), **routing)[0])
    wrong = logits.argmax(-1) != b["targets"]
    for k in range(1, 5):
      sel = b["difficulty"] == k
      assert by[name]["error"][str(k)] == pytest.approx(wrong[sel].mean())
      # test-time depth 1: the unit applied once (an independent call of depth_forward)
      one = np.asarray(decode.depth_forward(model, jnp.asarray(b["inputs"]), 1)).argmax(-1)
      assert by[name]["test_time"]["1"][str(k)] == pytest.approx((one != b["targets"])[sel].mean())
    assert by[name]["test_time"][str(cfg.model.num_recursions)] == by[name]["error"]
  routed = np.asarray(by["mor_ec"]["routing"]["causal"]["mean_depth"]["1"])
  assert 0 <= routed <= 3
  # the training routing's error and the causal/top-k agreement, from independent calls
  run = next(r for r in runs if r.row_name == "mor_ec")
  model, cfg, _ = load_run(sweep.workdir(root, run))
  b = make_data(cfg.data, cfg.model.vocab_size).eval_batches(1, max_difficulty=4)[0]
  x, sel = jnp.asarray(b["inputs"]), b["mask"] == 1
  logits = np.asarray(model(x, routing="topk")[0], np.float64)
  wrong = logits.argmax(-1) != b["targets"]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
  topk, causal = (by["mor_ec"]["routing"][m] for m in ("topk", "causal"))
  for k in range(1, 5):
    at = sel & (b["difficulty"] == k)
    assert topk["error"][str(k)] == pytest.approx(wrong[at].mean())
    assert topk["nll"][str(k)] == pytest.approx(nll[at].mean(), rel=1e-5)
    assert topk["nll"][str(k)] != pytest.approx(by["mor_ec"]["nll"][str(k)], rel=1e-4)
  c, t = (np.asarray(model.routing_decisions(x, routing=m))[sel] for m in ("causal", "topk"))
  assert 0 < np.mean(c == t) < 1       # the two routings differ here, so the check has teeth
  assert by["mor_ec"]["routing"]["agreement"]["all"] == pytest.approx(np.mean(c == t))
  # the oracle row trained and is scored with each token's difficulty as its depth
  oracle = by["mor_tc_oracle"]["routing"]
  assert oracle["causal"]["mean_depth"] == {"1": 1.0, "2": 2.0, "3": 3.0, "4": 3.0}
  topk = oracle["topk"]["mean_depth"]   # static slots (11 at depth 3 here) may drop a few
  assert (topk["1"], topk["2"]) == (1.0, 2.0) and 2.5 < topk["3"] <= 3 and 2.5 < topk["4"] <= 3
  assert "test_time" not in by["mor_tc_oracle"] and "kl_exit" not in by["mor_tc_oracle"]
  assert "skip" in by["recursive"] and "routing" not in by["recursive"]
  assert by["recursive"]["kl_exit_cached"]["depths_equal"]
  # cached on disk; a second call reads it back instead of evaluating again
  path = os.path.join(sweep.workdir(root, runs[0]), "depth_eval.json")
  assert json.load(open(path))["row"]["name"] == runs[0].name
  again = depth.evaluate_all(runs, root, num_batches=1, exit_thresholds=[0.05],
                             log=lambda m: pytest.fail(m))
  assert again == rows


def test_report_writes_tables_plots_and_claims(tiny_table, tmp_path):
  runs, root, rows = tiny_table
  paths = depth_report.write(rows, runs, root, str(tmp_path), "hops_cpu", "hops")
  names = {os.path.basename(p) for p in paths}
  assert {"hops_cpu.md", "hops_cpu.csv", "hops_cpu_runs.csv", "error_per_difficulty_hops_cpu.png",
          "routed_depth_hops_cpu.png", "test_time_depth_hops_cpu.png"} <= names
  md = open(tmp_path / "hops_cpu.md").read()
  assert "(ii) mor_ec: Spearman" in md and "(iii) recursive" in md and "KL < 0.05" in md
  assert "## Inference routing against training routing (MoR)" in md
  section = md.split("## Inference routing against training routing (MoR)")[1]
  line = next(l for l in section.splitlines() if l.startswith("| MoR expert-choice N_r=3 | "))
  mor = next(r for r in rows if r["row"] == "mor_ec")
  assert f"{100 * mor['routing']['agreement']['all']:.1f} ± 0.0" in line
  # (iv): the oracle against its control, here a copy of the oracle 10 points worse
  oracle = next(r for r in rows if r["row"] == "mor_tc_oracle")
  worse = dict(oracle, row="mor_tc_shifted", name="mor_tc_shifted@s0",
               error={k: v + 0.1 for k, v in oracle["error"].items()})
  iv = next(c for c in depth_report.claims(rows + [worse]) if c.startswith("(iv)"))
  assert "(mor_tc_oracle < mor_tc_shifted)" in iv and "routing by difficulty pays" in iv
  assert not any(c.startswith("(iv)") for c in depth_report.claims(rows))
  per_seed = open(tmp_path / "hops_cpu_runs.csv").read().splitlines()
  assert len(per_seed) == 1 + len(rows)
  err = depth_report.run_summary(next(r for r in rows if r["row"] == "recursive"))["err_train"]
  want = 100 * np.mean([v for k, v in next(r for r in rows if r["row"] == "recursive")[
      "error"].items() if int(k) <= 4])
  assert err == pytest.approx(want)
