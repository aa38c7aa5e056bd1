"""SwiGLU feed-forward block."""
import jax
from flax import nnx

from mor.layers.basic import dense, param


class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up)), computed on flattened tokens."""

  def __init__(self, d_model: int, ffn_dim: int, std: float, rngs: nnx.Rngs):
    self.w_gate = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std)
    self.w_up = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std)
    self.w_down = param(rngs, (ffn_dim, d_model), ("mlp", "embed"), std)

  def __call__(self, x_NxD: jax.Array) -> jax.Array:
    dt = x_NxD.dtype
    h_NxF = jax.nn.silu(dense(x_NxD, self.w_gate[...], dt)) * dense(x_NxD, self.w_up[...], dt)
    return dense(h_NxF, self.w_down[...], dt)
