"""Offloaded MoE decoding (Eliseev and Mazur 2023): experts in host memory.

Per applied MoE layer the device holds an LRU cache of `cache_size` experts.
Decoding runs token by token with the model's KV caches: attention, norms,
routers and the dense parts run as jitted functions on the device; after each
MoE layer's router, the chosen experts are taken from its LRU cache or copied
from the host (a miss). Speculative prefetch applies the *next* MoE layer's
norm and router to the current hidden state and loads its likely experts into
that layer's cache early, on a background thread: the guess, its host sync and
the copies overlap the layers in between, and the main thread joins the
prefetch only when it reaches that layer. Experts may be stored as int8 or
int4 with per-output-channel scales, copied quantised and dequantised on the
device (`dequantized_model` is the in-memory model the quantised engine equals).
`link_bytes_per_s` simulates a slower host-device link (a sleep per copy, which
releases the GIL like a real DMA wait), for measuring overlap on a CPU where
host and device memory are the same.

Per MoE layer (`_moe_layer`): join the prefetch started one MoE layer earlier,
route (attention, router, one host sync), load the used experts (`_load_experts`:
LRU hits, or copies that may evict the least recently used), combine, and
prefetch the next MoE layer's guessed experts (`_prefetch`).

Variants (the paper's ablation): full (LRU + prefetch), no_prefetch (LRU),
no_cache (no LRU, no pre-loading: every used expert is copied each time) and
naive (every expert of the layer is copied for every token).

The engine is dropless (it applies every chosen expert), so its outputs equal
the in-memory model run dropless, or with capacity that drops nothing.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mor import kv_cache
from mor.decode import sample
from mor.layers.moe import MoEMLP, swiglu
from mor.models.transformer import Transformer, compute_dtype

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")
VARIANTS = ("full", "no_prefetch", "no_cache", "naive")
QUANT_BITS = {"none": 0, "int8": 8, "int4": 4}


# ---------------------------------------------------------------------------
# Quantised storage: symmetric, one scale per output channel (last axis).

class QTensor(NamedTuple):
  values: np.ndarray      # int8 [I, O], or uint8 [I/2, O] holding two int4 codes per byte
  scale_O: np.ndarray     # float32
  bits: int

  @property
  def nbytes(self) -> int:
    return self.values.nbytes + self.scale_O.nbytes


def quantize(w_IxO: np.ndarray, bits: int) -> QTensor:
  """Rounds w / scale to [-q, q], q = 2^(bits-1) - 1; error at most scale / 2."""
  qmax = 2 ** (bits - 1) - 1
  scale_O = np.maximum(np.abs(w_IxO).max(axis=0), 1e-12).astype(np.float32) / qmax
  q = np.clip(np.rint(w_IxO / scale_O), -qmax, qmax).astype(np.int8)
  if bits == 4:  # pack rows 2i (low nibble) and 2i+1 (high nibble), offset to 0..15
    assert q.shape[0] % 2 == 0, q.shape
    u = (q + 8).astype(np.uint8)
    q = u[0::2] | (u[1::2] << 4)
  return QTensor(q, scale_O, bits)


@functools.partial(jax.jit, static_argnames=("bits", "dtype"))
def dequantize(values: jax.Array, scale_O: jax.Array, bits: int, dtype=jnp.float32):
  if bits == 4:
    lo = (values & 0xF).astype(jnp.int8) - 8
    hi = (values >> 4).astype(jnp.int8) - 8
    values = jnp.stack([lo, hi], axis=1).reshape(-1, values.shape[-1])
  return (values.astype(jnp.float32) * scale_O).astype(dtype)


def dequantized_model(model: Transformer, quant: str) -> Transformer:
  """A copy of model whose expert weights went through quantize -> dequantize per expert.

  The quantised engine must equal this model (to float rounding), not the original.
  """
  bits = QUANT_BITS[quant]
  out = nnx.clone(model)
  if not bits:
    return out
  for block in out.blocks:
    if isinstance(block.mlp, MoEMLP):
      for name in EXPERT_PARAMS:
        w = np.asarray(getattr(block.mlp, name)[...])
        deq = [np.asarray(dequantize(*quantize(w[e], bits)[:2], bits)) for e in range(len(w))]
        getattr(block.mlp, name)[...] = jnp.asarray(np.stack(deq))
  return out


# ---------------------------------------------------------------------------

class ExpertLRU:
  """Least-recently-used cache of device-resident experts of one layer, with counters."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self.entries: collections.OrderedDict = collections.OrderedDict()
    self.hits = self.misses = 0

  def __contains__(self, expert: int) -> bool:
    return expert in self.entries

  def get(self, expert: int, load: Callable[[int], object]):
    """The expert's weights; a miss loads them (and keeps them if capacity allows)."""
    if expert in self.entries:
      self.hits += 1
      self.entries.move_to_end(expert)
      return self.entries[expert]
    self.misses += 1
    weights = load(expert)
    self.put(expert, weights)
    return weights

  def put(self, expert: int, weights) -> None:
    """Keeps the expert as the most recent entry, then evicts down to capacity."""
    if self.capacity <= 0:
      return
    self.entries[expert] = weights
    self.entries.move_to_end(expert)
    self._evict()

  def _evict(self) -> None:
    """Drops the least recently used experts beyond capacity."""
    while len(self.entries) > self.capacity:
      self.entries.popitem(last=False)


