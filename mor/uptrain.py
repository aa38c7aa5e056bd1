"""Uptraining: a recursive or MoR model initialised from a pretrained dense model.

The target has unique blocks prefix + unit + suffix (mor.models.sharing); the
source has L_s layers. Middle sharing (middle_cycle, middle_sequence): the
prefix block is source layer 0 and the suffix block source layer L_s - 1, and
the unit draws on the source's middle layers [1, L_s - 2]; otherwise on all of
[0, L_s - 1]. Call that range lo..hi (n = hi - lo + 1 layers) and let W be the
unit's width (its number of blocks). Unit block i is initialised from
  stepwise  source round(linspace(lo, hi, W))[i]: W layers evenly spaced with
            both ends kept, about every N_r-th layer (the reference code);
  lower     source lo + i (the first layers);
  upper     source hi - W + 1 + i (the last layers);
  average   the mean of the source layers at the applied positions that share
            block i (cycle, N_r = 3, W = 2: block 0 <- mean(lo, lo+2, lo+4));
            when n differs from the W * N_r applied middle layers, position p
            reads source round(linspace(lo, hi, W * N_r))[p] (as the reference
            subsamples);
  random    nothing: the unit keeps its fresh initialisation (the reference's
            "random" instead copies randomly chosen layers).
round is Python's (half to even), as in the reference. Embeddings, final norm
and LM head are copied; MoR routers and LoRA adapters keep their
initialisation (zero-B adapters leave the copied function unchanged).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mor import interop
from mor.config import UPTRAIN_STRATEGIES, Config, ConfigError, ModelConfig
from mor.layers.lora import block_weights, set_block_weights
from mor.models import make_plan

Mapping = dict[int, tuple[int, ...]]   # unique target block -> source layers (mean); () = fresh


def _spaced(lo: int, hi: int, num: int) -> list[int]:
  return [int(round(float(x))) for x in np.linspace(lo, hi, num)]


def layer_mapping(target: ModelConfig, num_source: int, strategy: str) -> Mapping:
  """Which source layers initialise each unique block of `target` (see the module doc)."""
  if strategy not in UPTRAIN_STRATEGIES:
    raise ConfigError(f"uptrain.strategy={strategy!r} is not allowed; choose one of "
                      f"{', '.join(UPTRAIN_STRATEGIES)}")
  plan = make_plan(target)
  middle = bool(plan.prefix)
  lo, hi = (1, num_source - 2) if middle else (0, num_source - 1)
  width, n = len(plan.unit), hi - lo + 1
  if n < (1 if strategy in ("average", "random") else width):
    raise ValueError(f"a source of {num_source} layers is too shallow for {width} shared "
                     f"blocks (strategy {strategy}, sharing {target.sharing})")
  out: Mapping = {b: (0,) for b in plan.prefix}
  out.update({b: (num_source - 1,) for b in plan.suffix})
  if strategy == "average":
    middle_blocks = plan.applied[len(plan.prefix):len(plan.applied) - len(plan.suffix)]
    src = (list(range(lo, hi + 1)) if n == len(middle_blocks)
           else _spaced(lo, hi, len(middle_blocks)))
    for b in plan.unit:
      out[b] = tuple(s for s, bb in zip(src, middle_blocks) if bb == b)
    return out
  picks = {"stepwise": lambda: _spaced(lo, hi, width), "lower": lambda: range(lo, lo + width),
           "upper": lambda: range(hi - width + 1, hi + 1), "random": lambda: [None] * width}
  for b, s in zip(plan.unit, picks[strategy]()):
    out[b] = () if s is None else (s,)
  return out


def describe_mapping(target: ModelConfig, mapping: Mapping, num_source: int,
                     strategy: str) -> str:
  """A table of unique block <- source layers, printed at start-up."""
  plan = make_plan(target)
  lines = [f"uptrain ({strategy}): {num_source} source layers -> {target.kind} "
           f"({target.sharing if target.kind != 'vanilla' else 'untied'}, "
           f"N_r={plan.num_recursions}, {len(plan.applied)} applied layers, "
           f"{plan.num_blocks} unique blocks)"]
  for b in range(plan.num_blocks):
    role = "prefix" if b in plan.prefix else "suffix" if b in plan.suffix else "shared"
    uses = ", ".join(str(j) for j, bb in enumerate(plan.applied) if bb == b)
    src = mapping[b]
    what = ("fresh init" if not src else f"source {src[0]}" if len(src) == 1
            else "mean of sources " + ", ".join(map(str, src)))
    lines.append(f"  block {b:<3d} {role:<7s} layers {uses:<16s} <- {what}")
  lines.append("  embeddings, final norm, LM head <- source; routers, LoRA adapters <- fresh init")
  return "\n".join(lines)


def _check_compatible(target: ModelConfig, source: ModelConfig) -> None:
  fields = ("vocab_size", "d_model", "num_heads", "num_kv_heads", "dh", "ffn_dim", "rope_theta",
            "norm_eps")
  diff = [f"model.{f}={getattr(target, f)} (source {getattr(source, f)})" for f in fields
          if getattr(target, f) != getattr(source, f)]
  if target.tie_embeddings and not source.tie_embeddings:
    diff.append("model.tie_embeddings=True (the source has its own LM head)")
  if diff:
    raise ConfigError("uptrain: the model does not match the source: " + "; ".join(diff))


def init_from_dense(model: nnx.Module, source: nnx.Module, strategy: str) -> Mapping:
  """Copies the source's weights into `model` in place per `strategy`; returns the mapping."""
  _check_compatible(model.cfg, source.cfg)
  if source.cfg.kind != "vanilla":
    raise ValueError(f"uptrain: the source must be a dense (vanilla) model, not {source.cfg.kind}")
  mapping = layer_mapping(model.cfg, len(source.blocks), strategy)
  for b, src in mapping.items():
    if not src:
      continue
    ws = [block_weights(source.blocks[s], None) for s in src]
    mean = {k: jnp.asarray(sum(np.asarray(w[k], np.float64) for w in ws) / len(ws), jnp.float32)
            for k in ws[0]}
    set_block_weights(model.blocks[b], mean)
  model.embed.table.set_value(source.embed.table[...])
  model.final_norm.scale.set_value(source.final_norm.scale[...])
  if not model.cfg.tie_embeddings:
    head = source.embed.table[...].T if source.cfg.tie_embeddings else source.head[...]
    model.head.set_value(head)
  return mapping


