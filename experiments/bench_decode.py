"""Decoding benchmark: python -m experiments.bench_decode [--d_model 128] [--batch 32] ...

Prints a JSON list of records (model, num_recursions, batch, tokens_per_s, kv_bytes,
peak_mem_bytes, ratio_to_vanilla, ...) for vanilla Transformers, a plain
recursive one and MoR expert-choice with N_r = 2, 3, 4, measured in one run.

Plans are the paper's (REFERENCE.md section 1) at a CPU-sized width (default
d_model 192, 6 heads over 2 KV heads as the paper's 15 over 5, FFN 3 d, vocab
512, cache length 128): N_r = 2 and 3 use 32 applied layers (1 + 15 x 2 + 1,
1 + 10 x 3 + 1), N_r = 4 uses 34 (1 + 8 x 4 + 1); each MoR model is compared
with a vanilla model of the same applied layers. compute_ratio is the ratio of
applied layers per token, e.g. 34 / (2 + 8 x 2.5) = 1.55 for N_r = 4. Capacities (N_r - r + 1) / N_r; the untrained routers are
replaced by a deterministic depth schedule with exactly those fractions
(`Engine(forced_depths=...)`, period N_r, phase shifted per request); the
routers and gates are still computed. MoR's per-depth caches are allocated at
the capacity fractions, so its KV bytes really are smaller.

What is measured: steady-state decoding throughput, tokens through the whole
model per second (KV-cache writes, routers, sampling, and for MoR all engine
bookkeeping included; prefill excluded: the caches have static shapes, so a
decoding step costs the same at every fill level). Vanilla and recursive run
`mor.decode.decode_step` in a jitted scan (the `generate` path); vanilla also
runs through the engine (a single recursion), and ratios use the faster
vanilla. MoR runs the continuous depth-wise batching engine (`mor.serving`)
over a queue of requests. Each model is timed in `--rounds` interleaved rounds
and the best round counts (the CPU is shared; the best round is the least
disturbed). Batches: the fixed --batch, and for MoR the largest batch whose KV
cache fits the vanilla model's KV bytes at --batch.
"""
import argparse
import json
import math
import os
import sys
import time


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d_model", type=int, default=192)
  p.add_argument("--num_heads", type=int, default=6)
  p.add_argument("--num_kv_heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--max_len", type=int, default=128, help="cache length (prompt + new)")
  p.add_argument("--recursions", default="2,3,4")
  p.add_argument("--steps", type=int, default=24, help="vanilla decoding steps per round")
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--no_vanilla_engine", action="store_true")
  return p.parse_args()


UNIT = {2: 15, 3: 10, 4: 8}   # the paper's plans: 1 + B x N_r + 1 layers


