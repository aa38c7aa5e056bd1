"""Vanilla and recursive Transformers: shapes, causality, sharing, cached decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor import config, decode
from mor.models import build_model, count_params, make_plan

SMALL = dict(vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32)
STRATEGIES = ["cycle", "sequence", "middle_cycle", "middle_sequence"]


def small(kind="recursive", sharing="middle_cycle", num_layers=8, **kw):
  return config.ModelConfig(kind=kind, sharing=sharing, num_layers=num_layers,
                            num_recursions=kw.pop("num_recursions", 3 if "middle" in sharing
                                                  else 2), **SMALL, **kw)


def tokens(b=2, s=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 128, (b, s)), jnp.int32)


def test_shapes_and_dtype():
  for dtype in ("float32", "bfloat16"):
    m = build_model(small(dtype=dtype))
    logits, caches, aux = m(tokens())
    assert logits.shape == (2, 12, 128) and logits.dtype == jnp.float32
    assert caches is None and aux == {"losses": {}, "stats": {}}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


@pytest.mark.parametrize("sharing", STRATEGIES)
def test_causal_by_gradients(sharing):
  m = build_model(small(sharing=sharing))
  x = m.embed_tokens(tokens())
  t = 6

  def out_at_t(x):
    h, pos = x, jnp.broadcast_to(jnp.arange(12), (2, 12))
    for b in m.plan.applied:
      h = m.blocks[b](h, pos)[0]
    return m.logits(h)[:, t].sum()

  g = jax.grad(out_at_t)(x)
  assert float(jnp.abs(g[:, t + 1:]).max()) == 0.0
  assert float(jnp.abs(g[:, :t + 1]).min(axis=-1).max()) > 0.0


def test_plans_tie_the_intended_layers():
  applied = lambda sh, n, r: make_plan(small(sharing=sh, num_layers=n, num_recursions=r)).applied
  assert applied("cycle", 6, 3) == (0, 1, 0, 1, 0, 1)
  assert applied("sequence", 6, 3) == (0, 0, 0, 1, 1, 1)
  assert applied("middle_cycle", 8, 3) == (0, 1, 2, 1, 2, 1, 2, 3)
  assert applied("middle_sequence", 8, 3) == (0, 1, 1, 1, 2, 2, 2, 3)
  assert make_plan(small(kind="vanilla", num_layers=5)).applied == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("sharing", STRATEGIES)
def test_unique_parameter_counts_match_formula(sharing):
  cfg = small(sharing=sharing, num_layers=8, num_recursions=2 if "middle" not in sharing else 3)
  d, h, kv, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dh, cfg.ffn_dim
  per_layer = d * h * dh * 2 + d * kv * dh * 2 + 3 * d * f + 2 * d
  middle = sharing.startswith("middle")
  unique_layers = (2 + 6 // 3) if middle else 8 // 2
  counts = count_params(build_model(cfg))
  emb = cfg.vocab_size * d
  assert counts["unique"] == unique_layers * per_layer + d + emb
  assert counts["applied_non_embedding"] == 8 * per_layer + d
  # tied blocks are one set of parameters: the split state holds exactly the unique ones
  assert len(build_model(cfg).blocks) == unique_layers


def test_untied_head_adds_parameters():
  tied = count_params(build_model(small()))["unique"]
  untied = count_params(build_model(small(tie_embeddings=False)))["unique"]
  assert untied - tied == 128 * 32


@pytest.mark.parametrize("kind,sharing", [("vanilla", "cycle")] + [("recursive", s)
                                                                  for s in STRATEGIES])
def test_cached_decoding_equals_uncached_forward(kind, sharing):
  m = build_model(small(kind=kind, sharing=sharing))
  full = tokens(2, 14, seed=1)
  ref, _, _ = m(full)
  logits, caches = decode.prefill(m, full[:, :6], max_len=16)
  out = [logits]
  for t in range(6, 13):
    logits, caches = decode.decode_step(m, full[:, t], jnp.full((2,), t, jnp.int32), caches)
    out.append(logits)
  got = jnp.stack(out, axis=1)
  np.testing.assert_allclose(got, ref[:, 5:13], atol=1e-5, rtol=0)


def test_generate_greedy_matches_argmax_of_forward():
  m = build_model(small())
  prompt = tokens(2, 5, seed=3)
  new = decode.generate(m, prompt, 6)
  logits, _, _ = m(jnp.concatenate([prompt, new], axis=1))
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:-1], -1), new)


def test_sampling_top_k_stays_in_top_k():
  logits = jnp.tile(jnp.arange(10.0)[None], (64, 1))
  toks = decode.sample(logits, jax.random.key(0), temperature=1.0, top_k=3)
  assert set(np.asarray(toks).tolist()) <= {7, 8, 9}
  assert len(set(np.asarray(toks).tolist())) > 1