def init_from_folder(model: nnx.Module, folder: str, strategy: str,
                     verbose: bool = True) -> Mapping:
  """init_from_dense from a Llama-format folder (read untied); prints the mapping."""
  source_cfg, source = interop.import_llama(folder, as_vanilla=True)
  mapping = init_from_dense(model, source, strategy)
  if verbose:
    print(describe_mapping(model.cfg, mapping, source_cfg.num_layers, strategy), flush=True)
  return mapping


def maybe_init_from_source(cfg: Config, state: dict, setup: Any) -> dict:
  """The train state with weights from cfg.uptrain.source, or `state` when it is "".

  Call once after `train.init_state` on a fresh run (not on resume): the
  optimizer state is re-initialised for the new parameters and everything is
  placed with the run's shardings. `setup` is the run's `mor.train.Setup` (only
  its graphdef, tx and state_shardings are read; typed loosely because the
  trainer imports this module, not the other way round).
  """
  if not cfg.uptrain.source:
    return state
  model = nnx.merge(setup.graphdef, state["params"], state["rest"])
  init_from_folder(model, cfg.uptrain.source, cfg.uptrain.strategy,
                   verbose=jax.process_index() == 0)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  new = {"params": params, "opt": setup.tx.init(params), "rest": rest, "step": state["step"]}
  return jax.device_put(new, setup.state_shardings)
