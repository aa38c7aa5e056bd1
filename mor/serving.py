"""Continuous depth-wise batching: a serving engine for MoR (and recursive/vanilla) models.

A fixed number of slots each hold one request; a slot's state is the token it
is processing, that token's hidden state and the recursions it has had. One
engine step (static shapes throughout; `_io`, then `_step_depths`) is
  1. IO: up to `exit_rows` slots whose token is done (router said stop, or
     N_r reached) form one small batch (`_io_rows`). Retire (`_retire`):
     suffix blocks, final norm, LM head, sampling. Admit (`_admit`): the slot
     takes its next token (the next prompt token while prefilling, else the
     sample) or, when its request is finished, the next request of the FIFO
     queue (caches reset). Route (`_route`): the new token goes through the
     embedding and prefix blocks in the same batch, and the router decides
     its first recursion; `_write_rows` puts the rows back into the slots.
  2. Step the depths (`_step_depths`): the shared unit runs ONCE over all
     slots, each at its own depth and position: slot i writes its new key
     into, and attends over, its own depth-d_i cache. Routers of every depth
     are evaluated and each slot takes its own depth's decision and gate.
A token of depth d costs d unit rows and one IO row, and a slot whose token
exits is refilled at once, so the unit batch stays full. Prompts are
prefilled token by token through the same step (exact and simple; a prompt
token costs what a generated one does).

Caches (`Store`): keys/values [slots, K, T, H]. A unit block keeps one segment
per depth (deepest first), depth r in [off_r, off_r + T_r), with T_r below
max_len for deeper recursions when `slots` asks for it, so the memory saving is
real; KV sharing keeps one segment, written at depth 1 only. A slot reads its
depth's segment as a contiguous T_1-long window (the tail hidden by position
-1): static shapes, at the price of a copy per block and of reading T_1 keys
where T_r would do. Prefix and suffix blocks: [slots, K, max_len, H], gathered
for the IO rows. Each new key is written before the rows are read, which lets
XLA update the caches in place.

Decisions are those of `MoRTransformer.__call__(..., caches=...)`
(mor_decode), so greedy outputs equal per-request `mor.decode.generate`. The
queue lives on the device; `advance` runs `steps_per_call` steps per host
call under `lax.while_loop`. With a mesh the slot axis is sharded over `data`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mor import routers as R
from mor.decode import sample
from mor.models.mor_decode import depth_slots, ec_decision
from mor.models.transformer import compute_dtype
from mor.serving_store import Store, attend_rows as _attend_rows, block as _block
from mor.serving_store import reset_rows as _reset_rows

IDLE, RECUR, EXIT = 0, 1, 2   # slot stages: free / next runs the unit / waits for IO


class Slots(NamedTuple):
  req_S: jax.Array          # request id, -1 when free
  tok_S: jax.Array          # the token being processed ...
  pos_S: jax.Array          # ... and its position
  gen_S: jax.Array          # tokens generated so far for the request
  stage_S: jax.Array        # IDLE / RECUR / EXIT
  depth_S: jax.Array        # recursions applied to the current token
  limit_S: jax.Array        # most recursions it may take (TC: its assigned depth)
  upd_S: jax.Array          # the pending recursion updates the state (router said go)
  gate_S: jax.Array         # gate of the pending recursion (EC) / of the token (TC)
  h_SxD: jax.Array          # EC: running hidden state; TC: recursion state S_i
  h1_SxD: jax.Array         # TC: prefix output H1


class Queue(NamedTuple):
  prompts_RxP: jax.Array
  prompt_len_R: jax.Array
  max_new_R: jax.Array
  out_RxG: jax.Array
  head: jax.Array           # next request to admit (FIFO)
  num: jax.Array            # requests queued (the rest of the R rows is padding)
  logits_RxTxV: jax.Array | None = None   # record_logits: the LM head's output per position


class EngineState(NamedTuple):
  slots: Slots
  prefix: list
  unit: list
  suffix: list
  queue: Queue
  key: jax.Array
  counters: jax.Array       # int32 [steps, unit rows used, IO rows used, tokens exited]


class Engine:
  """Serving engine with continuous depth-wise batching; greedy unless temperature > 0.

  model: MoRTransformer, or a Transformer with a cycle plan (recursive: every
    token takes N_r recursions; vanilla: one pass of all layers).
  num_slots: sequences in flight; max_len: positions per sequence (prompt + new).
  exit_rows: rows of the IO batch per step (suffix, head, prefix); a throughput
    knob that never changes outputs. Default: slots / expected depth, +25%.
  slots: per-depth cache sizes (None, 'capacity' or fractions; see depth_slots).
  forced_depths: a periodic per-position depth schedule that replaces the routers'
    decisions (gates still come from the routers); for benchmarks.
  mesh: shard the slot axis over its `data` axis.
  steps_per_call: engine steps per host call; compiler_options: for jax.jit.
  record_logits: keep every exiting token's logits (prompt positions included);
    `run` then fills `self.logits` {id: [prompt + new - 1, V]}, for tests.
  """

  def __init__(self, model: nnx.Module, num_slots: int, max_len: int, *,
               exit_rows: int | None = None, slots=None,
               forced_depths: Sequence[int] | None = None, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0, mesh=None, steps_per_call: int = 64,
               compiler_options: dict | None = None, record_logits: bool = False):
    cfg, plan = model.cfg, model.plan
    if not plan.cycle:
      raise ValueError("depth-wise batching needs a cycle or middle_cycle plan")
    if getattr(cfg, "lora_rank", 0):  # one batched unit call would need per-slot adapters
      raise ValueError("model.lora_rank > 0: the serving engine batches one unit call over all "
                       "depths and has no per-slot adapters; merge them first "
                       "(mor.interop.merge_lora) or use mor.decode.generate")
    self.cfg, self.plan = cfg, plan
    self.kind = ("fixed" if cfg.kind != "mor" else
                 "ec" if cfg.router.routing == "expert_choice" else "tc")
    self.n = plan.num_recursions
    self.share = cfg.kind == "mor" and cfg.router.kv == "share"
    self.num_slots, self.max_len = num_slots, max_len
    sizes = depth_slots(cfg, max_len, slots) if cfg.kind == "mor" else [max_len] * self.n
    self.seg_sizes = sizes[:1] if self.share else sizes
    # Deepest depth first: a T_1-long window from any segment's start stays inside the store.
    self.seg_offsets = [int(sum(self.seg_sizes[r + 1:])) for r in range(len(self.seg_sizes))]
    self.forced = None if forced_depths is None else tuple(int(d) for d in forced_depths)
    if exit_rows is None:   # expected exits per step, +25%
      mean_depth = (float(np.mean(self.forced)) if self.forced else self.n
                    if self.kind == "fixed" else sum(R.ec_fractions(cfg)))
      exit_rows = math.ceil(1.25 * num_slots / max(mean_depth, 1.0))
    self.exit_rows = max(1, min(num_slots, exit_rows))
    self.temperature, self.top_k = float(temperature), int(top_k)
    self.mesh, self.steps_per_call = mesh, steps_per_call
    self.compiler_options = compiler_options
    self.record_logits, self.logits = record_logits, {}
    self.graphdef, self.params = nnx.split(model)
    self.key = jax.random.key(seed)
    self._requests: list[tuple[int, np.ndarray, int]] = []
    self._next_id = 0
    self.stats: dict = {}
    self._compiled = {}

  # -------------------------------------------------------------------------
  def submit(self, prompt_tokens, max_new_tokens: int) -> int:
    """Queues a request (FIFO); returns its id."""
    prompt = np.asarray(prompt_tokens, np.int32).reshape(-1)
    if len(prompt) < 1 or max_new_tokens < 1:
      raise ValueError("a request needs at least one prompt token and one new token")
    if len(prompt) + max_new_tokens > self.max_len:
      raise ValueError(f"prompt {len(prompt)} + {max_new_tokens} new tokens exceed "
                       f"max_len={self.max_len}")
    rid = self._next_id
    self._next_id += 1
    self._requests.append((rid, prompt, int(max_new_tokens)))
    return rid

  def run(self) -> dict[int, np.ndarray]:
    """Serves every queued request; returns {id: generated tokens}."""
    reqs, st, done = list(self._requests), self.start(), False
    while st is not None and not done:
      st, done = self.advance(st)
    if st is None:
      return {}
    out = np.asarray(st.queue.out_RxG)
    self.key = st.key
    if st.queue.logits_RxTxV is not None:
      lg = np.asarray(st.queue.logits_RxTxV)
      self.logits = {rid: lg[i, :len(p) + n - 1] for i, (rid, p, n) in enumerate(reqs)}
    return {rid: out[i, :n] for i, (rid, _, n) in enumerate(reqs)}

  def start(self) -> EngineState | None:
    """Moves the queued requests onto the device: the state `advance` steps (None if none)."""
    reqs, self._requests = self._requests, []
    if not reqs:
      return None
    r = _bucket(len(reqs))
    p = _bucket(max(len(x[1]) for x in reqs))
    g = _bucket(max(x[2] for x in reqs))
    prompts, plen, max_new = np.zeros((r, p), np.int32), np.ones(r, np.int32), np.zeros(
        r, np.int32)
    for i, (_, prompt, n) in enumerate(reqs):
      prompts[i, :len(prompt)], plen[i], max_new[i] = prompt, len(prompt), n
    queue = Queue(jnp.asarray(prompts), jnp.asarray(plen), jnp.asarray(max_new),
                  jnp.zeros((r, g), jnp.int32), jnp.int32(0), jnp.int32(len(reqs)),
                  jnp.zeros((r, self.max_len, self.cfg.vocab_size), jnp.float32)
                  if self.record_logits else None)
    return self._put(self.init_state(queue))

  def advance(self, st: EngineState) -> tuple[EngineState, bool]:
    """Up to steps_per_call engine steps (one device call); returns (state, all served)."""
    st, done = self._chunk_fn()(self.params, st)
    c = np.asarray(st.counters)
    self.stats = {"steps": int(c[0]), "unit_rows": int(c[1]),
                  "unit_row_utilisation": c[1] / max(1, c[0] * self.num_slots),
                  "io_row_utilisation": c[2] / max(1, c[0] * self.exit_rows),
                  "tokens_processed": int(c[3])}
    return st, bool(done)

  def kv_bytes(self) -> dict:
    """Allocated KV bytes: per depth of the unit (summed over its blocks) and in total."""
    c = self.cfg
    item = jnp.dtype(compute_dtype(c)).itemsize
    per_entry = 2 * c.num_kv_heads * c.dh * item + 4   # keys, values and a position
    unit = [self.num_slots * t * per_entry * len(self.plan.unit) for t in self.seg_sizes]
    other = self.num_slots * self.max_len * per_entry * (len(self.plan.prefix) +
                                                         len(self.plan.suffix))
    return {"per_depth": unit, "total": sum(unit) + other}

  # -------------------------------------------------------------------------
  def init_state(self, queue: Queue) -> EngineState:
    c, s = self.cfg, self.num_slots
    dt = compute_dtype(c)

    def store(segments: Sequence[int]) -> Store:
      t = sum(segments)
      z = jnp.zeros((s, c.num_kv_heads, t, c.dh), dt)
      return Store(z, z, jnp.full((s, t), -1, jnp.int32),
                   jnp.zeros((s, len(segments)), jnp.int32))

    zi = jnp.zeros((s,), jnp.int32)
    zd = jnp.zeros((s, c.d_model), dt)
    slots = Slots(jnp.full((s,), -1, jnp.int32), zi, zi, zi, zi, zi, zi,
                  jnp.zeros((s,), bool), jnp.zeros((s,), jnp.float32), zd, zd)
    return EngineState(slots, [store([self.max_len]) for _ in self.plan.prefix],
                       [store(self.seg_sizes) for _ in self.plan.unit],
                       [store([self.max_len]) for _ in self.plan.suffix], queue, self.key,
                       jnp.zeros((4,), jnp.int32))

  def _put(self, st: EngineState) -> EngineState:
    if self.mesh is None:
      return st
    rows, rep = NamedSharding(self.mesh, P("data")), NamedSharding(self.mesh, P())
    self.params = jax.device_put(self.params, rep)
    put_rows = lambda t: jax.device_put(t, rows)
    return st._replace(slots=put_rows(st.slots), prefix=put_rows(st.prefix),
                       unit=put_rows(st.unit), suffix=put_rows(st.suffix),
                       queue=jax.device_put(st.queue, rep), key=jax.device_put(st.key, rep),
                       counters=jax.device_put(st.counters, rep))

  def _chunk_fn(self):
    if "chunk" not in self._compiled:
      self._compiled["chunk"] = jax.jit(functools.partial(_run_chunk, self),
                                        compiler_options=self.compiler_options)
    return self._compiled["chunk"]


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------
def _decide(eng: Engine, model, d_R, limit_R, h_RxD):
  """Whether each row's token takes recursion d (0-based), and that recursion's gate."""
  go_R = d_R < limit_R
  if eng.kind != "ec":
    return go_R, None
  gos, gates = zip(*[ec_decision(model, r, h_RxD[:, None]) for r in range(eng.n)])
  idx_Rx1 = jnp.minimum(d_R, eng.n - 1)[:, None]
  pick = lambda xs: jnp.take_along_axis(jnp.concatenate(xs, axis=1), idx_Rx1, axis=1)[:, 0]
  if eng.forced is None:
    go_R &= pick(gos)
  return go_R, pick(gates)


def _forced_limit(eng: Engine, pos_R, req_R):
  """Depth schedule[(pos + request) % period]: exact fractions per sequence, and requests
  out of phase, so slots do not all exit in the same step."""
  sched = jnp.asarray(eng.forced, jnp.int32)
  return sched[(pos_R + jnp.maximum(req_R, 0)) % len(eng.forced)]


class IORows(NamedTuple):
  """The IO batch of one engine step: which slots it holds and their per-row values."""
  rows_E: jax.Array         # slot of each row (exiting slots first, then idle ones)
  valid_E: jax.Array        # the row holds a slot that exits or can take a request
  exiting_E: jax.Array      # its token is done: it retires this step
  stage_E: jax.Array        # the slot's stage before this step
  req_E: jax.Array          # request, token, position, generated count: before _admit,
  tok_E: jax.Array          # the retiring token's; after, the entering token's
  pos_E: jax.Array
  gen_E: jax.Array
  enter_E: jax.Array        # a token enters the model (set by _admit)
  finished_E: jax.Array     # the row's request got its last token (set by _admit)


class Entry(NamedTuple):
  """Entering tokens after the prefix: state and the decision for recursion 1."""
  h_ExD: jax.Array
  limit_E: jax.Array
  gate_E: jax.Array
  go_E: jax.Array


def _io(eng: Engine, model, st: EngineState) -> EngineState:
  """The IO half of an engine step: retire, admit, route into recursion 1, write back."""
  io = _io_rows(eng, st)
  st, sampled_E = _retire(eng, model, st, io)
  st, io = _admit(eng, st, io, sampled_E)
  st, entry = _route(eng, model, st, io)
  return _write_rows(eng, st, io, entry)


def _io_rows(eng: Engine, st: EngineState) -> IORows:
  """Up to exit_rows slots: exiting ones first, then idle ones a queued request can fill."""
  sl, q = st.slots, st.queue
  idle_S = sl.stage_S == IDLE
  idle_rank_S = jnp.cumsum(idle_S) - 1
  want_S = jnp.where(sl.stage_S == EXIT, 0,
                     jnp.where(idle_S & (idle_rank_S < q.num - q.head), 1, 2))
  rows_E = jnp.argsort(want_S, stable=True)[:eng.exit_rows].astype(jnp.int32)
  valid_E = want_S[rows_E] < 2
  stage_E = sl.stage_S[rows_E]
  no_E = jnp.zeros_like(valid_E)
  return IORows(rows_E, valid_E, valid_E & (stage_E == EXIT), stage_E, sl.req_S[rows_E],
                sl.tok_S[rows_E], sl.pos_S[rows_E], sl.gen_S[rows_E], no_E, no_E)


def _retire(eng: Engine, model, st: EngineState, io: IORows) -> tuple[EngineState, jax.Array]:
  """Exiting rows: suffix blocks, LM head, sample; returns (state, sampled_E)."""
  sl, q = st.slots, st.queue
  x_ExD = sl.h_SxD[io.rows_E]
  if eng.kind == "tc":
    x_ExD = R.tc_output(sl.h1_SxD[io.rows_E], x_ExD, sl.gate_S[io.rows_E],
                        model.cfg.router.combine)
  x = x_ExD[:, None]
  suffix = list(st.suffix)
  for i, b in enumerate(eng.plan.suffix):
    x, suffix[i] = _block(model.blocks[b], x, io.pos_E, functools.partial(
        _attend_rows, pos_R=io.pos_E, st=suffix[i], rows_R=io.rows_E, write_R=io.exiting_E))
  key, sub = jax.random.split(st.key)
  logits_ExV = model.logits(x)[:, 0]
  sampled_E = sample(logits_ExV, sub, eng.temperature, eng.top_k)
  if q.logits_RxTxV is not None:
    num_req = q.prompt_len_R.shape[0]
    q = q._replace(logits_RxTxV=q.logits_RxTxV.at[
        jnp.where(io.exiting_E, jnp.maximum(io.req_E, 0), num_req), io.pos_E].set(
            logits_ExV, mode="drop"))
  return st._replace(suffix=suffix, queue=q, key=key), sampled_E


def _admit(eng: Engine, st: EngineState, io: IORows,
           sampled_E: jax.Array) -> tuple[EngineState, IORows]:
  """Each row's next token: the prompt's while prefilling, else the sample (emitted);
  a finished or idle row takes the next queued request, whose caches start empty."""
  q = st.queue
  num_req = q.prompt_len_R.shape[0]
  req_c = jnp.maximum(io.req_E, 0)
  in_prompt_E = io.pos_E + 1 < q.prompt_len_R[req_c]
  emit_E = io.exiting_E & ~in_prompt_E
  out = q.out_RxG.at[jnp.where(emit_E, req_c, num_req), io.gen_E].set(sampled_E, mode="drop")
  gen_E = io.gen_E + emit_E
  finished_E = emit_E & (gen_E >= q.max_new_R[req_c])
  prompt_next_E = q.prompts_RxP[req_c, jnp.minimum(io.pos_E + 1, q.prompts_RxP.shape[1] - 1)]
  next_tok_E = jnp.where(in_prompt_E, prompt_next_E, sampled_E)
  need_E = io.valid_E & (finished_E | (io.stage_E == IDLE))
  new_req_E = q.head + jnp.cumsum(need_E) - 1
  admit_E = need_E & (new_req_E < q.num)
  head = q.head + jnp.sum(admit_E, dtype=jnp.int32)
  new_c = jnp.minimum(new_req_E, num_req - 1)
  io = io._replace(req_E=jnp.where(admit_E, new_req_E, jnp.where(finished_E, -1, io.req_E)),
                   tok_E=jnp.where(admit_E, q.prompts_RxP[new_c, 0], next_tok_E),
                   pos_E=jnp.where(admit_E, 0, io.pos_E + 1),
                   gen_E=jnp.where(admit_E, 0, gen_E),
                   enter_E=admit_E | (io.exiting_E & ~finished_E), finished_E=finished_E)
  reset = jnp.where(admit_E, io.rows_E, eng.num_slots)
  prefix, unit, suffix = _reset_rows((list(st.prefix), list(st.unit), list(st.suffix)), reset)
  return st._replace(prefix=prefix, unit=unit, suffix=suffix,
                     queue=q._replace(out_RxG=out, head=head)), io


def _route(eng: Engine, model, st: EngineState, io: IORows) -> tuple[EngineState, Entry]:
  """Entering tokens: embedding, prefix blocks, and the decision and gate of recursion 1."""
  e = eng.exit_rows
  x = model.embed_tokens(io.tok_E[:, None])
  prefix = list(st.prefix)
  for i, b in enumerate(eng.plan.prefix):
    x, prefix[i] = _block(model.blocks[b], x, io.pos_E, functools.partial(
        _attend_rows, pos_R=io.pos_E, st=prefix[i], rows_R=io.rows_E, write_R=io.enter_E))
  h_ExD = x[:, 0]
  limit_E = jnp.full((e,), eng.n, jnp.int32)
  gate_E = jnp.zeros((e,), jnp.float32)
  if eng.kind == "tc":
    tc = model.router(x)
    limit_E, gate_E = tc.depth_BxS[:, 0], tc.gate_BxS[:, 0]
  if eng.forced is not None:
    limit_E = jnp.minimum(_forced_limit(eng, io.pos_E, io.req_E), eng.n)
  go_E, ec_gate_E = _decide(eng, model, jnp.zeros((e,), jnp.int32), limit_E, h_ExD)
  if ec_gate_E is not None:
    gate_E = ec_gate_E
  return st._replace(prefix=prefix), Entry(h_ExD, limit_E, gate_E, go_E)


def _write_rows(eng: Engine, st: EngineState, io: IORows, entry: Entry) -> EngineState:
  """Scatters the IO rows back into the slots: entering tokens take their new state."""
  sl, s = st.slots, eng.num_slots
  # With sharing, recursion 1 runs for every token: its keys serve every depth.
  run_E = entry.go_E | eng.share
  stage_E = jnp.where(io.enter_E, jnp.where(run_E, RECUR, EXIT),
                      jnp.where(io.finished_E | (io.stage_E == IDLE), IDLE, io.stage_E))
  put_rows = jnp.where(io.valid_E, io.rows_E, s)

  def put(x_S, v_E):
    return x_S.at[put_rows].set(v_E.astype(x_S.dtype), mode="drop")

  def enter(x_S, new_E):   # entering rows take the new value, the others keep theirs
    old_E = x_S[io.rows_E]
    return put(x_S, jnp.where(io.enter_E[:, None] if new_E.ndim == 2 else io.enter_E, new_E,
                              old_E))

  slots = Slots(put(sl.req_S, io.req_E), put(sl.tok_S, io.tok_E), put(sl.pos_S, io.pos_E),
                put(sl.gen_S, io.gen_E), put(sl.stage_S, stage_E),
                enter(sl.depth_S, jnp.zeros_like(io.pos_E)), enter(sl.limit_S, entry.limit_E),
                enter(sl.upd_S, entry.go_E), enter(sl.gate_S, entry.gate_E),
                enter(sl.h_SxD, entry.h_ExD), enter(sl.h1_SxD, entry.h_ExD))
  counters = st.counters.at[2].add(jnp.sum(io.valid_E, dtype=jnp.int32)).at[3].add(
      jnp.sum(io.exiting_E, dtype=jnp.int32))
  return st._replace(slots=slots, counters=counters)


def _step_depths(eng: Engine, model, st: EngineState) -> EngineState:
  """The shared unit once over all slots, each at its own depth; then each slot's next decision."""
  sl = st.slots
  run_S = sl.stage_S == RECUR
  d_S = sl.depth_S
  x = sl.h_SxD[:, None]
  unit = list(st.unit)
  if eng.share:   # one cache, written at depth 1 only, read by every depth
    write_S, seg = run_S & (d_S == 0), None
  else:
    write_S, seg = run_S, ((eng, d_S) if len(eng.seg_sizes) > 1 else None)
  for j, b in enumerate(eng.plan.unit):
    x, unit[j] = _block(model.blocks[b], x, sl.pos_S, functools.partial(
        _attend_rows, pos_R=sl.pos_S, st=unit[j], rows_R=None, write_R=write_S, seg=seg))
  out_SxD = x[:, 0]
  upd_S = run_S & sl.upd_S
  if eng.kind == "ec":
    inc = R.combine_increment(sl.h_SxD, out_SxD, sl.gate_S, model.cfg.router.combine)
    h_SxD = sl.h_SxD + jnp.where(upd_S[:, None], inc, 0)
  else:
    h_SxD = jnp.where(upd_S[:, None], out_SxD, sl.h_SxD)
  d_S = d_S + upd_S
  go_S, gate_S = _decide(eng, model, d_S, sl.limit_S, h_SxD)
  go_S &= upd_S
  stage_S = jnp.where(run_S, jnp.where(go_S, RECUR, EXIT), sl.stage_S)
  gate_S = sl.gate_S if gate_S is None else jnp.where(run_S, gate_S, sl.gate_S)
  slots = sl._replace(stage_S=stage_S, depth_S=d_S, upd_S=jnp.where(run_S, go_S, sl.upd_S),
                      gate_S=gate_S, h_SxD=h_SxD)
  counters = st.counters.at[0].add(1).at[1].add(jnp.sum(run_S, dtype=jnp.int32))
  return st._replace(slots=slots, unit=unit, counters=counters)


def _run_chunk(eng: Engine, params, st: EngineState):
  """Up to eng.steps_per_call engine steps, stopping early once every request is served."""
  model = nnx.merge(eng.graphdef, params)

  def done(st):
    return (st.queue.head >= st.queue.num) & jnp.all(st.slots.req_S < 0)

  def body(carry):
    i, st = carry
    return i + 1, _step_depths(eng, model, _io(eng, model, st))

  _, st = jax.lax.while_loop(lambda c: (c[0] < eng.steps_per_call) & ~done(c[1]), body,
                             (jnp.int32(0), st))
  return st, done(st)
