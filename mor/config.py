"""Frozen configuration dataclasses, presets and validation.

Every run is described by one `Config`. Config files in configs/ return an
`ml_collections.ConfigDict` from `get_config()`; `from_dict` turns it (or any
nested dict) into a `Config`, failing with a one-line error on unknown fields
or bad values before any compute happens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

MODEL_KINDS = ("vanilla", "recursive", "mor", "moe")
SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
DTYPES = ("float32", "bfloat16")
ROUTINGS = ("expert_choice", "token_choice")
KV_MODES = ("cache", "share")
SCHEDULES = ("wsd", "cosine", "constant")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
FLOP_CONVENTIONS = ("paper", "training")   # mor.flops.CONVENTION_FACTOR
COMBINES = ("reference", "residual", "straight_through")
UPTRAIN_STRATEGIES = ("stepwise", "average", "lower", "upper", "random")
# auto (default): by lowering platform, splash on TPU, dot_product on GPU, xla elsewhere;
# xla: causal key blocks skipped (on CPU looped over (batch, KV head) rows to stay in
# cache); xla_dense: one masked S x T product; dot_product: jax.nn.dot_product_attention
# (cuDNN flash on GPU); splash: Pallas TPU kernel (interpreted off TPU). docs/accelerators.md
ATTENTIONS = ("xla", "xla_dense", "dot_product", "splash", "auto")


class ConfigError(ValueError):
  """A bad configuration value, raised before any compute."""


@dataclass(frozen=True)
class RouterConfig:
  """Mixture-of-Recursions depth router (used when model.kind == 'mor')."""
  routing: str = "expert_choice"      # expert_choice | token_choice
  head: str = "linear"                # linear | mlp
  gate: str = "sigmoid"               # sigmoid | tanh (expert); softmax | sigmoid (token)
  alpha: float = 0.1                  # gate scale; token-choice uses 1.0 in the paper
  temperature: float = 1.0
  capacities: tuple = ()              # per-step fraction kept; () = (N_r - r + 1) / N_r
  causal: str = "aux_loss"            # aux_loss | aux_router  (expert-choice inference)
  aux_loss_coef: float = 0.001        # BCE "was selected" loss (expert-choice)
  balance: str = "loss"               # loss | loss_free (token-choice)
  balance_coef: float = 0.1
  bias_update_rate: float = 0.001     # loss-free balancing step u
  capacity_factor: float = 1.0        # token-choice per-depth slots = cf * S / N_r ...
  z_loss_coef: float = 0.0
  warmup_steps: int = 0               # capacity warm-up (EC) / forced full depth (TC)
  kv: str = "cache"                   # cache | share
  threshold: float = 0.5              # causal decision on sigmoid(logit)
  combine: str = "reference"          # reference (1+g)H + g delta | residual | straight_through
  # token-choice on a depth task: each token's depth from the data, not the router (an
  # oracle: its difficulty; its control: another position's difficulty, same histogram)
  depth_from: str = "router"          # router | difficulty | shifted_difficulty


@dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts MLP (used when model.kind == 'moe')."""
  num_experts: int = 8
  router: str = "top2"                # noisy_topk | switch | top2
  top_k: int = 2
  every: int = 1                      # MoE MLP in every n-th layer
  expert_ffn_dim: int = 0             # 0 = model.ffn_dim
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  dropless: bool = False
  balance_coef: float = 0.01
  importance_coef: float = 0.1
  load_coef: float = 0.1
  z_loss_coef: float = 1e-3
  dense_training: bool = False        # DS-MoE
  mi_loss_coef: float = 0.0
  ds_threshold: float = 0.48          # DS-MoE sparse inference keeps experts with E * p_i >= this
  ds_top_k: int = 0                   # DS-MoE sparse inference with a fixed top-K; 0 = threshold

  def is_moe_layer(self, block: int) -> bool:
    """Every `every`-th block is MoE, counting from 1 (every=2: blocks 1, 3, ...)."""
    return block % self.every == self.every - 1


