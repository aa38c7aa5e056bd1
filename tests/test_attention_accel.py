"""Accelerator attention: the splash kernel against the XLA path, and `auto` by platform.

The splash kernel runs here in Pallas interpret mode (the TPU program itself is
checked by export in test_export.py). Shapes cover causal GQA self-attention,
MoR's gathered per-depth sequences (hidden slots at position -1, anywhere) and
a length that is not a multiple of the kernel's 128-row blocks (padded).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P

from mor import config, sharding
from mor.layers import attention as A
from mor.layers.basic import CPU_LOOP_SCOPE

B, N, K, H = 2, 4, 2, 16


def inputs(s: int, hidden: float, dtype, seed: int = 0, b: int = B):
  """q, kv, positions: a gathered subset in original order, a `hidden` share at -1."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, s, N, H))
  k, v = rng.normal(size=(2, b, s, K, H))
  # distinct increasing positions with gaps: a subset gathered in original order
  pos = np.stack([np.sort(rng.choice(4 * s, size=s, replace=False)) for _ in range(b)])
  pos = np.where(rng.random((b, s)) < hidden, -1, pos).astype(np.int32)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), A.KV(cast(k), cast(v), jnp.asarray(pos)), jnp.asarray(pos)


def loss_of(impl: str):
  def loss(q, k, v, pos):
    out = A.attend(q, A.KV(k, v, pos), pos, impl, index_causal=True)
    keep = (pos >= 0)[:, :, None, None]     # hidden query rows are unspecified
    return jnp.sum(jnp.where(keep, out, 0).astype(jnp.float32) ** 2), out
  return loss


@pytest.mark.parametrize("s,hidden,dtype,tol", [
    (96, 0.3, jnp.float32, 1e-5),      # MoR depth: k tokens (padded to 128), hidden anywhere
    (128, 0.0, jnp.bfloat16, 1e-2),    # plain causal GQA
])
def test_splash_interpreted_matches_xla(s, hidden, dtype, tol):
  q, kv, pos = inputs(s, hidden, dtype)
  args = (q, kv.k_BxTxKxH, kv.v_BxTxKxH, pos)
  grad = lambda impl: jax.jit(jax.value_and_grad(loss_of(impl), (0, 1, 2), has_aux=True))
  (_, want), dwant = grad("xla")(*args)
  (_, got), dgot = grad("splash")(*args)
  keep = np.asarray(pos >= 0)
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(got)[keep], f32(want)[keep], atol=tol, rtol=tol)
  for g, w in zip(dgot, dwant):
    scale = max(1.0, float(np.abs(f32(w)).max()))   # gradients of a sum of squares grow
    np.testing.assert_allclose(f32(g) / scale, f32(w) / scale, atol=tol, rtol=tol)


def test_splash_under_a_mesh_runs_per_device_and_matches():
  """On a (data, tensor) mesh the kernel runs under shard_map; numbers unchanged."""
  mesh = sharding.make_mesh(config.MeshConfig(data=4, tensor=2))
  q, kv, pos = inputs(128, 0.3, jnp.float32)
  q, kv, pos = jax.tree.map(lambda x: jnp.concatenate([x, x]), (q, kv, pos))  # 4 over data=4
  rows = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))

  def fwd(impl):
    return jax.jit(sharding.under_mesh(
        lambda q, kv, p: A.attend(q, kv, p, impl, index_causal=True), mesh))

  args = (rows(q), jax.tree.map(rows, kv), rows(pos))
  text = jax.jit(sharding.under_mesh(lambda q, kv, p: A.attend(q, kv, p, "splash", True),
                                     mesh)).lower(*args).as_text()
  assert "sdy.manual_computation" in text or "shard_map" in text
  keep = np.asarray(pos >= 0)
  np.testing.assert_allclose(np.asarray(fwd("splash")(*args))[keep],
                             np.asarray(fwd("xla")(*args))[keep], atol=1e-5, rtol=1e-5)


def _targets(text: str) -> set:
  return set(re.findall(r"custom_call @([\w.$-]+)", text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', text))


def test_auto_picks_by_lowering_platform():
  """auto: the splash kernel on TPU, dot_product (no CPU loop) on GPU, blocked loop on CPU."""
  q, kv, pos = inputs(128, 0.0, jnp.bfloat16, b=8)   # 16 (batch, KV head) rows: 4 iterations
  f = jax.jit(lambda q, kv, p: A.attend(q, kv, p, "auto", index_causal=True))
  tpu = export.export(f, platforms=("tpu",))(q, kv, pos).mlir_module()
  cuda = export.export(f, platforms=("cuda",))(q, kv, pos).mlir_module()
  cpu = f.trace(q, kv, pos).lower(lowering_platforms=("cpu",)).as_text(debug_info=True)
  assert "tpu_custom_call" in _targets(tpu)
  assert "tpu_custom_call" not in _targets(cuda) and CPU_LOOP_SCOPE not in cuda
  assert "BNTS,BSNH->BTNH" in cuda    # the einsum of jax.nn.dot_product_attention (XLA form)
  assert f"{CPU_LOOP_SCOPE}_attention/while" in cpu
  # the explicit xla choice: the same blocked products, its row loop on CPU only
  g = jax.jit(lambda q, kv, p: A.attend(q, kv, p, "xla", index_causal=True))
  assert CPU_LOOP_SCOPE not in export.export(g, platforms=("tpu",))(q, kv, pos).mlir_module()


def test_auto_is_the_default_and_equals_xla_on_cpu():
  assert config.ModelConfig().attention == "auto"
  q, kv, pos = inputs(128, 0.3, jnp.float32)
  run = lambda impl: jax.jit(lambda q, kv, p: A.attend(q, kv, p, impl, index_causal=True))
  np.testing.assert_array_equal(np.asarray(run("auto")(q, kv, pos)),
                                np.asarray(run("xla")(q, kv, pos)))
  with pytest.raises(ValueError, match="impl='flash'"):
    A.attend(q, kv, pos, "flash", index_causal=True)