@dataclasses.dataclass
class Counters:
  bytes_moved: int = 0
  prefetch_loads: int = 0
  recall_hits: int = 0          # used experts that the speculative guess had named
  recall_total: int = 0         # used experts in layers that had a guess
  tokens: int = 0
  seconds: float = 0.0



def variant_options(variant: str, cache_size: int) -> dict:
  return {"full": dict(cache_size=cache_size, prefetch=True),
          "no_prefetch": dict(cache_size=cache_size, prefetch=False),
          "no_cache": dict(cache_size=0, prefetch=False),
          "naive": dict(cache_size=0, prefetch=False, naive=True)}[variant]


# ---------------------------------------------------------------------------
# Jitted device pieces. Modules arrive as (graphdef, skeleton, state): the
# skeleton stands in for the expert weights with empty arrays, so these
# functions never see them and one compilation serves every layer.

def _split_without(module: nnx.Module, drop) -> tuple:
  graphdef, dropped, rest = nnx.split(module, drop, ...)
  return graphdef, jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), dropped), rest


def _is_expert_weight(path, _) -> bool:
  return len(path) == 2 and path[0] == "mlp" and path[1] in EXPERT_PARAMS


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, skeleton, rest, tokens_BxS):
  return nnx.merge(graphdef, skeleton, rest).embed_tokens(tokens_BxS)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, skeleton, rest, x_BxSxD):
  return nnx.merge(graphdef, skeleton, rest).logits(x_BxSxD)


@functools.partial(jax.jit, static_argnums=0)
def _dense_block(graphdef, skeleton, rest, x_BxSxD, pos_BxS, cache):
  x_BxSxD, cache, _, _ = nnx.merge(graphdef, skeleton, rest)(x_BxSxD, pos_BxS, cache=cache)
  return x_BxSxD, cache


@functools.partial(jax.jit, static_argnums=0)
def _moe_attention(graphdef, skeleton, rest, x_BxSxD, pos_BxS, cache):
  """The attention half of a MoE block, then its router. Returns (x, h_NxD, routing, cache)."""
  block = nnx.merge(graphdef, skeleton, rest)
  h, cache, _ = block.attn(block.attn_norm(x_BxSxD), pos_BxS, cache=cache)
  x_BxSxD = x_BxSxD + h
  h_NxD = block.mlp_norm(x_BxSxD).reshape(-1, x_BxSxD.shape[-1])
  r = block.mlp.router(h_NxD, False)
  return x_BxSxD, h_NxD, (r.expert_NxA, r.gate_NxA, r.valid_NxA), cache