@dataclass(frozen=True)
class ModelConfig:
  kind: str = "recursive"
  vocab_size: int = 4096
  num_layers: int = 8
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 0                   # 0 = d_model // num_heads
  ffn_dim: int = 768
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  dtype: str = "float32"              # compute dtype; parameters stay f32
  norm_eps: float = 1e-6
  init_std: float = 0.02
  num_recursions: int = 3
  sharing: str = "middle_cycle"
  remat: bool = False
  router: RouterConfig = field(default_factory=RouterConfig)
  moe: MoEConfig = field(default_factory=MoEConfig)
  lora_rank: int = 0                  # per-recursion LoRA on shared blocks (relaxation); 0 = off
  lora_targets: tuple = LORA_TARGETS  # projections that get adapters
  attention: str = "auto"             # attention implementation (ATTENTIONS)

  @property
  def dh(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1


DEPTH_FROM = ("router", "difficulty", "shifted_difficulty")
TASKS = ("hops", "assign")            # depth tasks, data.corpus = "task:NAME" (mor.data.tasks)


@dataclass(frozen=True)
class TaskConfig:
  """A depth task's parameters (used when data.corpus is 'task:hops' or 'task:assign')."""
  min_difficulty: int = 1             # training difficulties: hop counts / dependency depths
  max_difficulty: int = 4
  eval_max_difficulty: int = 8        # held-out range for test-time depth (fixes hops' ids)
  symbols: int = 4                    # hops: alphabet size
  variables: int = 16                 # assign: variable names
  modulus: int = 7                    # assign: values mod this prime

  def vocab_size(self, task: str) -> int:
    """Ids a task uses (mor.data.tasks lays them out)."""
    if task == "hops":      # answers 0..A-1, NONE, then one id per (symbol, hop count)
      return self.symbols + 1 + self.symbols * self.eval_max_difficulty
    return self.modulus + self.variables + 5   # numbers, variables, + * -, '=', padding


@dataclass(frozen=True)
class DataConfig:
  corpus: str = "default"             # default | tfds:NAME | path to text | task:hops|assign
  tokenizer: str = ""                 # SentencePiece model file; "" = train on corpus
  data_dir: str = ""                  # tfds data_dir / cache; "" = ~/.cache/mor
  seq_len: int = 256
  batch_size: int = 16                # global batch, in sequences
  eval_fraction: float = 0.02
  seed: int = 0
  shuffle_window: int = 2048          # packed rows mixed by grain's window shuffle (1 = off)
  task: TaskConfig = field(default_factory=TaskConfig)


@dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  flop_budget: float = 0.0            # stop after this many FLOPs (flop_convention); 0 = off
  flop_convention: str = "paper"      # paper: forward FLOPs (as the paper's budgets) | training
  lr: float = 3e-3
  min_lr_ratio: float = 0.0
  schedule: str = "wsd"
  warmup_frac: float = 0.05
  decay_frac: float = 0.2
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  clip: float = 1.0
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 0           # 0 = only at the end
  keep_checkpoints: int = 2
  peak_flops: float = 0.0             # per device; 0 = table peak, or CPU matmul rate re-measured
  tensorboard: bool = True            # also write DIR's scalars as TensorBoard event files
  wandb: str = ""                     # Weights & Biases project; "" = off (wandb not needed)


@dataclass(frozen=True)
class UptrainConfig:
  """Initialise from a pretrained dense Llama-format folder (mor.uptrain); "" = fresh init."""
  source: str = ""                    # folder with config.json + *.safetensors
  strategy: str = "stepwise"          # stepwise | average | lower | upper | random


@dataclass(frozen=True)
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  uptrain: UptrainConfig = field(default_factory=UptrainConfig)


def _choice(name: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise ConfigError(f"{name}={value!r} must be > 0")


def validate(cfg: Config) -> Config:
  """Raises ConfigError (one line, naming the field) on any inconsistent value."""
  m, r = cfg.model, cfg.model.router
  _choice("model.kind", m.kind, MODEL_KINDS)
  _choice("model.sharing", m.sharing, SHARING)
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.attention", m.attention, ATTENTIONS)
  for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "ffn_dim",
               "max_seq_len", "num_recursions"):
    _positive(f"model.{name}", getattr(m, name))
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of "
                      f"model.num_kv_heads={m.num_kv_heads}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.num_heads="
                      f"{m.num_heads} (or set model.head_dim)")
  if m.kind in ("recursive", "mor"):
    middle = m.sharing.startswith("middle_")
    shared = m.num_layers - 2 if middle else m.num_layers
    if shared <= 0 or shared % m.num_recursions:
      what = "num_layers - 2" if middle else "num_layers"
      raise ConfigError(f"model.num_layers={m.num_layers}: {what}={shared} must be a positive "
                        f"multiple of model.num_recursions={m.num_recursions} for sharing="
                        f"{m.sharing}")
  if m.kind == "mor":
    _choice("model.router.routing", r.routing, ROUTINGS)
    _choice("model.router.head", r.head, ("linear", "mlp"))
    _choice("model.router.kv", r.kv, KV_MODES)
    _choice("model.router.causal", r.causal, ("aux_loss", "aux_router"))
    _choice("model.router.balance", r.balance, ("loss", "loss_free"))
    _choice("model.router.combine", r.combine, COMBINES)
    gates = ("sigmoid", "tanh") if r.routing == "expert_choice" else ("softmax", "sigmoid")
    _choice("model.router.gate", r.gate, gates)
    _choice("model.router.depth_from", r.depth_from, DEPTH_FROM)
    if r.depth_from != "router" and (r.routing != "token_choice" or
                                     not cfg.data.corpus.startswith("task:")):
      raise ConfigError(f"model.router.depth_from={r.depth_from!r} needs model.router.routing="
                        "'token_choice' and a depth task (data.corpus='task:NAME'); "
                        "otherwise use 'router'")
    if m.sharing not in ("cycle", "middle_cycle"):
      raise ConfigError(f"model.sharing={m.sharing!r} is not allowed with model.kind='mor'; "
                        "choose one of cycle, middle_cycle")
    if r.capacities:
      if len(r.capacities) != m.num_recursions:
        raise ConfigError(f"model.router.capacities has {len(r.capacities)} entries; "
                          f"it needs model.num_recursions={m.num_recursions}")
      if any(not 0 < c <= 1 for c in r.capacities) or list(r.capacities) != sorted(
          r.capacities, reverse=True):
        raise ConfigError(f"model.router.capacities={r.capacities} must be non-increasing "
                          "fractions in (0, 1]")
  if m.kind == "moe":
    e = m.moe
    _choice("model.moe.router", e.router, ("noisy_topk", "switch", "top2"))
    _positive("model.moe.num_experts", e.num_experts)
    if not 1 <= e.top_k <= e.num_experts:
      raise ConfigError(f"model.moe.top_k={e.top_k} must be in 1..model.moe.num_experts="
                        f"{e.num_experts}")
  if m.lora_rank < 0 or (m.lora_rank and m.kind not in ("recursive", "mor")):
    raise ConfigError(f"model.lora_rank={m.lora_rank} must be >= 0, and > 0 only for "
                      "model.kind recursive or mor (adapters relax tied blocks)")
  if m.lora_rank and (not m.lora_targets or set(m.lora_targets) - set(LORA_TARGETS)):
    raise ConfigError(f"model.lora_targets={m.lora_targets} must be a non-empty subset of "
                      f"{', '.join(LORA_TARGETS)}")
  _positive("data.shuffle_window", cfg.data.shuffle_window)
  _choice("uptrain.strategy", cfg.uptrain.strategy, UPTRAIN_STRATEGIES)
  if cfg.uptrain.source and m.kind == "moe":
    raise ConfigError("uptrain.source is set but model.kind='moe'; uptraining targets vanilla, "
                      "recursive or mor")
  for name in ("data", "fsdp", "tensor", "expert"):
    v = getattr(cfg.mesh, name)
    if v == 0 or v < -1:
      raise ConfigError(f"mesh.{name}={v} must be a positive size or -1 (fill the rest)")
  if sum(getattr(cfg.mesh, n) == -1 for n in ("data", "fsdp", "tensor", "expert")) > 1:
    raise ConfigError("mesh: at most one of data, fsdp, tensor, expert may be -1")
  d = cfg.data
  for name in ("seq_len", "batch_size"):
    _positive(f"data.{name}", getattr(d, name))
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if not 0 < d.eval_fraction < 1:
    raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
  if d.corpus.startswith("task:"):
    _validate_task(cfg)
  t = cfg.train
  _choice("train.schedule", t.schedule, SCHEDULES)
  _choice("train.flop_convention", t.flop_convention, FLOP_CONVENTIONS)
  for name in ("lr", "log_every", "grad_accum"):
    _positive(f"train.{name}", getattr(t, name))
  if t.steps < 0 or t.flop_budget < 0:
    raise ConfigError("train.steps and train.flop_budget must be >= 0")
  if d.batch_size % t.grad_accum:
    raise ConfigError(f"data.batch_size={d.batch_size} must be divisible by "
                      f"train.grad_accum={t.grad_accum}")
  return cfg


