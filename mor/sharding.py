"""Device mesh and the one table from logical axis names to mesh axes.

Parameters are tagged with logical names (`mor.layers.basic.param`); this file
alone decides where they live. FSDP shards the embed axis of every weight
over `fsdp`; Megatron-style tensor parallelism shards heads and the MLP hidden
axis over `tensor`; experts go over `expert`; batches over (data, fsdp).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mor.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "expert": "expert",
    "router": None,         # small router outputs (depths, expert logits)
}


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor, expert) mesh; one size may be -1 to take the rest.

  Axis types are Auto: shardings are pinned at jit boundaries and on parameters,
  and XLA propagates them through the model.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [getattr(cfg, a) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes "
                        f"(product {known}) of mesh={sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh: data*fsdp*tensor*expert={math.prod(sizes)} does not match the "
                      f"{len(devices)} available devices")
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple, mesh: Mesh | None = None, shape: tuple | None = None) -> P:
  """PartitionSpec for logical axes; fails loudly on unknown or doubly-used mesh axes.

  A dimension whose size the mesh axes do not divide is replicated instead
  (e.g. 3 KV heads over tensor=2).
  """
  spec, used = [], set()
  for i, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in LOGICAL_RULES:
      raise ConfigError(f"unknown logical axis {name!r}; known: {', '.join(LOGICAL_RULES)}")
    target = LOGICAL_RULES[name]
    names = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      names = tuple(n for n in names if mesh.shape[n] > 1)
      if shape is not None and shape[i] % math.prod(mesh.shape[n] for n in names):
        names = ()
    clash = used.intersection(names)
    if clash:
      raise ConfigError(f"logical axes {axes} map mesh axis {sorted(clash)} twice")
    used.update(names)
    spec.append(names[0] if len(names) == 1 else (names or None))
  return P(*spec)


def state_specs(state: nnx.State, mesh: Mesh | None = None) -> Any:
  """PartitionSpecs for a state of nnx Variables (by their `axes` metadata)."""
  def spec(v):
    axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
    shape = v.get_raw_value().shape if isinstance(v, nnx.Variable) else None
    if axes is None:
      return P()
    return logical_to_spec(tuple(axes), mesh, shape)
  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch", "sequence"), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def report_replicated(params: Any, min_size: int = 1 << 16) -> list[str]:
  """Names of large parameters that ended up fully replicated on a multi-device mesh."""
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    sh = getattr(x, "sharding", None)
    if x.size >= min_size and sh is not None and len(sh.device_set) > 1 and \
        sh.is_fully_replicated:
      out.append(jax.tree_util.keystr(path))
  return out


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
  """Pins an activation's layout by logical axes when traced under a mesh; else a no-op.

  Train and eval steps trace under `use_abstract_mesh`, so the model never
  needs a mesh argument and runs unchanged in notebooks and decoding.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, x.shape))


def under_mesh(fn, mesh: Mesh):
  """fn traced with `mesh` as the abstract mesh (for `constrain` inside the model)."""
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped
