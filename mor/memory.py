"""Analytic per-device memory of training and decoding, and whether a run fits.

`estimate(cfg, devices)` counts, per device, in bytes:
- params: the f32 master weights, each sharded as mor.sharding shards it (the
  real logical axes of the model, read from an abstract build);
- optimizer: AdamW's two f32 moments (same sharding), plus the step's f32
  gradients and the update it applies (`grads`);
- activations: what the backward keeps plus the working set of the largest
  piece running at the peak. With remat, each applied layer keeps its input
  [T, D] and one layer is rebuilt at a time; without, every layer keeps its
  own saved tensors. MoR layers of the shared unit count only the tokens that
  reach each depth (mor.routers.capacities). The chunked LM-head loss keeps
  dL/dh and dL/dW and works on one chunk's f32 logits.
- kv_cache (decoding): keys, values and positions of every applied layer for
  `decode_batch` sequences of `decode_len` tokens; MoR's deeper depths hold
  only their capacity share of the tokens.

The per-tensor multipliers (how many [T, D]-sized tensors a layer keeps, how
many f32 copies of a logits chunk) were read off the train-step programs and
checked against XLA's own figure (`compile().memory_analysis()`, arguments +
temporaries) on CPU (tests/test_memory.py, within 15%). Accelerator compilers
fuse differently; treat the estimate as a plan, not a promise, and keep
`usable` headroom (docs/accelerators.md).
"""
from __future__ import annotations

import dataclasses
import functools
import math

from mor import config as config_lib
from mor.config import Config, ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")
CE_CHUNK_TOKENS = 1024          # train.lm_head_cross_entropy's default chunk


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  memory_bytes: float           # HBM per device
  peak_flops: float             # dense bf16 FLOP/s per device


ACCELERATORS = {
    "h100": Accelerator("h100", 80e9, 989e12),
    "h200": Accelerator("h200", 141e9, 989e12),
    "a100": Accelerator("a100", 80e9, 312e12),
    "tpu_v5e": Accelerator("tpu_v5e", 16e9, 197e12),
    "tpu_v5p": Accelerator("tpu_v5p", 95e9, 459e12),
    "tpu_v4": Accelerator("tpu_v4", 32e9, 275e12),
}

# How many tensors of each size the train-step program keeps (module docstring).
# Accelerator programs: counted from what each layer saves for its backward.
RESIDUAL_PER_LAYER = 8          # [T, D]-sized tensors one layer keeps for its backward
HEADS_PER_LAYER = 3             # [T, heads * head_dim]-sized ones (q, k, v, context)
FFN_PER_LAYER_AUTODIFF = 3      # [T, F] ones (SwiGLU runs autodiff off CPU)
LOGITS_COPIES = 4               # f32 [chunk, V] tensors live in the loss's chunk
UPDATE_COPIES = 1               # f32 parameter-sized temporaries of the optimizer update
# The CPU program, fitted to XLA:CPU's memory_analysis of vanilla train steps (d 128-256,
# 4-8 layers, 512-2048 tokens, V 512-8192): it keeps ~17.5 f32 [T, D] per layer whether or
# not the blocks are rematerialised, computes in f32 even for bf16, and holds ~1.7
# parameter-sized f32 temporaries and ~2.6 f32 logits chunks.
CPU_PER_LAYER = 17.5
CPU_UPDATE_COPIES = 1.67
CPU_LOGITS_COPIES = 2.6


def accelerator(name: str) -> Accelerator:
  config_lib._choice("accelerator", name, tuple(ACCELERATORS))
  return ACCELERATORS[name]


def mesh_sizes(mesh: MeshConfig, devices: int) -> dict:
  """{axis: size} of cfg.mesh on `devices` devices (one axis may be -1: the rest)."""
  if devices < 1:
    raise ConfigError(f"devices={devices} must be >= 1")
  sizes = {a: getattr(mesh, a) for a in MESH_AXES}
  known = math.prod(v for v in sizes.values() if v != -1)
  free = [a for a, v in sizes.items() if v == -1]
  if free:
    if devices % known:
      raise ConfigError(f"mesh: devices={devices} is not divisible by the fixed axes "
                        f"{_fmt(sizes)} (product {known})")
    sizes[free[0]] = devices // known
  if math.prod(sizes.values()) != devices:
    raise ConfigError(f"mesh: data*fsdp*tensor*expert={math.prod(sizes.values())} "
                      f"({_fmt(sizes)}) does not match devices={devices}")
  return sizes


def _fmt(sizes: dict) -> str:
  return ",".join(f"{a}={v}" for a, v in sizes.items())


def _param_bytes(cfg: Config, sizes: dict) -> tuple[float, float, int]:
  """(f32 bytes per device, f32 bytes unsharded, parameter count) from an abstract build."""
  return _param_bytes_cached(cfg.model, tuple(sizes.items()))


@functools.lru_cache(maxsize=64)
def _param_bytes_cached(model_cfg, sizes_items: tuple) -> tuple[float, float, int]:
  import jax
  from flax import nnx
  from mor import sharding
  from mor.models import build_model
  sizes = dict(sizes_items)
  model = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  per_device = total = 0.0
  count = 0
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = v.get_raw_value().shape
    n = math.prod(shape)
    spec = sharding.logical_to_spec(tuple(v.get_metadata()["axes"]), mesh, shape)
    split = math.prod(math.prod(sizes[a] for a in ((s,) if isinstance(s, str) else s))
                      for s in spec if s is not None)
    per_device += 4 * n / split
    total += 4 * n
    count += n
  return per_device, total, count


def _token_layers(cfg: Config) -> float:
  """Applied layers weighted by the fraction of the sequence each one runs on."""
  from mor.models.sharing import make_plan
  m, s = cfg.model, cfg.data.seq_len
  plan = make_plan(m)
  if m.kind != "mor":
    return float(len(plan.applied))
  from mor.routers import capacities
  unit = sum(k / s for k in capacities(m, s)) * len(plan.unit)
  return len(plan.prefix) + unit + len(plan.suffix)


def estimate(cfg: Config, devices: int, batch: int | None = None, remat: bool | None = None,
             decode_batch: int = 0, decode_len: int = 0, platform: str = "gpu") -> dict:
  """Per-device bytes: params, optimizer (moments + grads + update), activations, batch,
  kv_cache and total; plus the inputs used. batch: global sequences (default the config's).

  platform "cpu" counts the CPU program (SwiGLU's chunked backward saves no [T, F]
  tensors); anything else the accelerator one.
  """
  m = cfg.model
  sizes = mesh_sizes(cfg.mesh, devices)
  batch = cfg.data.batch_size if batch is None else batch
  remat = m.remat if remat is None else remat
  rows = sizes["data"] * sizes["fsdp"]
  tensor = sizes["tensor"]
  bc = 2 if m.dtype == "bfloat16" else 4
  params, params_total, count = _param_bytes(cfg, sizes)
  cpu = platform == "cpu"
  optimizer = (2 + 1 + UPDATE_COPIES) * params        # moments, grads, update
  if cpu:
    optimizer = (2 + CPU_UPDATE_COPIES) * params
  micro = batch / cfg.train.grad_accum
  t = math.ceil(micro / rows) * cfg.data.seq_len      # tokens per device per micro-batch
  d, heads = m.d_model, m.num_heads * m.dh
  kv = 2 * m.num_kv_heads * m.dh
  ffn = (m.moe.expert_ffn_dim or m.ffn_dim) if m.kind == "moe" else m.ffn_dim
  per_layer = t * (RESIDUAL_PER_LAYER * d * bc + HEADS_PER_LAYER * (heads + kv) * bc / tensor
                   + FFN_PER_LAYER_AUTODIFF * ffn * bc / tensor)
  if m.kind == "moe":   # dispatched copies of the tokens at each expert (top_k, capacity)
    per_layer += t * m.moe.top_k * m.moe.capacity_factor * d * bc * 2
  layers = _token_layers(cfg)
  kept = layers * (t * d * bc if remat else per_layer)
  working = per_layer if remat else 0.0               # the one layer rebuilt at a time
  if cpu:
    kept, working = layers * CPU_PER_LAYER * t * d * 4, 0.0
  chunk = min(t, CE_CHUNK_TOKENS)
  vocab = m.vocab_size / (tensor if m.vocab_size % tensor == 0 else 1)
  copies = CPU_LOGITS_COPIES if cpu else LOGITS_COPIES
  loss = copies * chunk * vocab * 4 + (0.0 if cpu else t * d * bc + d * vocab * 4)
  activations = kept + working + loss
  batch_bytes = 2 * t * 4 * cfg.train.grad_accum
  cache = kv_cache_bytes(cfg, sizes, decode_batch, decode_len) if decode_batch else 0.0
  total = params + optimizer + activations + batch_bytes
  return {"params": params, "optimizer": optimizer, "activations": activations,
          "batch": batch_bytes, "kv_cache": cache, "total": total,
          "param_count": count, "params_unsharded": params_total, "mesh": sizes,
          "tokens_per_device": t, "remat": remat, "global_batch": batch}


