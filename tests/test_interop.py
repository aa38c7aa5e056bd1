"""Llama checkpoints: import equals an independent numpy Llama, exports round-trip exactly."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor import analysis, config, interop, presets
from mor.interop import merge_lora
from mor.models import build_model

HF = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16, vocab_size=64, rms_norm_eps=1e-5,
          rope_theta=500000.0, max_position_embeddings=64, hidden_act="silu",
          model_type="llama", architectures=["LlamaForCausalLM"])


def random_llama(folder, tie, seed=0, shards=1):
  """A Llama-format folder with random weights (norm scales too); returns the tensors."""
  rng = np.random.default_rng(seed)
  hf = dict(HF, tie_word_embeddings=tie)
  d, f, v, dh = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["head_dim"]
  q, kv = hf["num_attention_heads"] * dh, hf["num_key_value_heads"] * dh
  r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
  w = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": 1 + r(d)}
  if not tie:
    w["lm_head.weight"] = r(v, d)
  for l in range(hf["num_hidden_layers"]):
    p = f"model.layers.{l}."
    w.update({p + "self_attn.q_proj.weight": r(q, d), p + "self_attn.k_proj.weight": r(kv, d),
              p + "self_attn.v_proj.weight": r(kv, d), p + "self_attn.o_proj.weight": r(d, q),
              p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d),
              p + "mlp.down_proj.weight": r(d, f), p + "input_layernorm.weight": 1 + r(d),
              p + "post_attention_layernorm.weight": 1 + r(d)})
  os.makedirs(folder, exist_ok=True)
  names = sorted(w)
  parts = [names[i::shards] for i in range(shards)]
  if shards > 1:
    files = {n: f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
             for i, part in enumerate(parts) for n in part}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
      json.dump({"metadata": {}, "weight_map": files}, fh)
  for i, part in enumerate(parts):
    name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    interop.write_safetensors(os.path.join(folder, name), {n: w[n] for n in part})
  with open(os.path.join(folder, "config.json"), "w") as fh:
    json.dump(hf, fh)
  return hf, w


def numpy_llama(hf, w, tokens_BxS):
  """HF LlamaForCausalLM's forward, re-implemented in float64 numpy (no mor code)."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  h, kvh = hf["num_attention_heads"], hf["num_key_value_heads"]
  dh = hf.get("head_dim") or hf["hidden_size"] // h
  eps, (b, s) = hf["rms_norm_eps"], tokens_BxS.shape
  inv_freq = 1.0 / hf["rope_theta"] ** (np.arange(0, dh, 2) / dh)
  emb = np.concatenate([np.outer(np.arange(s), inv_freq)] * 2, -1)      # [S, Dh]
  cos, sin = np.cos(emb), np.sin(emb)
  rotate_half = lambda x: np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
  rms = lambda x, g: g * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
  heads = lambda x, n: x.reshape(b, s, n, dh).transpose(0, 2, 1, 3)    # [B, n, S, Dh]
  mask = np.triu(np.full((s, s), -np.inf), 1)
  x = w["model.embed_tokens.weight"][tokens_BxS]
  for l in range(hf["num_hidden_layers"]):
    p = lambda n: w[f"model.layers.{l}.{n}.weight"]
    y = rms(x, p("input_layernorm"))
    q = heads(y @ p("self_attn.q_proj").T, h)
    k = heads(y @ p("self_attn.k_proj").T, kvh)
    v = heads(y @ p("self_attn.v_proj").T, kvh)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kvh, 1), np.repeat(v, h // kvh, 1)       # repeat_kv
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + mask
    a = np.exp(a - a.max(-1, keepdims=True))
    o = (a / a.sum(-1, keepdims=True)) @ v
    x = x + o.transpose(0, 2, 1, 3).reshape(b, s, h * dh) @ p("self_attn.o_proj").T
    y = rms(x, p("post_attention_layernorm"))
    g = y @ p("mlp.gate_proj").T
    x = x + (g / (1 + np.exp(-g)) * (y @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
  head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
  return rms(x, w["model.norm.weight"]) @ head.T


def transformers_logits(folder, tokens_BxS):
  """LlamaForCausalLM's logits for a folder, or None where transformers is not installed."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.as_tensor(np.asarray(tokens_BxS))).logits.numpy()


def tokens(b=2, s=10, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (b, s)), jnp.int32)


_forward = nnx.jit(lambda model, t: model(t)[0])


def logits(model, t):
  """model(t)'s logits; jitted: compiling a whole small model beats op-by-op dispatch."""
  return np.asarray(_forward(model, t))


def filled(cfg, value=None, seed=0):
  """cfg's model without running its initialisers (fast): every weight `value`, or random."""
  model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var.get_value().shape
    x = (np.full(shape, value) if value is not None else np.ones(shape) if path[-1] == "scale"
         else 0.05 * rng.standard_normal(shape))
    var.set_value(jnp.asarray(x, jnp.float32))
  return model


@pytest.mark.parametrize("tie,shards", [(True, 1), (False, 3)])
def test_import_matches_numpy_llama(tmp_path, tie, shards):
  hf, w = random_llama(str(tmp_path), tie, shards=shards)
  cfg, model = interop.import_llama(str(tmp_path))
  assert (cfg.kind, cfg.num_layers, cfg.dh, cfg.norm_eps, cfg.tie_embeddings) == (
      "vanilla", 3, 16, 1e-5, tie)
  t = tokens()
  ours = logits(model, t)
  ref = numpy_llama(hf, w, np.asarray(t))
  assert np.abs(ref).max() > 1.0   # weights large enough that a layout slip would show
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  theirs = transformers_logits(str(tmp_path), t)
  if theirs is not None:
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_vanilla_export_import_round_trip_is_exact(tmp_path):
  _, w = random_llama(str(tmp_path / "src"), tie=False)
  _, model = interop.import_llama(str(tmp_path / "src"))
  interop.export_llama(model, str(tmp_path / "out"))
  _, back = interop.import_llama(str(tmp_path / "out"))
  t = tokens()
  np.testing.assert_array_equal(logits(model, t), logits(back, t))
  written = interop.read_safetensors(str(tmp_path / "out" / "model.safetensors"))
  assert set(written) == set(w)
  for k in w:
    np.testing.assert_array_equal(written[k], w[k])


def small(kind, **kw):
  return config.ModelConfig(kind=kind, vocab_size=64, num_layers=8, d_model=32, num_heads=4,
                            num_kv_heads=2, ffn_dim=48, max_seq_len=64, num_recursions=3,
                            sharing="middle_cycle", tie_embeddings=False, **kw)


@pytest.mark.parametrize("kind,extra", [
    ("recursive", {}),
    ("mor", {"router": config.RouterConfig(causal="aux_router")}),
    ("recursive", {"lora_rank": 2}),
])
def test_recursive_export_import_round_trip(tmp_path, kind, extra):
  model = filled(small(kind, **extra), seed=3)   # adapters included: B is not zero
  interop.export_llama(model, str(tmp_path))
  hf = json.load(open(tmp_path / "config.json"))
  assert hf["num_hidden_layers"] == 8 and hf["mor"]["plan"] == [0, 1, 2, 1, 2, 1, 2, 3]
  cfg, back = interop.import_llama(str(tmp_path))
  assert cfg == model.cfg and len(back.blocks) == 4
  t = tokens()
  ours, theirs = logits(model, t), logits(back, t)
  if extra.get("lora_rank"):   # un-folding the adapters costs a rounding error
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  else:
    np.testing.assert_array_equal(theirs, ours)
  if kind == "recursive":   # any Llama loader (here: numpy, untied) computes the same model
    w = {k: v for k, v in interop.read_folder(str(tmp_path))[1].items()
         if not k.startswith("mor.")}
    np.testing.assert_allclose(numpy_llama(hf, w, np.asarray(t)), ours, atol=1e-5, rtol=0)
    flat = merge_lora(model)
    _, untied = interop.import_llama(str(tmp_path), as_vanilla=True)
    assert len(untied.blocks) == 8
    np.testing.assert_array_equal(logits(untied, t), logits(flat, t))
    theirs = transformers_logits(str(tmp_path), t)
    if theirs is not None:
      np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_bfloat16_export_reads_back(tmp_path):
  model = filled(small("vanilla"))
  interop.export_llama(model, str(tmp_path), dtype="bfloat16")
  _, back = interop.import_llama(str(tmp_path))
  want = np.asarray(model.blocks[2].attn.wq[...])
  np.testing.assert_allclose(np.asarray(back.blocks[2].attn.wq[...]), want, rtol=1e-2, atol=1e-3)


def test_bad_checkpoints_fail_clearly(tmp_path):
  random_llama(str(tmp_path / "a"), tie=True)
  hf = json.load(open(tmp_path / "a" / "config.json"))
  hf["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
  json.dump(hf, open(tmp_path / "a" / "config.json", "w"))
  with pytest.raises(ValueError, match="unsupported Llama config fields: rope_scaling"):
    interop.import_llama(str(tmp_path / "a"))
  # a recorded plan whose tied layers differ (e.g. fine-tuned untied elsewhere)
  interop.export_llama(filled(small("recursive")), str(tmp_path / "b"))
  path = str(tmp_path / "b" / "model.safetensors")
  w = {k: np.array(v) for k, v in interop.read_safetensors(path).items()}
  w["model.layers.3.mlp.up_proj.weight"] += 1.0
  interop.write_safetensors(path, w)
  with pytest.raises(ValueError, match="layers 1 and 3"):
    interop.import_llama(str(tmp_path / "b"))
  assert interop.import_llama(str(tmp_path / "b"), as_vanilla=True)[0].kind == "vanilla"


def test_safetensors_files_match_the_reference_library(tmp_path):
  """Where the `safetensors` package is installed, each side reads the other's files."""
  try:
    from safetensors import numpy as st
  except ImportError:
    return
  a = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones((5,), np.int64)}
  interop.write_safetensors(str(tmp_path / "ours.safetensors"), a)
  st.save_file(a, str(tmp_path / "theirs.safetensors"))
  for name in ("ours", "theirs"):
    for reader in (st.load_file, interop.read_safetensors):
      got = reader(str(tmp_path / f"{name}.safetensors"))
      assert set(got) == set(a) and all(np.array_equal(got[k], a[k]) for k in a)


def test_export_checkpoint_of_a_training_run(tmp_path):
  from mor import checkpoint, train
  base = config.to_dict(presets.tiny_config("recursive"))
  base["model"].update(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=48,
                       num_layers=5, max_seq_len=32)
  base["data"].update(seq_len=32, batch_size=8)
  cfg = config.from_dict(base)
  s = train.setup(cfg)
  model = filled(cfg.model)   # a state shaped like s.init's, without compiling it
  _, params, rest = nnx.split(model, nnx.Param, ...)
  state = {"params": params, "opt": s.tx.init(params), "rest": rest,
           "step": jnp.zeros((), jnp.int32)}
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  checkpoint.save(mngr, 3, state, {}, config.to_dict(cfg))
  mngr.close()
  analysis.export_checkpoint(str(tmp_path), str(tmp_path / "llama"))
  got_cfg, back = interop.import_llama(str(tmp_path / "llama"))
  assert got_cfg == cfg.model
  t = tokens()
  np.testing.assert_array_equal(logits(back, t), logits(model, t))
