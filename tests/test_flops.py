"""The analytic FLOP counter against the compiler's own count."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mor import config, flops
from mor.models import build_model

SEQ = 64


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
def test_counter_matches_compiler_within_10_percent(kind, kw):
  cfg = tiny(kind, **kw)
  fwd, train = compiled_forward_and_train(cfg)
  # the compiler computes the full masked score matrix: compare with causal=False
  ours = flops.forward_flops_per_token(cfg, SEQ, causal=False)
  assert abs(fwd / ours - 1) < 0.10, (fwd, ours)
  assert abs(train / (3 * ours) - 1) < 0.10, (train, ours)


def test_causal_counting_halves_attention_only():
  cfg = tiny("vanilla")
  full = flops.layer_flops(cfg, SEQ, causal=False)[0]
  causal = flops.layer_flops(cfg, SEQ, causal=True)[0]
  assert causal.proj == full.proj and causal.mlp == full.mlp
  assert causal.attn == pytest.approx(full.attn * (SEQ + 1) / (2 * SEQ))


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
