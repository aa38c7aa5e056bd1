"""MoE Transformer: the vanilla decoder with MoEMLP in every `moe.every`-th block."""
from __future__ import annotations

from flax import nnx

from mor.config import ModelConfig
from mor.layers.moe import MoEMLP, active_experts
from mor.models.transformer import Transformer, count_params


def is_moe_block(cfg: ModelConfig, index: int) -> bool:
  """every=n puts MoE in blocks n-1, 2n-1, ... (every=2: odd blocks, as Switch / GShard)."""
  return (index + 1) % cfg.moe.every == 0


def build_moe_transformer(cfg: ModelConfig, rngs: nnx.Rngs) -> Transformer:
  def mlp_factory(index: int, rngs: nnx.Rngs):
    return MoEMLP(cfg, rngs) if is_moe_block(cfg, index) else None  # None: dense SwiGLU
  return Transformer(cfg, rngs, mlp_factory=mlp_factory)


def moe_layers(model: nnx.Module) -> list[MoEMLP]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoEMLP)]


def set_mode(model: nnx.Module, train: bool) -> None:
  """Train or eval routing (noise, capacity factor, DS-MoE dense vs sparse) for every MoEMLP.

  Same effect on MoE layers as `model.train()` / `model.eval()`.
  """
  for m in moe_layers(model):
    m.deterministic = not train


def moe_param_counts(model: Transformer, experts_per_token: float | None = None) -> dict:
  """Total parameters and those a token touches: all but the unused experts.

  experts_per_token defaults to the router's k; pass the measured
  `moe/experts_per_token` statistic for DS-MoE threshold inference.
  Embeddings are counted in both (as count_params' `applied`).
  """
  c = count_params(model)
  inactive = 0.0
  for m in moe_layers(model):
    e = m.moe.num_experts
    k = active_experts(m.moe) if experts_per_token is None else experts_per_token
    per_expert = sum(w.size for w in m.weights) // e
    inactive += (e - k) * per_expert
  total = c["unique"]
  return {"total": total, "active": total - inactive,
          "total_non_embedding": c["unique_non_embedding"],
          "active_non_embedding": c["unique_non_embedding"] - inactive}


def ds_moe_report(model: Transformer, batches: list[dict]) -> dict:
  """DS-MoE: held-out NLL and active parameters, dense (all experts) vs sparse inference.

  Dense is the training computation (every expert weighted by its gate);
  sparse keeps the experts the config's threshold (or fixed top-K) selects, and
  its active parameters use the measured experts per token.
  """
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  # graphdef is static: it carries the train/eval switch, so each mode compiles its own
  @functools.partial(jax.jit, static_argnums=0)
  def nll_and_k(graphdef, state, inputs, targets):
    logits, _, aux = nnx.merge(graphdef, state)(inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    ks = [v for k, v in aux["stats"].items() if k.endswith("moe/experts_per_token")]
    return nll, jnp.mean(jnp.stack(ks))

  out = {}
  for mode, train in (("dense", True), ("sparse", False)):
    set_mode(model, train)
    graphdef, state = nnx.split(model)
    rows = [nll_and_k(graphdef, state, b["inputs"], b["targets"]) for b in batches]
    nll = float(np.mean([float(r[0]) for r in rows]))
    # dense inference touches every expert; the statistic counts the threshold's choice
    k = (float(moe_layers(model)[0].moe.num_experts) if train else
         float(np.mean([float(r[1]) for r in rows])))
    counts = moe_param_counts(model, experts_per_token=k)
    out[mode] = {"eval_nll": nll, "experts_per_token": k,
                 "active_non_embedding": counts["active_non_embedding"],
                 "total_non_embedding": counts["total_non_embedding"]}
  set_mode(model, True)
  return out
