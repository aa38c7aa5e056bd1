"""mor.memory against XLA's own figure, KV caches against real ones, and the plan's errors."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mor import config, memory, presets, sharding, train
from mor.models import build_model

TOLERANCE = 0.15


def _cfg(kind: str, remat: bool, batch: int, seq: int, d: int, layers: int, vocab: int):
  cfg = presets.tiny_config(kind, remat=remat, num_layers=layers, d_model=d, num_heads=4,
                           num_kv_heads=2, ffn_dim=3 * d, vocab_size=vocab, num_recursions=2)
  return config.replace(cfg, model={"max_seq_len": seq},
                        data={"seq_len": seq, "batch_size": batch}, mesh={"data": 1})


@pytest.mark.parametrize("kind,remat,batch,seq,d,layers,vocab", [
    ("vanilla", False, 4, 128, 256, 4, 2048),
    ("recursive", True, 4, 128, 128, 6, 1024),
    ("mor", True, 4, 128, 128, 6, 1024),
])
def test_estimate_within_15_percent_of_compiled_cpu_step(kind, remat, batch, seq, d, layers,
                                                         vocab):
  cfg = _cfg(kind, remat, batch, seq, d, layers, vocab)
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  state = jax.eval_shape(s.init, jax.random.key(0))
  tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  mem = s.train_step.lower(state, {"inputs": tok, "targets": tok}).compile().memory_analysis()
  compiled = mem.argument_size_in_bytes + mem.temp_size_in_bytes   # outputs alias the state
  est = memory.estimate(cfg, 1, platform="cpu")
  n = sum(x.size for x in jax.tree.leaves(state["params"]))
  assert est["param_count"] == n and est["params"] == 4 * n
  assert abs(est["total"] / compiled - 1) < TOLERANCE, (est["total"], compiled)


def test_sharding_divides_params_and_tokens():
  cfg = config.replace(_cfg("vanilla", True, 8, 128, 128, 4, 1024),
                       mesh={"data": 2, "fsdp": 2, "tensor": 2})
  one = memory.estimate(config.replace(cfg, mesh={"data": 1, "fsdp": 1, "tensor": 1}), 1)
  eight = memory.estimate(cfg, 8)
  assert eight["tokens_per_device"] * 4 == one["tokens_per_device"]
  assert one["params"] / 4.5 < eight["params"] < one["params"] / 2   # norms stay replicated
  assert eight["total"] < one["total"] / 3


@pytest.mark.parametrize("kind", ["vanilla", "mor"])
def test_kv_cache_bytes_match_real_caches(kind):
  cfg = _cfg(kind, False, 2, 64, 64, 4, 256)
  model = build_model(cfg.model, nnx.Rngs(0))
  kw = {"slots": "capacity"} if kind == "mor" else {}
  caches = jax.eval_shape(lambda: model.init_caches(3, 32, **kw))
  real = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches)
             if x.ndim >= 2)    # keys, values, positions (not the fill counters)
  sizes = memory.mesh_sizes(cfg.mesh, 1)
  assert memory.kv_cache_bytes(cfg, sizes, 3, 32) == pytest.approx(real, rel=1e-6)


def test_plan_answers_for_paper_sizes_and_remat_helps():
  rows = {}
  for size in ("135m", "1.7b"):
    cfg = presets.variant_config("vanilla", size)
    rows[size] = memory.plan(cfg, "h100", 8)
    assert rows[size]["step_time_s"] > 0 and rows[size]["largest_batch"] % 8 == 0
    no_remat = memory.estimate(cfg, 8, remat=False)["activations"]
    assert memory.estimate(cfg, 8)["activations"] < no_remat / 4
  assert rows["135m"]["largest_batch"] > rows["1.7b"]["largest_batch"]
  small = memory.plan(presets.variant_config("vanilla", "1.7b"), "tpu_v5e", 8)
  assert not small["fits"]


@pytest.mark.parametrize("args,message", [
    (["--accelerator", "h101"], "accelerator='h101' is not allowed; choose one of h100"),
    (["--devices", "8", "--config.mesh.data=3"], "mesh: data*fsdp*tensor*expert=3"),
    (["--devices", "6", "--config.mesh.fsdp=4"], "devices=6 is not divisible"),
])
def test_plan_cli_bad_input_is_one_line(args, message):
  out = subprocess.run([sys.executable, "-m", "experiments.plan", *args], capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0
  errors = [line for line in out.stderr.splitlines() if "Error" in line or message in line]
  assert any(message in line for line in errors), out.stderr[-500:]
  assert "Traceback" not in out.stderr
