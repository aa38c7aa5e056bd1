"""Hugging Face Llama checkpoints (config.json + safetensors) in and out of `mor`.

Weight layout (HF nn.Linear weights are [out, in]; mor weights are [*in, *out]):
  model.embed_tokens.weight             [V, D]      embed.table        [V, D]
  model.layers.j.self_attn.q_proj       [H*Dh, D]   blocks.b.attn.wq   [D, H, Dh]
  model.layers.j.self_attn.k_proj/v_proj[KV*Dh, D]  attn.wk / attn.wv  [D, KV, Dh]
  model.layers.j.self_attn.o_proj       [D, H*Dh]   attn.wo            [H, Dh, D]
  model.layers.j.mlp.gate_proj/up_proj  [F, D]      mlp.w_gate / w_up  [D, F]
  model.layers.j.mlp.down_proj          [D, F]      mlp.w_down         [F, D]
  model.layers.j.input_layernorm        [D]         attn_norm.scale
  model.layers.j.post_attention_layernorm [D]       mlp_norm.scale
  model.norm.weight                     [D]         final_norm.scale
  lm_head.weight (absent when tied)     [V, D]      head               [D, V]
Heads are contiguous Dh-sized groups of the projection's output (q.view(H, Dh)),
query head h reads KV head h // (H / KV), and HF's rotary (`rotate_half`, the
two halves of each head) is mor's `apply_rope`: no permutation is needed.
RMSNorm: identical in float32. In bfloat16 HF casts the normalised activations
to bf16 before multiplying by the scale, mor multiplies in f32 and then casts
(a rounding-level difference).

Recursive and MoR models are written with layer j holding the weights applied
at layer j (tied blocks repeated, LoRA adapters folded in), so any Llama loader
reads them as a plain Llama. config.json then carries a "mor" section (kind,
sharing, num_recursions, plan: the unique block of every layer, and the full
ModelConfig); parameters a Llama has no slot for (routers, LoRA adapters) are
stored as extra tensors named "mor.<path>", which Llama loaders ignore.
`import_llama` reads that section back into the recursive model, keeping one
copy per tied block.

Safetensors are read and written here with numpy (bfloat16 through ml_dtypes),
so neither torch nor the `safetensors` package is needed.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mor import config as config_lib
from mor.config import ModelConfig
from mor.layers.lora import (PROJECTIONS, applied_recursions, block_weights, has_adapters,
                            set_block_weights)
from mor.models import build_model, make_plan

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
HF_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
EXTRA = "mor."


# ---------------------------------------------------------------------------
# safetensors: 8-byte little-endian header size, JSON header, raw little-endian data.

def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of one file as read-only memory maps (only what is used gets read)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  raw = np.memmap(path, np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, h in header.items():
    begin, end = h["data_offsets"]
    out[name] = raw[begin:end].view(_DTYPES[h["dtype"]]).reshape(h["shape"])
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  header, offset = {}, 0
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  for name, a in arrays.items():
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  header["__metadata__"] = metadata or {"format": "pt"}  # transformers requires "format"
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)   # data 8-byte aligned, as the reference writer pads
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays.values():
      f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def read_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, all tensors) of a Llama-format folder, sharded (index.json) or not."""
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors in {folder}")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(folder, name)))
  return hf, tensors


# ---------------------------------------------------------------------------
# Config

def config_from_llama(hf: dict, dtype: str = "float32") -> ModelConfig:
  """A vanilla ModelConfig with the shape of a Llama config.json."""
  unsupported = {"hidden_act": hf.get("hidden_act", "silu") != "silu",
                 "attention_bias": bool(hf.get("attention_bias")),
                 "mlp_bias": bool(hf.get("mlp_bias")),
                 "rope_scaling": bool(hf.get("rope_scaling"))}
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(f"unsupported Llama config fields: {', '.join(f'{k}={hf[k]!r}' for k in bad)}")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // h
  return ModelConfig(
      kind="vanilla", vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
      d_model=d, num_heads=h, num_kv_heads=hf.get("num_key_value_heads") or h,
      head_dim=0 if head_dim * h == d else head_dim, ffn_dim=hf["intermediate_size"],
      max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def llama_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
  """config.json for a model: the Llama fields, plus a "mor" section unless plain vanilla."""
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dh,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype}
  hf["mor"] = {"kind": cfg.kind, "sharing": cfg.sharing, "num_recursions": cfg.num_recursions,
               "plan": list(make_plan(cfg).applied), "config": config_lib.to_dict(cfg)}
  return hf