def _validate_task(cfg: Config) -> None:
  d, t = cfg.data, cfg.data.task
  name = d.corpus.split(":", 1)[1]
  _choice("data.corpus", d.corpus, tuple(f"task:{n}" for n in TASKS))
  if not 1 <= t.min_difficulty <= t.max_difficulty <= t.eval_max_difficulty:
    raise ConfigError(f"data.task: need 1 <= min_difficulty ({t.min_difficulty}) <= "
                      f"max_difficulty ({t.max_difficulty}) <= eval_max_difficulty "
                      f"({t.eval_max_difficulty})")
  if t.symbols < 2 or t.modulus < 2:
    raise ConfigError(f"data.task.symbols={t.symbols} and data.task.modulus={t.modulus} "
                      "must be >= 2")
  if name == "assign" and (d.seq_len < 5 or t.variables < d.seq_len // 5):
    raise ConfigError(f"data.task.variables={t.variables} must be >= data.seq_len // 5 = "
                      f"{d.seq_len // 5} (one fresh variable per 5-token statement), and "
                      "data.seq_len >= 5")
  need = t.vocab_size(name)
  if cfg.model.vocab_size < need:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is too small for "
                      f"data.corpus={d.corpus!r}: it needs >= {need}")


def _build(cls, values: Mapping[str, Any], prefix: str):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise ConfigError(f"unknown field {prefix}{key}; allowed: {', '.join(fields)}")
    default = getattr(cls(), key)
    if dataclasses.is_dataclass(default):
      kwargs[key] = _build(type(default), value, f"{prefix}{key}.")
    elif isinstance(default, tuple):
      kwargs[key] = tuple(value)
    elif isinstance(default, bool):
      if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}={value!r} must be true or false")
      kwargs[key] = value
    elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
      raise ConfigError(f"{prefix}{key}={value!r} must be a number")
    elif isinstance(default, float):
      kwargs[key] = float(value)
    elif isinstance(default, int):
      if float(value) != int(value):
        raise ConfigError(f"{prefix}{key}={value!r} must be an integer")
      kwargs[key] = int(value)
    else:
      kwargs[key] = value
  return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> Config:
  """Builds and validates a Config from a nested dict or ConfigDict."""
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  return validate(_build(Config, values, ""))


def to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)


def replace(cfg: Config, **sections: Mapping[str, Any]) -> Config:
  """Returns cfg with some fields of some sections replaced, e.g. model={'num_layers': 4}."""
  values = to_dict(cfg)
  for section, updates in sections.items():
    _merge(values[section], updates)
  return from_dict(values)


def _merge(base: dict, updates: Mapping[str, Any]) -> None:
  for k, v in updates.items():
    if isinstance(v, Mapping) and isinstance(base.get(k), dict):
      _merge(base[k], v)
    else:
      base[k] = v


def as_config_dict(cfg: Config):
  """An ml_collections ConfigDict of every field (so any --config.a.b=... override works)."""
  import ml_collections
  return ml_collections.ConfigDict(to_dict(cfg))
