"""Uptraining from a dense model, and LoRA relaxation of tied blocks."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor import config, interop, presets, sharding, train, uptrain
from mor.layers import lora
from mor.models import build_model, count_params
from test_interop import filled, logits, tokens
from test_train import ArrayData

SHAPE = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=48, max_seq_len=32,
             tie_embeddings=False)


def model_cfg(kind="recursive", num_layers=8, sharing="middle_cycle", **kw):
  return config.ModelConfig(kind=kind, num_layers=num_layers, sharing=sharing,
                            num_recursions=kw.pop("num_recursions", 3), **SHAPE, **kw)


@functools.lru_cache
def constant_source(num_layers=8):
  """A dense model whose layer i holds the constant i in every weight and norm (read-only)."""
  src = filled(model_cfg("vanilla", num_layers), 0.0)
  for i, blk in enumerate(src.blocks):
    for _, var in nnx.to_flat_state(nnx.state(blk, nnx.Param)):
      var.set_value(jnp.full(var.get_value().shape, i, jnp.float32))
  return src


def block_value(block):
  """The constant all base weights of a block hold; None if all NaN (left untouched)."""
  flat = np.concatenate([np.asarray(w).ravel() for w in lora.block_weights(block, None).values()])
  if np.all(np.isnan(flat)):
    return None
  assert np.all(flat == flat[0]), "a block mixes source layers"
  return float(flat[0])


# (kind, sharing, target layers, strategy) -> value of each unique block; source: 8 layers.
CASES = [
    ("mor", "middle_cycle", 8, "stepwise", [0, 1, 6, 7]),     # linspace(1, 6, 2)
    ("mor", "middle_cycle", 8, "lower", [0, 1, 2, 7]),
    ("mor", "middle_cycle", 8, "upper", [0, 5, 6, 7]),
    ("mor", "middle_cycle", 8, "average", [0, 3, 4, 7]),      # (1+3+5)/3, (2+4+6)/3
    ("mor", "middle_cycle", 8, "random", [0, None, None, 7]),
    ("recursive", "middle_sequence", 8, "average", [0, 2, 5, 7]),  # (1+2+3)/3, (4+5+6)/3
    ("recursive", "cycle", 6, "stepwise", [0, 7]),              # linspace(0, 7, 2)
    # 8 source layers for 6 applied: positions read round(linspace(0, 7, 6)) = 0,1,3,4,6,7
    ("recursive", "cycle", 6, "average", [3, 4]),               # (0+3+6)/3, (1+4+7)/3
    ("recursive", "sequence", 6, "average", [4 / 3, 17 / 3]),   # (0+1+3)/3, (4+6+7)/3
    ("recursive", "cycle", 6, "upper", [6, 7]),
    ("vanilla", "cycle", 4, "stepwise", [0, 2, 5, 7]),          # round(0, 2.33, 4.67, 7)
]


@pytest.mark.parametrize("kind,sharing,layers,strategy,want", CASES)
def test_strategies_map_the_right_source_layers(kind, sharing, layers, strategy, want):
  src = constant_source()
  target = filled(model_cfg(kind, layers, sharing), np.nan)   # NaN: not written by uptraining
  mapping = uptrain.init_from_dense(target, src, strategy)
  got = [block_value(b) for b in target.blocks]
  means = [float(np.mean(mapping[b])) if mapping[b] else None for b in range(len(want))]
  for g, m, w in zip(got, means, want, strict=True):
    assert (g, m) == ((None, None) if w is None else (pytest.approx(w),) * 2)
  np.testing.assert_array_equal(target.embed.table[...], src.embed.table[...])
  np.testing.assert_array_equal(target.head[...], src.head[...])
  text = uptrain.describe_mapping(target.cfg, mapping, 8, strategy)
  assert f"uptrain ({strategy}): 8 source layers" in text and text.count("\n  block ") == len(want)


def test_bad_uptrain_inputs_fail_clearly():
  src = constant_source(4)
  wide = config.ModelConfig(**dict(SHAPE, d_model=64), kind="recursive", num_layers=4,
                            num_recursions=2, sharing="cycle")
  with pytest.raises(config.ConfigError, match="model.d_model=64 \\(source 32\\)"):
    uptrain.init_from_dense(filled(wide), src, "stepwise")
  with pytest.raises(ValueError, match="too shallow"):
    uptrain.layer_mapping(model_cfg("recursive", 12, "cycle", num_recursions=2), 4, "lower")
  with pytest.raises(config.ConfigError, match="uptrain.strategy='deep'"):
    config.from_dict({"uptrain": {"strategy": "deep"}})
  with pytest.raises(config.ConfigError, match="model.lora_rank=4 must be >= 0, and > 0 only"):
    config.from_dict({"model": {"kind": "vanilla", "lora_rank": 4}})


def with_nonzero_adapters(model, scale=0.05):
  rng = np.random.default_rng(0)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "lora" in path and path[-1] == "b":
      var.set_value(jnp.asarray(scale * rng.standard_normal(var.get_value().shape), jnp.float32))
  return model


def zero_b(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "lora" in path and path[-1] == "b":
      var.set_value(jnp.zeros(var.get_value().shape, jnp.float32))
  return model


def test_adapters_start_with_b_zero():
  w = nnx.Param(jnp.ones((6, 2, 3)), axes=("embed", "heads", "head_dim"))
  a = lora.LoRA(w, 1, num=3, rank=2, rngs=nnx.Rngs(0))
  assert a.a[...].shape == (3, 6, 2) and a.b[...].shape == (3, 2, 2, 3)
  assert float(jnp.abs(a.b[...]).max()) == 0.0 and float(jnp.abs(a.a[...]).min()) > 0.0
  assert np.std(np.asarray(a.a[...])) == pytest.approx(6 ** -0.5, rel=0.5)


@pytest.mark.parametrize("sharing", ["middle_cycle", "sequence"])
def test_zero_b_adapters_change_nothing_and_merge_exactly(sharing):
  layers = 8 if sharing == "middle_cycle" else 6
  plain = filled(model_cfg("recursive", layers, sharing))
  relaxed = zero_b(filled(model_cfg("recursive", layers, sharing, lora_rank=4), seed=1))
  src = filled(model_cfg("vanilla", 8), seed=2)
  for m in (plain, relaxed):
    uptrain.init_from_dense(m, src, "average")
  t = tokens()
  np.testing.assert_array_equal(logits(relaxed, t), logits(plain, t))
  with_nonzero_adapters(relaxed)
  out = logits(relaxed, t)
  assert np.abs(out - logits(plain, t)).max() > 1e-3
  merged = interop.merge_lora(relaxed)
  assert merged.cfg.kind == "vanilla" and len(merged.blocks) == layers
  np.testing.assert_allclose(logits(merged, t), out, atol=2e-6, rtol=0)


def test_adapters_are_counted():
  cfg = model_cfg("recursive", lora_rank=4, lora_targets=("q", "o", "down"))
  abstract = lambda c: nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0)))
  n_plain, n = count_params(abstract(model_cfg("recursive"))), count_params(abstract(cfg))
  d, q, f, r = 32, 32, 48, 4
  per_recursion = r * (d + q) + r * (q + d) + r * (f + d)
  # 2 shared blocks x 3 recursions; applied layers each use one recursion's adapters
  assert n["unique"] - n_plain["unique"] == 2 * 3 * per_recursion
  assert lora.flops_per_token(cfg) == 2 * per_recursion


def test_mor_zero_b_adapters_change_nothing():
  # 5 layers: 1 + one shared block x 3 recursions (3 adapters per target) + 1
  kw = dict(router=config.RouterConfig(routing="expert_choice"), num_layers=5)
  relaxed = zero_b(filled(model_cfg("mor", lora_rank=2, **kw)))
  plain = filled(model_cfg("mor", **kw))
  shared = dict(nnx.to_flat_state(nnx.state(relaxed, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    var.set_value(shared[path].get_value())   # same base weights and routers
  t = tokens()
  np.testing.assert_array_equal(logits(relaxed, t), logits(plain, t))
  with_nonzero_adapters(relaxed)
  assert np.abs(logits(relaxed, t) - logits(plain, t)).max() > 1e-4


def test_uptrain_into_mor_expert_choice_and_loss_falls(tmp_path, capsys):
  base = config.to_dict(presets.tiny_config("mor"))
  base["model"].update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128,
                       num_layers=5, max_seq_len=32, sharing="middle_cycle", num_recursions=3)
  base["data"].update(seq_len=32, batch_size=8)
  base["train"].update(steps=20, lr=1e-2, peak_flops=1e11)
  source = filled(dataclasses.replace(config.from_dict(base).model, kind="vanilla"), seed=7)
  interop.export_llama(source, str(tmp_path / "src"))
  base["uptrain"] = {"source": str(tmp_path / "src"), "strategy": "average"}
  cfg = config.from_dict(base)
  one_device = sharding.make_mesh(config.MeshConfig(), jax.devices()[:1])  # compiles faster
  s = train.setup(cfg, one_device)
  state = uptrain.maybe_init_from_source(cfg, train.init_state(s), s)
  assert "mean of sources 1, 2, 3" in capsys.readouterr().out   # 3 middle layers, width 1
  model = train.model_from_state(s, state)
  np.testing.assert_array_equal(model.embed.table[...], source.embed.table[...])
  want = np.mean([np.asarray(source.blocks[i].attn.wq[...]) for i in (1, 2, 3)], 0)
  np.testing.assert_allclose(np.asarray(model.blocks[1].attn.wq[...]), want, atol=1e-7)
  data, losses = ArrayData(cfg), []
  for _ in range(cfg.train.steps):
    state, m = s.train_step(state, train.to_global(s, next(data)))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.5, losses
  assert uptrain.maybe_init_from_source(presets.tiny_config("mor"), state, s) is state