def _recorded_config(hf: dict, base: ModelConfig) -> ModelConfig:
  """The ModelConfig recorded in the "mor" section, checked against the Llama fields."""
  rec = dict(hf["mor"]["config"])
  cfg = config_lib._build(ModelConfig, rec, "model.")
  shape = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "dh", "ffn_dim",
           "tie_embeddings")
  diff = [k for k in shape if getattr(cfg, k) != getattr(base, k)]
  if diff or list(make_plan(cfg).applied) != list(hf["mor"]["plan"]):
    raise ValueError(f"config.json: the 'mor' section disagrees with the Llama fields "
                     f"({', '.join(diff) or 'plan'}); pass as_vanilla=True to ignore it")
  return cfg


# ---------------------------------------------------------------------------
# Weights

def _to_hf(w: np.ndarray, n_in: int) -> np.ndarray:
  return w.reshape(math.prod(w.shape[:n_in]), -1).T


def _from_hf(w_hf: np.ndarray, shape: tuple) -> np.ndarray:
  return np.asarray(w_hf, np.float32).T.reshape(shape)


def _is_llama_slot(path: tuple) -> bool:
  """Whether a model parameter path has a Llama tensor (else it is a 'mor.' extra)."""
  if path in (("embed", "table"), ("final_norm", "scale"), ("head",)):
    return True
  if path[0] != "blocks":
    return False
  rest = path[2:]
  return rest in [(n, "scale") for n in HF_NORM] or rest in [
      (sub, attr) for sub, attr, _ in PROJECTIONS.values()]


def _extras(model: nnx.Module) -> dict[str, np.ndarray]:
  state = nnx.state(model, nnx.Not(nnx.RngState))
  return {EXTRA + ".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(state) if not _is_llama_slot(tuple(p))}


def export_llama(model: nnx.Module, folder: str, dtype: str = "float32") -> None:
  """Writes config.json + model.safetensors; every applied layer is written out."""
  cfg = model.cfg
  if cfg.kind == "moe":
    raise ValueError("export_llama: a MoE model has no Llama layout")
  np_dt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  cast = lambda x: np.asarray(x, np.float32).astype(np_dt)
  out = {"model.embed_tokens.weight": cast(model.embed.table[...]),
         "model.norm.weight": cast(model.final_norm.scale[...])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = cast(np.asarray(model.head[...]).T)
  recs = applied_recursions(model.plan)
  for j, b in enumerate(model.plan.applied):
    w = block_weights(model.blocks[b], recs[j])
    for name, hf_name in HF_NORM.items():
      out[f"model.layers.{j}.{hf_name}.weight"] = cast(w[name])
    for target, (_, attr, n_in) in PROJECTIONS.items():
      out[f"model.layers.{j}.{HF_PROJ[target]}.weight"] = cast(_to_hf(np.asarray(w[attr]), n_in))
  out.update(_extras(model))
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, "model.safetensors"), out)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(llama_config(cfg, dtype), f, indent=1)


