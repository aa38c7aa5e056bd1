"""Parameters with logical axis names, dense projections, RMSNorm and embeddings.

Every parameter carries `axes`, a tuple of logical axis names that
`mor.sharding` maps to mesh axes. Dense projections flatten activations to
[tokens, features] before the matmul: XLA on CPU runs 2-D dots much faster than
the same work as a 3-D einsum (see REFERENCE.md section 4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple, axes: tuple, std: float = 0.02,
          init: str = "normal") -> nnx.Param:
  """A float32 parameter initialised N(0, std^2) (or zeros/ones), tagged with logical axes."""
  assert len(shape) == len(axes), (shape, axes)
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    raise ValueError(f"init={init!r}; choose normal, zeros or ones")
  return nnx.Param(value, axes=axes)


# Named scope of the loops tuned for CPU caches (blocked attention rows, the SwiGLU
# backward). They are traced only in lax.platform_dependent's cpu branch; the name lets
# tests/test_export.py check that no cuda/tpu program contains them.
CPU_LOOP_SCOPE = "cpu_tuned_loop"


def num_chunks(n: int, min_size: int) -> int:
  """The most equal chunks of n items that leave at least min(min_size, n) items each.

  For loops that keep a chunk of work in cache (blocked attention, the SwiGLU
  backward): static, and 1 when n is small.
  """
  return max(d for d in range(1, n + 1) if n % d == 0 and n // d >= min(min_size, n))


def split_strided(x: jax.Array, chunks: int) -> jax.Array:
  """[N, ...] -> [chunks, N / chunks, ...]; chunk j takes items j, j + chunks, ...

  Strided, so that items sharded over devices (the batch) stay sharded inside
  every iteration of a loop over the chunks: each device works on its own items.
  """
  return jnp.moveaxis(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 1, 0)


def merge_strided(x: jax.Array) -> jax.Array:
  """The inverse of split_strided."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def dense(x_NxD: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x @ w over the leading feature axes of w; x is [..., D], w is [D, ...out]."""
  lead, d = x_NxD.shape[:-1], x_NxD.shape[-1]
  out = w.shape[1:]
  y = x_NxD.reshape(-1, d).astype(dtype) @ w.reshape(d, -1).astype(dtype)
  return y.reshape(*lead, *out)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale; statistics in float32."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), ("norm",), init="ones")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...]).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding; `attend` gives logits when the embedding is tied to the head."""

  def __init__(self, vocab: int, dim: int, std: float, rngs: nnx.Rngs):
    self.table = param(rngs, (vocab, dim), ("vocab", "embed"), std=std)

  def __call__(self, tokens_BxS: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table[...], tokens_BxS, axis=0).astype(dtype)

  def attend(self, x_BxSxD: jax.Array, dtype) -> jax.Array:
    return dense(x_BxSxD, self.table[...].T, dtype)
