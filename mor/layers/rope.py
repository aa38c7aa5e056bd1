"""Rotary position embedding at arbitrary (per-token) positions.

Positions are explicit so that a token gathered out of its sequence (a MoR
depth keeps only some tokens) is still rotated by its original position.
"""
import jax
import jax.numpy as jnp


def apply_rope(x_BxSxNxH: jax.Array, pos_BxS: jax.Array, theta: float) -> jax.Array:
  """Rotates the two halves of each head by angle pos * theta^(-2i/H)."""
  h = x_BxSxNxH.shape[-1]
  freq = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
  ang_BxSxF = pos_BxS.astype(jnp.float32)[..., None] * freq
  cos = jnp.cos(ang_BxSxF)[:, :, None, :]
  sin = jnp.sin(ang_BxSxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxSxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxSxNxH.dtype)
