"""Offloaded MoE decoding: LRU counts, quantisation error, equality with the in-memory model.

The model (tests/fixtures.py) has O(1) expert outputs and an untied head: removing
every expert moves the logits by O(1), so 1e-5 equalities see a wrong expert.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mor import kv_cache, offload
from mor.models import build_model
from mor.models.moe import set_mode
from tests.fixtures import assert_not_echo, assert_scale, moe_cfg

T = 6  # tokens decoded per sequence


@pytest.mark.quick
def test_lru_counts_hits_on_crafted_sequence():
  lru, loads = offload.ExpertLRU(2), []
  load = lambda e: loads.append(e) or f"w{e}"
  for e in [0, 1, 0, 2, 1, 0, 3, 3]:
    assert lru.get(e, load) == f"w{e}"
  # 0m 1m 0h 2m(evicts 1) 1m(evicts 0) 0m(evicts 2) 3m(evicts 1) 3h
  assert (lru.hits, lru.misses) == (2, 6)
  assert loads == [0, 1, 2, 1, 0, 3]
  assert list(lru.entries) == [0, 3]
  lru.put(5, "w5")  # a prefetch becomes most recent and evicts the least recent
  assert list(lru.entries) == [3, 5]
  empty = offload.ExpertLRU(0)
  for e in [1, 1, 1]:
    empty.get(e, load)
  assert (empty.hits, empty.misses, len(empty.entries)) == (0, 3, 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_error_bounded(bits):
  w = np.random.default_rng(0).normal(size=(32, 24)).astype(np.float32)
  w[:, 3] *= 50  # channels of different scale each get their own
  q = offload.quantize(w, bits)
  deq = np.asarray(offload.dequantize(q.values, q.scale_O, bits))
  assert np.all(np.abs(deq - w) <= q.scale_O / 2 * (1 + 1e-5) + 1e-7)
  assert q.values.nbytes == w.size * bits // 8
  np.testing.assert_allclose(q.scale_O, np.abs(w).max(0) / (2 ** (bits - 1) - 1), rtol=1e-6)


@pytest.fixture(scope="module")
def model():
  # MoE in blocks 1 and 3 (dense blocks between) so prefetch looks two layers ahead.
  cfg = moe_cfg(num_layers=4, d_model=16, ffn_dim=32, vocab_size=64, max_seq_len=16,
                top_k=2, router="top2", every=2, dropless=True)
  m = build_model(cfg, 0)
  set_mode(m, train=False)
  return m


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (1, T), 0, 64)


forward = nnx.jit(lambda m, t: m(t)[0])


@pytest.fixture(scope="module")
def want(model, tokens):
  return forward(model, tokens)


@pytest.fixture(scope="module")
def expert_effect(model, tokens, want):
  """Largest logit change from zeroing every expert: what a 1e-5 check must resolve."""
  m = nnx.clone(model)
  for b in (1, 3):
    for name in offload.EXPERT_PARAMS:
      getattr(m.blocks[b].mlp, name)[...] = jnp.zeros_like(getattr(m.blocks[b].mlp, name)[...])
  return float(jnp.abs(forward(m, tokens) - want).max())


def expert_bytes(m):
  return sum(w[0].size * 4 for w in m.blocks[1].mlp.weights)


@pytest.mark.parametrize("variant", offload.VARIANTS)
def test_engine_equals_in_memory_model(model, tokens, want, expert_effect, variant):
  """Catches a wrong expert applied (LRU returning another expert's weights, a stale
  prefetch, a slot mix-up in the combine): the experts move the logits by O(1)."""
  engine = offload.OffloadEngine(model, **offload.variant_options(variant, 2))
  got, _ = engine.decode(tokens)
  assert_scale(want, what="logits")
  assert expert_effect > 0.1, expert_effect
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  c = engine.counters
  used = T * 2 * 2  # tokens x MoE layers x top-2 (distinct experts)
  assert engine.hits + engine.misses == used
  if variant == "no_cache":
    assert engine.hits == 0 and c.bytes_moved == used * expert_bytes(model)
  if variant == "naive":
    assert c.bytes_moved == T * 2 * 4 * expert_bytes(model)
  if variant == "full":   # layer 3's guess from layer 1's output, one per token
    assert c.recall_total == T * 2 and 0 <= engine.summary()["speculative_recall"] <= 1
    assert c.prefetch_loads > 0


def test_engine_greedy_generation_equals_kv_cached_model(model, tokens):
  engine = offload.OffloadEngine(model, cache_size=2)
  _, generated = engine.decode(tokens[:, :3], num_new=4)
  assert_not_echo([tokens[0, :3]], [generated[0]])
  cfg = model.cfg
  caches = [kv_cache.init_cache(1, 16, cfg.num_kv_heads, cfg.dh) for _ in range(4)]
  step = nnx.jit(lambda m, tok, pos, caches: m(tok, pos, caches)[:2])
  logits, caches = step(model, tokens[:, :3], jnp.arange(3)[None], caches)
  greedy = []
  for t in range(3, 7):
    nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    greedy.append(nxt)
    logits, caches = step(model, nxt, jnp.full((1, 1), t), caches)
  np.testing.assert_array_equal(generated, jnp.concatenate(greedy, 1))


def test_engine_counts_hits_on_forced_routing(model, tokens):
  # A zero router makes every token pick experts 0 and 1 (ties break to the lowest id):
  # each layer misses twice on the first token and hits ever after.
  saved = [model.blocks[b].mlp.router.w[...] for b in (1, 3)]
  try:
    for b in (1, 3):
      model.blocks[b].mlp.router.w[...] = jnp.zeros_like(saved[0])
    engine = offload.OffloadEngine(model, cache_size=2, prefetch=False)
    engine.decode(tokens)
    assert (engine.hits, engine.misses) == (2 * 2 * (T - 1), 2 * 2)
    assert engine.counters.bytes_moved == 4 * expert_bytes(model)
  finally:
    for b, w in zip((1, 3), saved):
      model.blocks[b].mlp.router.w[...] = w


@pytest.mark.quick
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_engine_equals_dequantised_model(model, tokens, want, expert_effect, quant):
  """The quantised engine equals the model with quantised-then-dequantised experts, at 1e-5.

  Catches experts loaded wrongly (all zeros: checked to fail), a wrong scale or int4
  nibble order, dequantising into the wrong expert. Quantisation's own effect on the
  logits is asserted above 1e-4, so the reference is not just the original model.
  """
  engine = offload.OffloadEngine(model, cache_size=0, prefetch=False, quant=quant)
  got, _ = engine.decode(tokens)
  ref = forward(offload.dequantized_model(model, quant), tokens)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert float(jnp.abs(ref - want).max()) > 1e-4        # quantisation is visible ...
  assert expert_effect > 1e3 * 1e-5                      # ... and so are the experts
  # Quantised codes plus one float32 scale per output channel of w_gate, w_up, w_down.
  d, f, bits = 16, 32, int(quant[3:])
  per_expert = 3 * d * f * bits // 8 + 4 * (f + f + d)
  assert engine.counters.bytes_moved == T * 2 * 2 * per_expert


def test_prefetch_runs_on_a_background_thread(model, tokens, want):
  """Speculative loads happen off the main thread (they overlap compute) and stay exact."""
  import threading
  engine = offload.OffloadEngine(model, cache_size=2, prefetch=True)
  threads, fetch = set(), engine._fetch
  engine._fetch = lambda b, e: threads.add(threading.get_ident()) or fetch(b, e)
  got, _ = engine.decode(tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert engine.counters.prefetch_loads > 0
  assert threads - {threading.get_ident()}, "no expert was fetched off the main thread"


def test_offload_rejects_unknown_quant(model):
  with pytest.raises(ValueError, match="quant"):
    offload.OffloadEngine(model, quant="int3")
