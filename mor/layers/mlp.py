"""SwiGLU feed-forward block."""
import jax
from flax import nnx

from mor.layers import lora as lora_lib
from mor.layers.basic import param


class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up)), computed on flattened tokens."""

  def __init__(self, d_model: int, ffn_dim: int, std: float, rngs: nnx.Rngs,
               lora: lora_lib.LoRASpec | None = None):
    self.w_gate = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std)
    self.w_up = param(rngs, (d_model, ffn_dim), ("embed", "mlp"), std)
    self.w_down = param(rngs, (ffn_dim, d_model), ("mlp", "embed"), std)
    self.lora = lora_lib.adapters(lora, self, "mlp", rngs)  # per-recursion; None: no relaxation

  def __call__(self, x_NxD: jax.Array, recursion: int | None = None) -> jax.Array:
    dt = x_NxD.dtype
    proj = lambda x, w, t: lora_lib.project(x, w[...], dt, self.lora, t, recursion)
    h_NxF = jax.nn.silu(proj(x_NxD, self.w_gate, "gate")) * proj(x_NxD, self.w_up, "up")
    return proj(h_NxF, self.w_down, "down")