def import_llama(folder: str, dtype: str = "float32",
                 as_vanilla: bool = False) -> tuple[ModelConfig, nnx.Module]:
  """(ModelConfig, model) from a Llama-format folder.

  A folder written by export_llama from a recursive or MoR model comes back as
  that model (tied layers read once, from the first layer using each block);
  as_vanilla=True ignores the "mor" section and reads every layer untied.
  """
  hf, tensors = read_folder(folder)
  cfg = config_from_llama(hf, dtype)
  structured = "mor" in hf and not as_vanilla
  if structured:
    cfg = dataclasses.replace(_recorded_config(hf, cfg), dtype=dtype)
  model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
  filled = set()

  def put(path: tuple, value) -> None:
    var = model
    for p in path:
      var = var[p] if isinstance(p, int) or isinstance(var, nnx.Dict) else getattr(var, p)
    shape = var.get_value().shape
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"{'.'.join(map(str, path))}: checkpoint shape {value.shape} != {shape}")
    var.set_value(jnp.asarray(np.asarray(value, np.float32) if value.dtype.kind == "f"
                              else value))
    filled.add(path)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"{folder}: tensor {name} is missing")
    return tensors[name]

  put(("embed", "table"), get("model.embed_tokens.weight"))
  put(("final_norm", "scale"), get("model.norm.weight"))
  if not cfg.tie_embeddings:
    put(("head",), np.asarray(get("lm_head.weight")).T)
  for name, value in tensors.items():   # routers, adapters: needed before un-folding adapters
    if structured and name.startswith(EXTRA):
      put(tuple(int(p) if p.isdigit() else p for p in name[len(EXTRA):].split(".")), value)
  recs = applied_recursions(model.plan)
  for b in range(model.plan.num_blocks):
    uses = [j for j, bb in enumerate(model.plan.applied) if bb == b]
    j, block = uses[0], model.blocks[b]
    for name, hf_name in HF_NORM.items():
      put(("blocks", b, name, "scale"), get(f"model.layers.{j}.{hf_name}.weight"))
    for target, (sub, attr, _) in PROJECTIONS.items():
      shape = getattr(getattr(block, sub), attr).get_value().shape
      w = _from_hf(get(f"model.layers.{j}.{HF_PROJ[target]}.weight"), shape)
      lora = getattr(getattr(block, sub), "lora", None)
      if recs[j] is not None and lora is not None and target in lora:
        w = w - np.asarray(lora[target].delta(recs[j]))   # the file holds W + A_r B_r
      elif len(uses) > 1:
        _check_tied(get, uses, HF_PROJ[target])
      put(("blocks", b, sub, attr), w)
  missing = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))
             if tuple(p) not in filled]
  if missing:
    raise KeyError(f"{folder}: no tensor for {', '.join(missing[:5])}")
  return cfg, model


def _check_tied(get, uses: list[int], hf_name: str) -> None:
  first = get(f"model.layers.{uses[0]}.{hf_name}.weight")
  for j in uses[1:]:
    if not np.array_equal(first, get(f"model.layers.{j}.{hf_name}.weight")):
      raise ValueError(f"layers {uses[0]} and {j} ({hf_name}) share a block in the recorded "
                       "plan but differ; pass as_vanilla=True to read every layer untied")


def merge_lora(model: nnx.Module) -> nnx.Module:
  """An untied vanilla model whose layer j holds layer j's effective weights (adapters folded).

  Equal to a recursive model with or without adapters. A MoR model's routing
  needs its tied unit, so it cannot be merged (export_llama writes its layers
  with the adapters folded in, and keeps the routers).
  """
  cfg = model.cfg
  if cfg.kind == "mor":
    raise ValueError("merge_lora: a MoR model's routing needs tied blocks; export it with "
                     "mor.interop.export_llama instead")
  if cfg.kind == "vanilla" and not has_adapters(model):
    return model
  flat = dataclasses.replace(cfg, kind="vanilla", lora_rank=0)
  merged = nnx.eval_shape(lambda: build_model(flat, nnx.Rngs(0)))
  recs = applied_recursions(model.plan)
  for j, b in enumerate(model.plan.applied):
    w = block_weights(model.blocks[b], recs[j])
    set_block_weights(merged.blocks[j], w)
  merged.embed.table.set_value(model.embed.table[...])
  merged.final_norm.scale.set_value(model.final_norm.scale[...])
  if not cfg.tie_embeddings:
    merged.head.set_value(model.head[...])
  return merged
