"""The analytic FLOP counter against the compiler's own count."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mor import config, flops
from mor.models import build_model

SEQ = 64
TOL = 0.03   # docs/flops.md quotes this bound; measured worst case: docs/notes/train_step.md


def tiny(kind, **kw):
  base = dict(kind=kind, vocab_size=512, d_model=128, num_heads=4, num_kv_heads=2, ffn_dim=384,
              num_layers=5, max_seq_len=SEQ, num_recursions=3, sharing="middle_cycle")
  base.update(kw)
  return config.ModelConfig(**base)


def compiled_forward_and_train(cfg):
  graphdef, state = nnx.split(build_model(cfg))
  toks = jnp.zeros((2, SEQ), jnp.int32)
  fwd = lambda st, t: nnx.merge(graphdef, st)(t)[0]
  loss = lambda st, t: jnp.mean(fwd(st, t))
  return (flops.compiled_flops(fwd, state, toks) / (2 * SEQ),
          flops.compiled_flops(jax.grad(loss), state, toks) / (2 * SEQ))


@pytest.mark.parametrize("kind,kw", [("vanilla", {}), ("recursive", {}),
                                     ("recursive", {"sharing": "cycle", "num_layers": 6})])
def test_counter_matches_compiler_within_3_percent(kind, kw):
  cfg = tiny(kind, **kw)
  fwd, train = compiled_forward_and_train(cfg)
  # the compiler computes the full masked score matrix: compare with causal=False
  ours = flops.forward_flops_per_token(cfg, SEQ, causal=False)
  assert abs(fwd / ours - 1) < TOL, (fwd, ours)
  assert abs(train / (3 * ours) - 1) < TOL, (train, ours)


def test_causal_counting_halves_attention_only():
  cfg = tiny("vanilla")
  full = flops.layer_flops(cfg, SEQ, causal=False)[0]
  causal = flops.layer_flops(cfg, SEQ, causal=True)[0]
  assert causal.proj == full.proj and causal.mlp == full.mlp
  assert causal.attn == pytest.approx(full.attn * (SEQ + 1) / (2 * SEQ))


@pytest.mark.quick
def test_breakdown_formula_by_hand():
  cfg = tiny("vanilla", num_layers=1)
  d, h, kv, dh, f, v = 128, 4, 2, 32, 384, 512
  per_token = (2 * d * h * dh + 4 * d * kv * dh + 2 * h * dh * d + 4 * SEQ * h * dh + 6 * d * f +
               2 * d * v)
  assert flops.forward_flops_per_token(cfg, SEQ, causal=False) == pytest.approx(per_token)
  assert flops.train_flops_per_token(cfg, SEQ, causal=False) == pytest.approx(3 * per_token)


def test_recursive_applies_as_many_layers_as_vanilla():
  assert flops.forward_flops_per_token(tiny("recursive"), SEQ) == pytest.approx(
      flops.forward_flops_per_token(tiny("vanilla"), SEQ))


@pytest.mark.parametrize("router,dropless", [("top2", False), ("switch", False)])
def test_moe_hardware_flops_match_compiler(router, dropless):
  moe = config.MoEConfig(num_experts=4, router=router, top_k=2, every=2, expert_ffn_dim=192,
                         dropless=dropless, capacity_factor=1.25)
  cfg = tiny("moe", num_layers=4, moe=moe)
  fwd, _ = compiled_forward_and_train(cfg)
  ours = flops.forward_flops_per_token(cfg, SEQ, causal=False, hardware=True, batch=2)
  assert abs(fwd / ours - 1) < TOL, (fwd, ours)
  # model FLOPs count only the active experts: fewer than the padded capacity slots
  assert flops.forward_flops_per_token(cfg, SEQ, causal=False) < ours


def test_moe_tiny_matches_vanilla_tiny_flops():
  import importlib.util
  import os

  def load(name):
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return config.from_dict(mod.get_config())

  moe, vanilla = load("moe_tiny.py"), load("vanilla_tiny.py")
  ratio = (flops.train_flops_per_token(moe.model, moe.data.seq_len) /
           flops.train_flops_per_token(vanilla.model, vanilla.data.seq_len))
  assert ratio == pytest.approx(1.0, abs=0.02)


def test_mor_flops_match_compiler_and_the_analytic_step_ratio():
  for routing in ("expert_choice", "token_choice"):
    router = config.RouterConfig(routing=routing,
                                 gate="sigmoid" if routing == "expert_choice" else "softmax")
    # 5 layers (1 + one shared block x 3 recursions + 1): the routed steps are 3 of the 5
    # applied blocks, and half the blocks of num_layers=8 to compile
    cfg = tiny("mor", num_layers=5, router=router)
    fwd, train = compiled_forward_and_train(cfg)
    ours = flops.forward_flops_per_token(cfg, SEQ, causal=False)
    assert abs(fwd / ours - 1) < TOL and abs(train / (3 * ours) - 1) < TOL, (fwd, ours)
  # expert-choice N_r = 3 vs the recursive model of the same shape: the unit runs on
  # S, 2S/3, S/3 tokens instead of 3 S
  ec = tiny("mor", num_layers=8)
  unit_ratio = (1 + 2 / 3 + 1 / 3) / 3
  layers = [l for l in flops.layer_flops(ec, SEQ, causal=False) if l.name.startswith("rec")]
  rec = [l for l in flops.layer_flops(tiny("recursive", num_layers=8), SEQ, causal=False)][1:7]
  assert sum(l.proj + l.mlp for l in layers) / sum(l.proj + l.mlp for l in rec) == pytest.approx(
      unit_ratio, rel=TOL)


def test_lora_adapter_flops_match_compiler():
  cfg = tiny("recursive", lora_rank=8)
  fwd, _ = compiled_forward_and_train(cfg)
  ours = flops.forward_flops_per_token(cfg, SEQ, causal=False)
  assert abs(fwd / ours - 1) < TOL, (fwd, ours)
  assert ours > flops.forward_flops_per_token(tiny("recursive"), SEQ, causal=False)
