"""Sharded training equals the single-device step; the rules table is strict."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mor import config, sharding, train
from tests.test_train import ArrayData, tiny_cfg


def step_on(cfg, devices):
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = train.init_state(s)
  batch = train.to_global(s, next(ArrayData(cfg)))
  state, m = s.train_step(state, batch)
  return float(m["loss"]), jax.tree.map(np.asarray, state["params"]), state


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4), dict(data=4, tensor=2),
                                  dict(data=1, fsdp=2, tensor=4)])
def test_sharded_step_equals_single_device(mesh):
  """A sharded train step (data, FSDP, tensor) gives the single-device loss and params."""
  assert jax.device_count() == 8
  cfg = config.replace(tiny_cfg(), mesh=dict(data=-1, fsdp=1, tensor=1, expert=1))
  ref_loss, ref_params, _ = step_on(cfg, jax.devices()[:1])
  cfg8 = config.replace(cfg, mesh={**dict(data=1, fsdp=1, tensor=1), **mesh})
  loss, params, state = step_on(cfg8, jax.devices())
  assert abs(loss - ref_loss) < 1e-5
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  if mesh.get("fsdp", 1) > 1 or mesh.get("tensor", 1) > 1:
    assert not sharding.report_replicated(state["params"], min_size=1024)


@pytest.mark.parametrize("router", [dict(routing="expert_choice"),
                                    dict(routing="token_choice", gate="softmax", alpha=1.0)])
def test_sharded_mor_step_equals_single_device(router):
  cfg = config.replace(tiny_cfg(), model={"kind": "mor", "router": router},
                       mesh=dict(data=-1, fsdp=1, tensor=1, expert=1))
  ref_loss, ref_params, _ = step_on(cfg, jax.devices()[:1])
  cfg8 = config.replace(cfg, mesh=dict(data=2, fsdp=2, tensor=2))
  loss, params, _ = step_on(cfg8, jax.devices())
  assert abs(loss - ref_loss) < 1e-5
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.quick
def test_golden_partition_specs():
  """Catches a rule that silently replicates a weight family (checked: 'mlp' -> None)."""
  cfg = config.replace(tiny_cfg(), mesh=dict(data=2, fsdp=2, tensor=2))
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh))
  specs = {jax.tree_util.keystr(p): sh.spec for p, sh in
           jax.tree_util.tree_leaves_with_path(s.state_shardings["params"])}
  golden = {
      "['embed']['table']": P("tensor", "fsdp"),
      "['blocks'][1]['attn']['wq']": P("fsdp", "tensor", None),
      "['blocks'][1]['attn']['wk']": P("fsdp", "tensor", None),
      "['blocks'][1]['attn']['wo']": P("tensor", None, "fsdp"),
      "['blocks'][1]['mlp']['w_gate']": P("fsdp", "tensor"),
      "['blocks'][1]['mlp']['w_down']": P("tensor", "fsdp"),
      "['blocks'][1]['attn_norm']['scale']": P(None),
  }
  for name, spec in golden.items():
    assert specs[name] == spec, (name, specs[name])
  # Adam moments follow their parameters
  opt_specs = [sh.spec for sh in jax.tree.leaves(s.state_shardings["opt"])]
  assert P("tensor", "fsdp") in opt_specs


@pytest.mark.quick
def test_rules_fail_loudly():
  with pytest.raises(config.ConfigError, match="unknown logical axis 'layers'"):
    sharding.logical_to_spec(("layers", "embed"))
  with pytest.raises(config.ConfigError, match="map mesh axis \\['fsdp'\\] twice"):
    sharding.logical_to_spec(("embed", "embed"))
  with pytest.raises(config.ConfigError, match="does not match the 8 available devices"):
    sharding.make_mesh(config.MeshConfig(data=3, fsdp=1))
  with pytest.raises(config.ConfigError, match="not divisible"):
    sharding.make_mesh(config.MeshConfig(data=-1, fsdp=3))
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  # a dimension the mesh axis cannot divide stays replicated
  assert sharding.logical_to_spec(("kv_heads",), mesh, (3,)) == P(None)
