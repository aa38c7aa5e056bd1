"""Config presets: the paper's model sizes, CPU-sized runs, benchmark shapes and the
rows of the paper's comparison (`variant_config`). The schema and its validation live in
mor.config."""
from __future__ import annotations

from mor.config import (Config, DataConfig, ModelConfig, RouterConfig, TrainConfig, _choice,
                        validate)

# The paper's shapes (its table of model sizes).
_PAPER = dict(
    # name: (layers, d_model, heads, kv_heads, ffn)
    **{"135m": (30, 576, 9, 3, 1536), "360m": (32, 960, 15, 5, 2560),
       "730m": (26, 1536, 24, 8, 4096), "1.7b": (24, 2048, 32, 32, 8192)})


def paper_model(size: str, **overrides) -> ModelConfig:
  """One of the paper's shapes: 135m, 360m, 730m, 1.7b (SmolLM vocabulary, 2048 context)."""
  _choice("size", size, tuple(_PAPER))
  layers, d, h, kv, ffn = _PAPER[size]
  base = dict(vocab_size=49152, num_layers=layers, d_model=d, num_heads=h, num_kv_heads=kv,
              ffn_dim=ffn, max_seq_len=2048, dtype="bfloat16")
  base.update(overrides)
  return ModelConfig(**base)


def tiny_model(**overrides) -> ModelConfig:
  """A CPU-sized model that trains in minutes on 2 cores."""
  base = dict(vocab_size=4096, num_layers=8, d_model=256, num_heads=4, num_kv_heads=2,
              ffn_dim=768, max_seq_len=256)
  base.update(overrides)
  return ModelConfig(**base)


def tiny_config(kind: str = "recursive", **model_overrides) -> Config:
  """A CPU-sized run: trains in a few minutes on 2 cores."""
  model = tiny_model(kind=kind, max_seq_len=128, **model_overrides)
  return Config(model=model, data=DataConfig(seq_len=128, batch_size=16),
                train=TrainConfig(steps=200, lr=3e-3, log_every=10, eval_every=100,
                                  eval_batches=8, checkpoint_every=100))


def paper_config(size: str, kind: str = "recursive", flop_budget: float = 16.5e18,
                 **model_overrides) -> Config:
  """The paper's setting: 2048 context, batch 1024 x 2048 tokens, WSD schedule, a FLOP budget."""
  return Config(model=paper_model(size, kind=kind, remat=True, **model_overrides),
                data=DataConfig(seq_len=2048, batch_size=1024),
                train=TrainConfig(steps=0, flop_budget=flop_budget, lr=3e-3, schedule="wsd",
                                  log_every=50, eval_every=1000, checkpoint_every=1000))


def bench_config(name: str, seq_len: int = 512, batch: int = 4, d_model: int = 256,
                 num_layers: int = 8, num_recursions: int = 3, dtype: str = "float32") -> Config:
  """Equal-shape configs for benchmarks: vanilla, recursive, mor_ec, mor_tc, moe."""
  kinds = {"vanilla": ("vanilla", {}), "recursive": ("recursive", {}),
           "mor_ec": ("mor", {"routing": "expert_choice"}),
           "mor_ec_share": ("mor", {"routing": "expert_choice", "kv": "share"}),
           "mor_tc": ("mor", {"routing": "token_choice", "gate": "softmax", "alpha": 1.0}),
           "moe": ("moe", {})}
  _choice("model", name, tuple(kinds))
  kind, router = kinds[name]
  model = tiny_model(kind=kind, d_model=d_model, num_layers=num_layers, ffn_dim=3 * d_model,
                     num_recursions=num_recursions, max_seq_len=seq_len, dtype=dtype,
                     router=RouterConfig(**router))
  return validate(Config(model=model, data=DataConfig(seq_len=seq_len, batch_size=batch),
                         train=TrainConfig(steps=100)))


# The paper's comparison: name -> (kind, N_r, router overrides, model overrides).
_TC = {"routing": "token_choice", "gate": "softmax", "alpha": 1.0}
VARIANTS = {
    "vanilla": ("vanilla", 1, {}, {}),
    # the control: vanilla with only the unshared (first and last) layers of the middle-cycle plan
    "vanilla_unshared": ("vanilla", 1, {}, {"num_layers": 2}),
    "recursive2": ("recursive", 2, {}, {}), "recursive3": ("recursive", 3, {}, {}),
    "recursive4": ("recursive", 4, {}, {}),
    # sharing-strategy ablation (recursive3 is middle-cycle)
    "recursive3_cycle": ("recursive", 3, {}, {"sharing": "cycle"}),
    "recursive3_sequence": ("recursive", 3, {}, {"sharing": "sequence"}),
    "recursive3_middle_sequence": ("recursive", 3, {}, {"sharing": "middle_sequence"}),
    "mor_ec2": ("mor", 2, {}, {}), "mor_ec3": ("mor", 3, {}, {}), "mor_ec4": ("mor", 4, {}, {}),
    "mor_ec3_share": ("mor", 3, {"kv": "share"}, {}),
    # the combine ablation: full block update forward, router gradient through g
    "mor_ec3_st": ("mor", 3, {"combine": "straight_through"}, {}),
    "mor_tc3": ("mor", 3, _TC, {}),
    "mor_tc3_share": ("mor", 3, {**_TC, "kv": "share"}, {}),
}

# `--scale cpu`: the shape, data and optimiser chosen so that recursion matters on 2 CPU
# cores (docs/results.md); filled by cpu_config.
# A small vocabulary and short batches: the LM head is a smaller share of the FLOPs, and a
# FLOP budget buys more optimiser steps (probes in docs/results.md).
CPU_MODEL = dict(vocab_size=2048, d_model=128, num_heads=4, num_kv_heads=2, ffn_dim=384,
                 max_seq_len=64)
CPU_DATA = dict(seq_len=64, batch_size=8)
CPU_TRAIN = dict(lr=3e-3, log_every=10, eval_every=0, eval_batches=16, checkpoint_every=0)
CPU_ROUTER: dict = {}   # router fields every CPU MoR row overrides (e.g. combine)
CPU_LAYERS = 8


def _num_layers(base: int, n_r: int, sharing: str) -> int:
  """base rounded up so the shared part divides by N_r (the paper's 32 -> 34 for N_r = 4)."""
  if sharing.startswith("middle_"):
    return 2 + -(-(base - 2) // n_r) * n_r
  return -(-base // n_r) * n_r


def variant_config(variant: str, scale: str = "cpu", flop_budget: float = 16.5e18) -> Config:
  """One row of the paper's tables at CPU scale or at a paper size (135m ... 1.7b)."""
  _choice("variant", variant, tuple(VARIANTS))
  _choice("scale", scale, ("cpu",) + tuple(_PAPER))
  kind, n_r, router, extra = VARIANTS[variant]
  base = CPU_LAYERS if scale == "cpu" else _PAPER[scale][0]
  if scale == "cpu" and kind == "mor":
    router = {**router, **CPU_ROUTER}
  sharing = extra.get("sharing", "middle_cycle")
  model = dict(kind=kind, num_recursions=n_r, sharing=sharing,
               num_layers=_num_layers(base, n_r, sharing), router=RouterConfig(**router))
  model.update({k: v for k, v in extra.items() if k != "sharing"})
  if scale == "cpu":
    cfg = Config(model=ModelConfig(**{**CPU_MODEL, **model}), data=DataConfig(**CPU_DATA),
                 train=TrainConfig(steps=0, **CPU_TRAIN))
  else:
    cfg = paper_config(scale, flop_budget=flop_budget, **model)
  return validate(cfg)
