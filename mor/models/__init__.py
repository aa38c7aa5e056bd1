"""Model construction: build_model is the only place that looks at model.kind."""
from __future__ import annotations

from flax import nnx

from mor.config import ModelConfig
from mor.models.sharing import Plan, make_plan
from mor.models.transformer import Transformer, count_params, merge_aux


def build_model(cfg: ModelConfig, rngs: nnx.Rngs | int = 0) -> nnx.Module:
  """Builds the model for cfg.kind with parameters initialised from rngs."""
  rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
  if cfg.kind in ("vanilla", "recursive"):
    return Transformer(cfg, rngs)
  if cfg.kind == "mor":
    from mor.models.mor import MoRTransformer
    return MoRTransformer(cfg, rngs)
  if cfg.kind == "moe":
    from mor.models.moe import build_moe_transformer
    return build_moe_transformer(cfg, rngs)
  raise ValueError(f"model.kind={cfg.kind!r}; choose vanilla, recursive, mor or moe")
