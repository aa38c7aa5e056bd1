"""Configs: every file in configs/ builds a model; bad values fail early, in one line."""
import glob
import importlib.util
import os

import jax
import pytest
from flax import nnx

from mor import config, presets
from mor.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_files_build_a_model(path):
  cfg = config.from_dict(load(path))
  model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
  assert jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("section,field,value,match", [
    ("model", "sharing", "spiral", "model.sharing='spiral' is not allowed; choose one of cycle"),
    ("model", "num_layers", 9, "model.num_layers=9: num_layers - 2=7 must be a positive multiple"),
    ("model", "kind", "rnn", "model.kind='rnn' is not allowed"),
    ("model", "num_heads", 5, "model.num_heads=5 must be a multiple of model.num_kv_heads"),
    ("model", "depth", 3, "unknown field model.depth"),
    ("train", "schedule", "exp", "train.schedule='exp' is not allowed"),
    ("data", "seq_len", 4096, "data.seq_len=4096 exceeds model.max_seq_len"),
    ("mesh", "data", 0, "mesh.data=0 must be a positive size or -1"),
    ("model", "dtype", "float16", "model.dtype='float16' is not allowed"),
])
def test_bad_values_raise_one_line_errors(section, field, value, match):
  base = config.to_dict(presets.tiny_config())
  base[section][field] = value
  with pytest.raises(config.ConfigError, match=match) as e:
    config.from_dict(base)
  assert "\n" not in str(e.value)


def test_unknown_section_and_type_errors():
  with pytest.raises(config.ConfigError, match="unknown field optim"):
    config.from_dict({"optim": {}})
  with pytest.raises(config.ConfigError, match="model.num_layers='eight' must be a number"):
    config.from_dict({"model": {"num_layers": "eight"}})


def test_paper_presets_have_the_papers_shapes():
  m = presets.paper_model("360m")
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.ffn_dim) == (32, 960, 15, 5,
                                                                              2560)
  with pytest.raises(config.ConfigError, match="size='2b'"):
    presets.paper_model("2b")


@pytest.mark.parametrize("variant,paper_unique", [("vanilla", 315e6), ("recursive2", 167e6),
                                                  ("mor_ec3", 118e6), ("recursive4", 98e6)])
def test_paper_variants_have_the_papers_unique_parameters(variant, paper_unique):
  from mor.models import count_params
  cfg = presets.variant_config(variant, "360m")
  model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
  assert count_params(model)["unique_non_embedding"] == pytest.approx(paper_unique, rel=0.03)
  small = presets.variant_config(variant, "cpu")
  assert nnx.eval_shape(lambda: build_model(small.model, nnx.Rngs(0))) is not None
