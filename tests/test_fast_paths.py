"""Fast paths of the train step against their slow, obvious twins.

Blocked causal attention, the other attention implementations (cuDNN-style
dot_product_attention, Pallas splash attention in interpret mode) and the
chunked LM-head cross-entropy must equal the dense masked attention and the
plain cross-entropy over materialised logits, in values and gradients.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mor import config, presets, train
from mor.layers.attention import KV, attend
from mor.models import build_model


def _qkv(b, s, n, k, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, s, n, h)), jax.random.normal(ks[1], (b, s, k, h)),
          jax.random.normal(ks[2], (b, s, k, h)))


def _positions(b, s, hidden_frac=0.0, seed=1):
  """Positions 0..s-1; with hidden_frac, some slots hidden (-1) as in a MoR gather."""
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if hidden_frac:
    hide = jax.random.uniform(jax.random.key(seed), (b, s)) < hidden_frac
    pos = jnp.where(hide, -1, pos)
  return pos


def _check_equal_to_dense(impl, s, hidden_frac, b=2, n=4, k=2, h=8, tol=2e-5):
  q, kk, v = _qkv(b, s, n, k, h)
  pos = _positions(b, s, hidden_frac)
  valid = (pos >= 0)[:, :, None, None]      # rows of hidden queries are unspecified
  weights = jnp.cos(jnp.arange(n * h, dtype=jnp.float32)).reshape(n, h)

  def loss(fn):
    return lambda q, kk, v: jnp.sum(jnp.where(valid, fn(q, KV(kk, v, pos), pos), 0) * weights)

  fast = lambda q, kv, p: attend(q, kv, p, impl, index_causal=True)
  dense = lambda q, kv, p: attend(q, kv, p, "xla_dense")
  run = jax.jit(lambda fn, q, kk, v: fn(q, KV(kk, v, pos), pos), static_argnums=0)
  out, ref = run(fast, q, kk, v), run(dense, q, kk, v)
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=tol, rtol=tol)
  grads = jax.jit(jax.grad(loss(fast), (0, 1, 2)))(q, kk, v)
  refs = jax.jit(jax.grad(loss(dense), (0, 1, 2)))(q, kk, v)
  for g, r in zip(grads, refs):
    np.testing.assert_allclose(g, r, atol=tol, rtol=tol)


@pytest.mark.parametrize("s,hidden,b", [(128, 0.0, 2), (150, 0.3, 2), (128, 0.3, 8)])
def test_blocked_attention_equals_dense(s, hidden, b):
  """Blocked causal attention (key blocks after the query block skipped, softmax normalised
  after the value product) equals the dense masked path in values and q/k/v gradients;
  150 is not a whole number of 64-row blocks (padded queries), and hidden keys at -1 in
  the middle are a MoR gather; batch 8 (16 rows of (batch, KV head)) runs the kernel's
  loop over 4 groups of rows. Catches a wrong key range per block (a key block too few
  or a shifted mask), a lost normaliser or softmax-backward term, padding rows leaking
  into real ones, or rows mixed up between loop iterations."""
  _check_equal_to_dense("xla", s, hidden, b=b)


@pytest.mark.parametrize("hidden", [0.0, 0.3])
def test_dot_product_attention_equals_dense(hidden):
  """jax.nn.dot_product_attention (is_causal plus a key-validity mask; cuDNN flash on GPU,
  XLA here) equals the dense path; catches a wrong causal/validity mask or scale."""
  _check_equal_to_dense("dot_product", 40, hidden)


def test_dot_product_attention_over_a_cache_equals_dense():
  """Not index-causal (queries over a cache of earlier positions): the full position mask
  is passed; catches treating a cache as a causal square."""
  q, kk, v = _qkv(2, 3, 4, 2, 8)
  k_pos = jnp.asarray([[0, 1, 2, 3, 4, 5, -1, -1], [0, 1, 2, 3, -1, -1, -1, -1]], jnp.int32)
  kk, v = jnp.tile(kk, (1, 3, 1, 1))[:, :8], jnp.tile(v, (1, 3, 1, 1))[:, :8]
  q_pos = jnp.asarray([[3, 4, 5], [1, 2, 3]], jnp.int32)
  run = jax.jit(lambda q, kk, v, impl: attend(q, KV(kk, v, k_pos), q_pos, impl),
                static_argnums=3)
  out, ref = run(q, kk, v, "dot_product"), run(q, kk, v, "xla_dense")
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_splash_attention_interpreted_equals_dense():
  """Pallas splash attention (TPU kernel, run in interpret mode on CPU) with a causal mask
  and hidden slots as segment 1 equals the dense path for valid queries, values and
  gradients; catches a wrong segment encoding of hidden keys or a missing query scale."""
  _check_equal_to_dense("splash", 128, 0.25, b=1, n=2, k=1, h=8)


def test_chunked_cross_entropy_equals_plain():
  """lm_head_cross_entropy (scan over sequence chunks, gradients computed in the forward
  pass) equals optax cross-entropy of materialised logits in value and in the gradients
  of h and w; 13 positions in chunks of 5 pads the last chunk. Catches padding rows
  counted in the mean or gradient, a missing one-hot term, or a wrong gradient scale."""
  b, s, d, v = 2, 13, 8, 37
  ks = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(ks[0], (b, s, d))
  w = jax.random.normal(ks[1], (d, v))
  t = jax.random.randint(ks[2], (b, s), 0, v)
  plain = lambda h, w: optax.softmax_cross_entropy_with_integer_labels(h @ w, t).mean()
  fast = lambda h, w: train.lm_head_cross_entropy(h, w, t, chunk_tokens=2 * 5)
  (lf, gf), (lp, gp) = (jax.jit(jax.value_and_grad(f, (0, 1)))(h, w) for f in (fast, plain))
  np.testing.assert_allclose(lf, lp, rtol=1e-6)
  for a, r in zip(gf, gp):
    np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(fast)(h, w), lp, rtol=1e-6)   # the undifferentiated path


def test_swiglu_chunked_backward_equals_autodiff(monkeypatch):
  """The SwiGLU MLP's custom backward (a loop over strided token chunks that recomputes
  the gate and up projections) equals autodiff of the plain formula: 96 tokens in 6
  chunks of 16, O(1) values. Catches a wrong silu derivative, a chunk's weight gradient
  lost from the f32 accumulation, or tokens put back in the wrong order."""
  from mor.layers import mlp
  monkeypatch.setattr(mlp, "BACKWARD_CHUNK_TOKENS", 16)
  t, d, f = 96, 16, 24
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (t, d))
  ws = [jax.random.normal(k, shape) * shape[0] ** -0.5
        for k, shape in zip(ks[1:4], ((d, f), (d, f), (f, d)))]
  dy = jax.random.normal(ks[4], (t, d))
  assert mlp.num_chunks(t, mlp.BACKWARD_CHUNK_TOKENS) == 6
  outs = [jax.jit(lambda *a, fn=fn: jax.vjp(fn, *a))(x, *ws) for fn in (mlp.swiglu,
                                                                         mlp._swiglu_ref)]
  (yf, vjp_f), (yr, vjp_r) = outs
  assert 0.3 < float(jnp.std(yr)) < 3
  np.testing.assert_allclose(yf, yr, rtol=1e-6)
  for a, r in zip(vjp_f(dy), vjp_r(dy)):
    assert float(jnp.std(r)) > 0.1
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)


def test_custom_backwards_in_bfloat16_track_float32():
  """The blocked attention and SwiGLU custom VJPs run in bf16 (gradients come back in the
  inputs' dtype) and stay within bf16 rounding of the f32 dense/autodiff reference: a
  dtype mix-up (an f32 residual where bf16 is expected) fails to trace, a wrong term
  shows as an O(1) relative error against the 3% bound."""
  from mor.layers import mlp
  b, s, n, k, h = 4, 128, 4, 2, 16
  q, kk, v = _qkv(b, s, n, k, h)
  pos = _positions(b, s, 0.3)
  valid = (pos >= 0)[:, :, None, None]
  wts = jnp.cos(jnp.arange(n * h, dtype=jnp.float32)).reshape(n, h)

  def attn_loss(impl):
    return lambda q, kk, v: jnp.sum(jnp.where(valid, attend(q, KV(kk, v, pos), pos, impl,
                                                            index_causal=True), 0) * wts)
  ref = jax.jit(jax.grad(attn_loss("xla_dense"), (0, 1, 2)))(q, kk, v)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = jax.jit(jax.grad(attn_loss("xla"), (0, 1, 2)))(bf(q), bf(kk), bf(v))
  x = jax.random.normal(jax.random.key(3), (2048, 32))
  ws = [jax.random.normal(jax.random.key(i), shape) * shape[0] ** -0.5
        for i, shape in enumerate(((32, 48), (32, 48), (48, 32)))]
  dy = jnp.sin(jnp.arange(2048 * 32, dtype=jnp.float32)).reshape(2048, 32)
  ref += jax.vjp(mlp._swiglu_ref, x, *ws)[1](dy)
  got += jax.jit(lambda *a: jax.vjp(mlp.swiglu, *a)[1](bf(dy)))(bf(x), *map(bf, ws))
  for g, r in zip(got, ref):
    assert g.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) / float(jnp.max(jnp.abs(r)))
    assert err < 0.03, err


def _small(kind, attention, **router):
  return config.ModelConfig(kind=kind, vocab_size=64, num_layers=5, d_model=32, num_heads=4,
                            num_kv_heads=2, ffn_dim=48, max_seq_len=160, num_recursions=3,
                            attention=attention, router=config.RouterConfig(**router))


@pytest.mark.parametrize("kind,router", [("vanilla", {}), ("mor", {}),
                                         ("mor", {"routing": "token_choice"})])
def test_model_loss_and_gradients_equal_dense_attention_and_plain_loss(kind, router):
  """The training loss with the fast paths (blocked attention, chunked head + loss) equals
  the dense-attention model's cross-entropy of its logits, with equal parameter gradients,
  for vanilla and MoR (expert- and token-choice gather tokens with hidden slots). S = 130
  makes MoR steps of 130/87/44 tokens, blocked with padding. Catches a model path that
  breaks index-causality (e.g. unsorted gathers) or a head weight mismatch."""
  fast = build_model(_small(kind, "xla", **router), 0)
  dense = build_model(_small(kind, "xla_dense", **router), 0)
  toks = jax.random.randint(jax.random.key(3), (2, 131), 0, 64)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  step = jnp.int32(0)

  def fast_loss(m):
    h, _, _ = m(batch["inputs"], step=step, head=False)
    return train.lm_head_cross_entropy(h, m.head_weight(), batch["targets"], 64)

  def dense_loss(m):
    logits, _, _ = m(batch["inputs"], step=step)
    return train.cross_entropy(logits, batch["targets"])

  lf, gf = nnx.jit(nnx.value_and_grad(fast_loss))(fast)
  ld, gd = nnx.jit(nnx.value_and_grad(dense_loss))(dense)
  np.testing.assert_allclose(lf, ld, rtol=1e-5)
  for a, r in zip(jax.tree.leaves(gf), jax.tree.leaves(gd)):
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-3)


def test_bad_attention_is_a_one_line_config_error():
  """model.attention outside the allowed set fails before any compute, naming the field."""
  cfg = presets.tiny_config()
  bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="flash"))
  with pytest.raises(config.ConfigError, match=r"model\.attention='flash'.*xla, xla_dense"):
    config.validate(bad)