def main():
  args = parse()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mor import bench, decode
  from mor.config import ModelConfig, RouterConfig
  from mor.models import build_model
  from mor.serving import Engine

  t_start = time.perf_counter()
  T, B = args.max_len, args.batch

  def cfg(kind, layers, n=1, caps=()):
    return ModelConfig(kind=kind, vocab_size=args.vocab, num_layers=layers,
                       d_model=args.d_model, num_heads=args.num_heads,
                       num_kv_heads=args.num_kv_heads, ffn_dim=3 * args.d_model,
                       max_seq_len=T, num_recursions=n, sharing="middle_cycle",
                       router=RouterConfig(capacities=tuple(caps)))

  def plain(model, batch):
    """Timed call, compiled stats and KV bytes of `steps` jitted decode steps."""
    graphdef, state = nnx.split(model)

    def run(state, caches):
      m = nnx.merge(graphdef, state)
      def body(caches, t):
        logits, caches = decode.decode_step(m, jnp.zeros((batch,), jnp.int32),
                                            jnp.full((batch,), t, jnp.int32), caches)
        return caches, decode.sample(logits, None)
      return jax.lax.scan(body, caches, jnp.arange(args.steps))

    fn = jax.jit(run)
    caches = model.init_caches(batch, T)
    kv = sum(c.num_bytes for c in caches)
    stats = bench.compiled_stats(fn, state, caches)
    return (lambda: fn(state, caches)), args.steps * batch, kv, stats

  def served(model, batch, n, **kw):
    """Timed engine advance over a request queue; tokens counted from the engine."""
    eng = Engine(model, batch, T, steps_per_call=max(8, int(args.steps * 34 / (2 + 8 * n))),
                 **kw)
    rng = np.random.default_rng(0)
    for _ in range(6 * batch):          # far more work than the timed rounds need
      eng.submit(rng.integers(0, args.vocab, 4), T - 4)
    holder = {"st": eng.start()}
    stats = bench.compiled_stats(eng._chunk_fn(), eng.params, holder["st"])
    holder["st"], _ = eng.advance(holder["st"])          # warm-up: slots fill up

    def call():
      before = eng.stats["tokens_processed"]
      holder["st"], _ = eng.advance(holder["st"])
      holder["tokens"] = eng.stats["tokens_processed"] - before
      return holder["st"].counters
    return call, holder, eng.kv_bytes()["total"], stats, eng

  # ---- build every run, then time them in interleaved rounds.
  runs = []
  for layers in sorted({2 + UNIT[n] * n for n in map(int, args.recursions.split(","))}):
    van = build_model(cfg("vanilla", layers), 0)
    fn, toks, kv, st = plain(van, B)
    runs.append(dict(model=f"vanilla{layers}", num_recursions=1, layers=layers, batch=B,
                     path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv, **st))
    if not args.no_vanilla_engine:
      fn, holder, kv, st, eng = served(van, B, 4)
      runs.append(dict(model=f"vanilla{layers}", num_recursions=1, layers=layers, batch=B,
                       path="engine", fn=fn, holder=holder, kv_bytes=kv, **st))
  rec = build_model(cfg("recursive", 34, 4), 0)
  fn, toks, kv, st = plain(rec, B)
  runs.append(dict(model="recursive", num_recursions=4, layers=34, batch=B,
                   path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv, **st))
  vanilla_kv = {r["layers"]: r["kv_bytes"] for r in runs if r["model"].startswith("vanilla")}
  for n in map(int, args.recursions.split(",")):
    layers = 2 + UNIT[n] * n
    caps = [(n - r) / n for r in range(n)]
    mor = build_model(cfg("mor", layers, n, caps), 0)
    kw = dict(forced_depths=tuple(range(n, 0, -1)),
              slots=[min(1.0, c + 2.0 / T) for c in caps])   # the schedule never overflows
    per_slot = Engine(mor, 1, T, **kw).kv_bytes()["total"]
    budget = int(vanilla_kv[layers] // per_slot)
    for batch in (B, budget):
      fn, holder, kv, st, eng = served(mor, batch, n, **kw)
      runs.append(dict(model=f"mor_ec{n}", num_recursions=n, layers=layers, batch=batch,
                       path="engine", fn=fn, holder=holder, kv_bytes=kv,
                       compute_ratio=layers / (2 + UNIT[n] * sum(caps)), **st))
  build_s = time.perf_counter() - t_start

  best = [math.inf] * len(runs)
  for _ in range(args.rounds):
    for i, r in enumerate(runs):
      t = time.perf_counter()
      jax.block_until_ready(r["fn"]())
      dt = time.perf_counter() - t
      toks = r["holder"]["tokens"] if "holder" in r else r["tokens"]
      best[i] = min(best[i], dt / toks)

  records = []
  for r, s_per_tok in zip(runs, best):
    rec = {k: r[k] for k in ("model", "num_recursions", "layers", "batch", "path",
                             "kv_bytes", "peak_mem_bytes")}
    rec["tokens_per_s"] = 1.0 / s_per_tok
    if "compute_ratio" in r:
      rec["compute_ratio"] = r["compute_ratio"]
    records.append(rec)
  for rec in records:
    base = max(x["tokens_per_s"] for x in records
               if x["model"] == f"vanilla{rec['layers']}" and x["batch"] == B)
    rec["ratio_to_vanilla"] = rec["tokens_per_s"] / base
    rec["kv_ratio_to_vanilla"] = rec["kv_bytes"] / vanilla_kv[rec["layers"]] * B / rec["batch"]
    if "compute_ratio" in rec:
      rec["fraction_of_compute_ratio"] = rec["ratio_to_vanilla"] / rec["compute_ratio"]
  print(json.dumps(records, indent=1))
  print(json.dumps({"setup_s": round(build_s, 1),
                    "total_s": round(time.perf_counter() - t_start, 1)}), file=sys.stderr)


if __name__ == "__main__":
  main()