@functools.partial(jax.jit, static_argnums=0)
def _guess(graphdef, skeleton, rest, x_BxSxD):
  """Speculation: a later MoE block's norm and router applied to the current hidden state."""
  block = nnx.merge(graphdef, skeleton, rest)
  h_NxD = block.mlp_norm(x_BxSxD).reshape(-1, x_BxSxD.shape[-1])
  r = block.mlp.router(h_NxD, False)
  return r.expert_NxA, r.valid_NxA


@jax.jit
def _apply_experts(h_NxD, gate_NxA, slot_NxA, valid_NxA, weights):
  """sum_a gate * expert_{slot}(h) with the U fetched experts; same combine as MoEMLP."""
  w_gate, w_up, w_down = (jnp.stack(w) for w in zip(*weights))
  out_UxNxD = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(h_NxD, w_gate, w_up, w_down)
  out_NxAxD = out_UxNxD[slot_NxA, jnp.arange(h_NxD.shape[0])[:, None]]
  w_NxA = gate_NxA * valid_NxA
  return jnp.einsum("nad,na->nd", out_NxAxD.astype(jnp.float32), w_NxA).astype(h_NxD.dtype)


# ---------------------------------------------------------------------------

class OffloadEngine:
  """Token-by-token decoding of a MoE Transformer whose experts live in host memory."""

  def __init__(self, model: Transformer, *, cache_size: int = 2, prefetch: bool = True,
               naive: bool = False, quant: str = "none", link_bytes_per_s: float = 0.0):
    if quant not in QUANT_BITS:
      raise ValueError(f"quant={quant!r}; choose one of {sorted(QUANT_BITS)}")
    self.cfg = model.cfg
    self.link_bytes_per_s = float(link_bytes_per_s)
    self.dtype = compute_dtype(model.cfg)
    self.bits = QUANT_BITS[quant]
    self.prefetch, self.naive = prefetch, naive
    self.applied = model.plan.applied
    self.top = _split_without(model, lambda path, v: path[0] == "blocks"
                              and isinstance(v, nnx.Param))
    self.blocks, self.host = self._split_blocks(model)
    moe_layers = [j for j, b in enumerate(self.applied) if b in self.host]
    # Speculation target of each MoE layer: the next applied MoE layer.
    self.next_moe = dict(zip(moe_layers, moe_layers[1:]))
    self.cache_size = 0 if naive else cache_size
    self.moe_layers = moe_layers
    # One worker: prefetches run in order, overlapping the main thread's layers.
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    self.reset()

  def _split_blocks(self, model: Transformer) -> tuple[list, dict]:
    """(device part of every block, {MoE block: its experts in host memory, maybe quantised})."""
    blocks, host = [], {}
    for b, block in enumerate(model.blocks):
      if isinstance(block.mlp, MoEMLP):
        blocks.append(_split_without(block, _is_expert_weight))
        host[b] = [self._store(tuple(np.asarray(w[e]) for w in block.mlp.weights))
                   for e in range(block.mlp.moe.num_experts)]
      else:
        blocks.append(_split_without(block, lambda *_: False))
    return blocks, host

  def reset(self) -> None:
    """Empty expert caches and zero counters."""
    self.caches = {j: ExpertLRU(self.cache_size) for j in self.moe_layers}
    self.counters = Counters()

  @property
  def hits(self) -> int:
    return sum(c.hits for c in self.caches.values())

  @property
  def misses(self) -> int:
    return sum(c.misses for c in self.caches.values())

  def summary(self) -> dict:
    c, used = self.counters, self.hits + self.misses
    return {"hit_rate": self.hits / used if used else 0.0,
            "speculative_recall": c.recall_hits / c.recall_total if c.recall_total else None,
            "bytes_moved": c.bytes_moved, "hits": self.hits, "misses": self.misses,
            "prefetch_loads": c.prefetch_loads, "cache_size": self.cache_size,
            "tokens_per_s": c.tokens / c.seconds if c.seconds else 0.0}

  def _store(self, weights: tuple) -> tuple:
    if not self.bits:
      return weights
    return tuple(quantize(w, self.bits) for w in weights)

  def _fetch(self, b: int, expert: int) -> tuple[tuple, int]:
    """Copies one expert host -> device (quantised if stored so) and dequantises there.

    Returns (weights, bytes moved); touches no engine state, so it may run on the
    prefetch thread.
    """
    out, nbytes = [], 0
    for w in self.host[b][expert]:
      nbytes += w.nbytes
      if isinstance(w, QTensor):
        out.append(dequantize(jax.device_put(w.values), jax.device_put(w.scale_O), w.bits,
                              self.dtype))
      else:
        out.append(jax.device_put(w).astype(self.dtype))
    if self.link_bytes_per_s:
      time.sleep(nbytes / self.link_bytes_per_s)
    return tuple(out), nbytes

  def _load(self, b: int, expert: int) -> tuple:
    weights, nbytes = self._fetch(b, expert)
    self.counters.bytes_moved += nbytes
    return weights

  def _speculate(self, nxt: int, x_BxSxD, resident: frozenset) -> tuple[set, dict]:
    """Prefetch thread: guess layer nxt's experts from x and fetch those not resident."""
    b = self.applied[nxt]
    g_expert, g_valid = (np.asarray(a) for a in _guess(*self.blocks[b], x_BxSxD))
    guess = set(g_expert[g_valid].tolist())
    return guess, {e: self._fetch(b, e) for e in sorted(guess - resident)}

  def _join_prefetch(self, j: int, pending: dict, guesses: dict) -> None:
    """Waits for layer j's prefetch (if any) and puts its experts into j's cache."""
    if j not in pending:
      return
    guess, fetched = pending.pop(j).result()
    guesses[j] = guess
    for e, (weights, nbytes) in fetched.items():
      self.counters.prefetch_loads += 1
      self.counters.bytes_moved += nbytes
      self.caches[j].put(e, weights)

  def _moe_layer(self, j: int, x_BxSxD, pos_BxS, cache, guesses: dict, pending: dict):
    """Applied layer j (a MoE block): join its prefetch, route, load, combine, prefetch j's next."""
    b = self.applied[j]
    self._join_prefetch(j, pending, guesses)
    x_BxSxD, h_NxD, (expert, gate, valid), cache = _moe_attention(*self.blocks[b], x_BxSxD,
                                                                  pos_BxS, cache)
    expert_np, valid_np = np.asarray(expert), np.asarray(valid)  # the one host sync per layer
    used = self._used_experts(j, expert_np, valid_np, guesses)
    weights = self._load_experts(j, used)
    # Pad to a fixed number of slots so the jitted combine compiles once.
    n_slots = min(len(self.host[b]), expert_np.size)
    weights += [weights[0]] * (n_slots - len(weights))
    slot_np = np.searchsorted(np.asarray(used), np.where(valid_np, expert_np, used[0]))
    y = _apply_experts(h_NxD, gate, jnp.asarray(slot_np, jnp.int32), valid, tuple(weights))
    x_BxSxD = x_BxSxD + y.reshape(x_BxSxD.shape)
    self._prefetch(j, x_BxSxD, pending)
    return x_BxSxD, cache

  def _used_experts(self, j: int, expert_np, valid_np, guesses: dict) -> list[int]:
    """The experts layer j's router chose (sorted), scoring the prefetch guess against them."""
    used = sorted(set(expert_np[valid_np].tolist()))
    if j in guesses:
      self.counters.recall_hits += len(set(used) & guesses.pop(j))
      self.counters.recall_total += len(used)
    return used or [0]   # a DS-MoE threshold above E * max gate keeps no expert

  def _load_experts(self, j: int, used: list[int]) -> list[tuple]:
    """Device weights of the used experts: from layer j's LRU (a miss loads and may evict)."""
    b = self.applied[j]
    lru, load = self.caches[j], functools.partial(self._load, b)
    if self.naive:  # every expert of the layer crosses over, every token
      loaded = [load(e) for e in range(len(self.host[b]))]
      lru.misses += len(used)
      return [loaded[e] for e in used]
    # Resident experts first, so that loading the others cannot evict them.
    fetched = {e: lru.get(e, load) for e in sorted(used, key=lambda e: e not in lru)}
    return [fetched[e] for e in used]

  def _prefetch(self, j: int, x_BxSxD, pending: dict) -> None:
    """Starts the background guess-and-fetch of the next MoE layer's experts from x."""
    nxt = self.next_moe.get(j)
    if self.prefetch and nxt is not None:   # layer nxt's cache is untouched until it joins
      pending[nxt] = self._pool.submit(self._speculate, nxt, x_BxSxD,
                                       frozenset(self.caches[nxt].entries))

  def step(self, tokens_Bx1: jax.Array, pos_Bx1: jax.Array, caches: list):
    """One decoding step; returns (logits_Bx1xV, caches)."""
    x = _embed(*self.top, tokens_Bx1)
    guesses, pending, new_caches = {}, {}, []
    for j, b in enumerate(self.applied):
      if b in self.host:
        x, cache = self._moe_layer(j, x, pos_Bx1, caches[j], guesses, pending)
      else:
        x, cache = _dense_block(*self.blocks[b], x, pos_Bx1, caches[j])
      new_caches.append(cache)
    return _logits(*self.top, x), new_caches

  def init_caches(self, batch: int, slots: int) -> list:
    c = self.cfg
    return [kv_cache.init_cache(batch, slots, c.num_kv_heads, c.dh, self.dtype)
            for _ in self.applied]

  def decode(self, prompt_BxS: jax.Array, num_new: int = 0, *, temperature: float = 0.0,
             seed: int = 0):
    """Feeds the prompt token by token, then generates num_new tokens (greedy at T = 0).

    Returns (logits_BxTxV for every fed position, generated_BxN).
    """
    b, s = prompt_BxS.shape
    # Fixed slot count: every decode call reuses the same compiled functions.
    caches = self.init_caches(b, max(self.cfg.max_seq_len, s + num_new))
    tok, logits, generated = prompt_BxS[:, :1], [], []
    key = jax.random.key(seed)
    start = time.perf_counter()
    for t in range(s + num_new - (1 if num_new else 0)):
      pos = jnp.full((b, 1), t, jnp.int32)
      out, caches = self.step(tok, pos, caches)
      logits.append(out)
      if t + 1 < s:
        tok = prompt_BxS[:, t + 1:t + 2]
      else:
        tok = _sample(out[:, -1], jax.random.fold_in(key, t), temperature)[:, None]
        generated.append(tok)
    all_logits = jnp.concatenate(logits, axis=1).block_until_ready()
    self.counters.seconds += time.perf_counter() - start
    self.counters.tokens += b * len(logits)
    gen = jnp.concatenate(generated, axis=1) if generated else jnp.zeros((b, 0), jnp.int32)
    return all_logits, gen[:, :num_new]


@functools.partial(jax.jit, static_argnames="temperature")
def _sample(logits_BxV, key, temperature: float):
  return sample(logits_BxV, key, temperature)


def echo_fraction(prompt_BxS, generated_BxN) -> float:
  """Fraction of generated tokens equal to the token before them (an echoing model)."""
  p, g = np.asarray(prompt_BxS), np.asarray(generated_BxN)
  prev = np.concatenate([p[:, -1:], g[:, :-1]], axis=1)
  return float(np.mean(g == prev)) if g.size else 0.0