def kv_cache_bytes(cfg: Config, sizes: dict, batch: int, max_len: int) -> float:
  """Per-device bytes of decoding caches (keys, values in compute dtype, int32 positions)."""
  from mor.models.sharing import make_plan
  m = cfg.model
  plan = make_plan(m)
  bc = 2 if m.dtype == "bfloat16" else 4
  heads = m.num_kv_heads / (sizes["tensor"] if m.num_kv_heads % sizes["tensor"] == 0 else 1)
  rows = math.ceil(batch / (sizes["data"] * sizes["fsdp"]))
  per_slot = 2 * heads * m.dh * bc + 4
  if m.kind == "mor":
    from mor.models.mor_decode import depth_slots
    slots = depth_slots(m, max_len, "capacity")
    unit = sum(slots[:1] if m.router.kv == "share" else slots) * len(plan.unit)
    entries = (len(plan.prefix) + len(plan.suffix)) * max_len + unit
  else:
    entries = len(plan.applied) * max_len
  return rows * entries * per_slot


def largest_batch(cfg: Config, devices: int, budget: float, **kw) -> int:
  """The largest global batch (a multiple of data * fsdp) whose estimate fits budget; 0: none."""
  sizes = mesh_sizes(cfg.mesh, devices)
  step = sizes["data"] * sizes["fsdp"] * cfg.train.grad_accum
  fits = lambda n: estimate(cfg, devices, batch=n * step, **kw)["total"] <= budget
  if not fits(1):
    return 0
  hi = 1
  while fits(hi * 2) and hi < 1 << 20:
    hi *= 2
  lo, hi = hi, hi * 2                      # fits(lo), not fits(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo * step


def plan(cfg: Config, accelerator_name: str, devices: int, mfu: float = 0.4,
         usable: float = 0.9) -> dict:
  """Fit, largest batch and expected step time of cfg on `devices` accelerators.

  usable: the share of device memory the program may take (the runtime, the
  allocator and compiler scratch keep the rest).
  """
  acc = accelerator(accelerator_name)
  if not 0 < mfu <= 1:
    raise ConfigError(f"mfu={mfu} must be in (0, 1]")
  if not 0 < usable <= 1:
    raise ConfigError(f"usable={usable} must be in (0, 1]")
  est = estimate(cfg, devices)
  from mor import flops
  budget = usable * acc.memory_bytes
  step_flops = flops.train_flops_per_step(cfg.model, cfg.data.seq_len, cfg.data.batch_size)
  step_s = step_flops / (devices * acc.peak_flops * mfu)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  return {"accelerator": acc.name, "devices": devices, "mesh": est["mesh"],
          "memory_per_device_gb": acc.memory_bytes / 1e9, "budget_gb": budget / 1e9,
          "estimate_gb": {k: round(est[k] / 1e9, 3) for k in
                          ("params", "optimizer", "activations", "batch", "total")},
          "fits": est["total"] <= budget, "global_batch": cfg.data.batch_size,
          "largest_batch": largest_batch(cfg, devices, budget), "remat": est["remat"],
          "param_count": est["param_count"], "mfu": mfu, "step_flops": step_flops,
          "step_time_s": step_s, "tokens_per_s": tokens / step_s}
