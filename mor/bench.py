"""Timing helpers shared by the benchmarks in experiments/ (they print JSON)."""
from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np

from mor import flops, metrics, presets, sharding, train
from mor.config import Config, ModelConfig, RouterConfig


def compiled_stats(fn, *args) -> dict:
  """Compiler FLOPs and memory (arguments + outputs + temporaries) of jit(fn)(*args)."""
  compiled = fn.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
            mem.alias_size_in_bytes)
  return {"flops_compiler": float(cost.get("flops", 0.0)), "peak_mem_bytes": peak}


def time_fn(fn, repeats: int) -> float:
  """Median wall time of fn() over repeats calls, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def time_interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
  """Wall times of each fn() over `rounds` interleaved rounds: {name: [seconds per round]}.

  Each fn is first called `warmup` times (the same call as timed, so the timed
  calls compile nothing); then every round calls each fn once, in turn, so a
  slow phase of a shared machine hits all variants alike. Report best and median.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return times


def best_and_median(times: list[float]) -> tuple[float, float]:
  ts = sorted(times)
  return ts[0], ts[len(ts) // 2]


def _median(xs: list[float]) -> float:
  return float(np.median(np.asarray(xs)))


def train_bench_config(name: str, *, vocab: int = 4096, num_heads: int = 4,
                       num_kv_heads: int = 2, ffn_dim: int = 0, remat: bool = False,
                       attention: str = "", **shape) -> Config:
  """presets.bench_config(name, **shape) with the vocabulary, heads, FFN width and attention set."""
  import dataclasses
  from mor import config as config_lib
  cfg = presets.bench_config(name, **shape)
  over = dict(vocab_size=vocab, num_heads=num_heads, num_kv_heads=num_kv_heads, remat=remat)
  if ffn_dim:
    over["ffn_dim"] = ffn_dim
  if attention:
    over["attention"] = attention
  model = dataclasses.replace(cfg.model, **over)
  return config_lib.validate(dataclasses.replace(cfg, model=model))


def train_step_inputs(cfg: Config, devices=None) -> tuple:
  """(train setup, initial state, a batch of random tokens) for timing or profiling a step."""
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  state = train.init_state(s)
  toks = jax.random.randint(jax.random.key(1), (cfg.data.batch_size, cfg.data.seq_len + 1), 0,
                            cfg.model.vocab_size)
  batch = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, s.batch_sharding)
  return s, state, batch


def prepare_train_step(cfg: Config, devices=None) -> tuple:
  """(step() -> loss, static record) for one train step of cfg on random tokens."""
  s, state, batch = train_step_inputs(cfg, devices)
  stats = compiled_stats(s.train_step, state, batch)
  holder = {"state": state}

  def step():
    holder["state"], m = s.train_step(holder["state"], batch)
    return m["loss"]

  rec = {"flops_analytic": flops.train_flops_per_step(cfg.model, cfg.data.seq_len,
                                                      cfg.data.batch_size, causal=False),
         "flops_analytic_causal": s.flops_per_step, **stats, "devices": s.mesh.devices.size}
  return step, rec


def bench_train_steps(cfgs: dict[str, Config], repeats: int = 5, devices=None,
                      peak_flops: float = 0.0, matmul_samples: int = 2) -> list[dict]:
  """Step time, tokens/s, FLOPs, memory and MFU of several train steps, timed interleaved.

  Each round times one step of every model, each followed by `matmul_samples`
  jitted f32 2048^3 matmuls, so the peak is measured beside each model's timing
  on the same (possibly busy) machine. MFU (causal model FLOPs) is against the
  median of those samples for each model, or against `peak_flops` (per device)
  when given; mfu_round_median is the median over rounds of each step against the
  matmul rate measured right after it. Step times are medians over `repeats`
  rounds after one warm-up (step_time_min_s: the least disturbed round).
  """
  prepared = {name: prepare_train_step(cfg, devices) for name, cfg in cfgs.items()}
  for step, _ in prepared.values():
    jax.block_until_ready(step())
  times = {name: [] for name in cfgs}
  rates = {name: [] for name in cfgs}
  for _ in range(repeats):
    for name, (step, _) in prepared.items():
      t = time.perf_counter()
      jax.block_until_ready(step())
      times[name].append(time.perf_counter() - t)
      rates[name].append(_median(metrics.matmul_flop_rate(repeats=matmul_samples)))
  records = []
  for name, cfg in cfgs.items():
    rec = prepared[name][1]
    dt = _median(times[name])
    ndev = rec["devices"]
    measured = _median(rates[name])          # whole host
    peak = peak_flops * ndev if peak_flops else measured
    tokens = cfg.data.batch_size * cfg.data.seq_len
    # each round's step against the matmul rate measured right after it: robust to a load
    # that changes during the run (the shared machine's usual state)
    paired = [rec["flops_analytic_causal"] / t / r for t, r in zip(times[name], rates[name])]
    records.append({"model": name, "step_time_s": dt, "step_time_min_s": min(times[name]),
                    "step_times_s": [round(t, 4) for t in times[name]],
                    "tokens_per_s": tokens / dt, **rec,
                    "mfu": rec["flops_analytic_causal"] / dt / peak,
                    "mfu_noncausal": rec["flops_analytic"] / dt / peak,
                    "mfu_round_median": _median(paired),
                    "peak_flops": peak, "peak_flops_measured": measured,
                    "peak_flops_pinned": bool(peak_flops)})
  return records


def bench_train_step(cfg: Config, repeats: int = 5, devices=None,
                     peak_flops: float = 0.0) -> dict:
  """bench_train_steps for one config (see there)."""
  rec = bench_train_steps({"model": cfg}, repeats, devices, peak_flops)[0]
  del rec["model"]
  return rec


UNIT = {2: 15, 3: 10, 4: 8}   # the paper's plans: 1 + B x N_r + 1 layers


def decode_config(kind: str, layers: int, n: int = 1, caps=(), *, d_model: int, num_heads: int,
                  num_kv_heads: int, vocab: int, max_len: int):
  """ModelConfig of a bench_decode model: middle-cycle sharing, FFN 3 x d_model."""
  return ModelConfig(kind=kind, vocab_size=vocab, num_layers=layers, d_model=d_model,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, ffn_dim=3 * d_model,
                     max_seq_len=max_len, num_recursions=n, sharing="middle_cycle",
                     router=RouterConfig(capacities=tuple(caps)))


def capacity_schedule(n: int, max_len: int) -> tuple[list[float], dict]:
  """Capacity fractions (N_r - r + 1) / N_r and the Engine kwargs that realise them exactly.

  A periodic forced depth schedule replaces the routers' decisions, and the per-depth
  caches are sized at the fractions (+2 entries: the schedule never overflows them).
  """
  caps = [(n - r) / n for r in range(n)]
  return caps, dict(forced_depths=tuple(range(n, 0, -1)),
                    slots=[min(1.0, c + 2.0 / max_len) for c in caps])


def decode_engine(n: int = 4, batch: int = 32, d_model: int = 192, num_heads: int = 6,
                  num_kv_heads: int = 2, vocab: int = 512, max_len: int = 128,
                  steps_per_call: int = 24, seed: int = 0):
  """(engine, state) of bench_decode's MoR row: the paper's N_r plan at the capacity schedule.

  6 x batch random 4-token requests queued and one call already advanced (slots
  full), for timing or profiling `eng._chunk_fn()`. steps_per_call 24: bench_decode's
  at N_r = 4 and its default --steps.
  """
  from mor.models import build_model
  from mor.serving import Engine
  if n not in UNIT:
    raise ValueError(f"decode_engine: num_recursions={n}; choose one of {sorted(UNIT)}")
  caps, kw = capacity_schedule(n, max_len)
  cfg = decode_config("mor", 2 + UNIT[n] * n, n, caps, d_model=d_model, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, vocab=vocab, max_len=max_len)
  eng = Engine(build_model(cfg, seed), batch, max_len, steps_per_call=steps_per_call, **kw)
  rng = np.random.default_rng(seed)
  for _ in range(6 * batch):
    eng.submit(rng.integers(0, vocab, 4), max_len - 4)
  st, _ = eng.advance(eng.start())
  return eng, st


def trained_mor(checkpoint: str = "", train_steps: int = 60, d_model: int = 192,
                workdir: str = ""):
  """(model, cfg, label, data) of a MoR whose routers were trained, for router-decided rows.

  checkpoint: a run directory (e.g. the README main job's runs/main). Otherwise a
  CPU-sized expert-choice MoR (1 + 2 x 3 + 1 layers, the main job's preset at
  d_model) trains for train_steps on the default corpus in a temporary workdir.
  data: the run's data (held-out text for prompts), or None when it cannot be rebuilt.
  """
  import tempfile

  from mor import analysis, config, train as train_lib
  if checkpoint:
    model, cfg, step = analysis.load_run(checkpoint)
    if cfg.model.kind != "mor":
      raise ValueError(f"--checkpoint {checkpoint}: model.kind={cfg.model.kind!r}; "
                       "router-decided rows need a MoR run")
    return model, cfg, f"checkpoint {checkpoint} step {step}", analysis.load_tokenizer(cfg)
  cfg = presets.tiny_config("mor", num_layers=8, num_recursions=3, d_model=d_model,
                           num_heads=max(1, d_model // 32), num_kv_heads=max(1, d_model // 96),
                           ffn_dim=3 * d_model)
  d = config.to_dict(cfg)
  d["train"].update(steps=train_steps, eval_every=0, log_every=max(1, train_steps),
                    checkpoint_every=0)
  cfg = config.from_dict(d)
  with tempfile.TemporaryDirectory() as tmp:
    out = train_lib.run(cfg, workdir or tmp)
    model = train_lib.model_from_state(out["setup"], out["state"])
  from mor.data import make_data
  return model, cfg, f"trained in-bench, {train_steps} steps", make_data(cfg.data,
                                                                         cfg.model.vocab_size)


def bench_decode(args) -> tuple[list[dict], dict]:
  """Decoding tokens/s, KV bytes and peak memory: vanilla, recursive and MoR in one run.

  `args` carries d_model, num_heads, num_kv_heads, vocab, batch, max_len,
  recursions ("2,3,4"), steps, rounds, no_vanilla_engine, checkpoint, train_steps
  and no_trained (see experiments/bench_decode.py). Every run is warmed up on
  its timed call, then timed in `rounds` interleaved rounds; records carry the
  best and the median round. Returns (records, timings).
  """
  t_start = time.perf_counter()
  runs = _decode_runs(args)                    # set up: build and compile every run
  build_s = time.perf_counter() - t_start
  # warm up (each run once on its timed call), then time in interleaved rounds
  times = time_interleaved({i: r["fn"] for i, r in enumerate(runs)}, args.rounds)
  records = [_decode_record(r, times[i]) for i, r in enumerate(runs)]
  _add_vanilla_ratios(records, args.batch)
  return records, {"setup_s": round(build_s, 1),
                   "total_s": round(time.perf_counter() - t_start, 1)}


def _decode_runs(args) -> list[dict]:
  """Every run of bench_decode, built and compiled: vanilla and recursive scans, engines."""
  recursions = [int(n) for n in args.recursions.split(",")]
  runs = _vanilla_runs(args, sorted({34} | {2 + UNIT[n] * n for n in recursions}))
  vanilla_kv = {r["layers"]: r["kv_bytes"] for r in runs if r["model"].startswith("vanilla")}
  for n in recursions:
    runs += _mor_runs(args, n, vanilla_kv[2 + UNIT[n] * n])
  if not args.no_trained:
    runs += _trained_runs(args)
  return runs


def _model_config(args, *a):
  return decode_config(*a, d_model=args.d_model, num_heads=args.num_heads,
                       num_kv_heads=args.num_kv_heads, vocab=args.vocab, max_len=args.max_len)


def _vanilla_runs(args, layer_counts) -> list[dict]:
  """Vanilla of each applied depth (scan, and engine unless no_vanilla_engine); recursive 34.

  The recursive model uses the N_r = 4 plan (34 layers): its vanilla is always built.
  """
  from mor.models import build_model
  runs, b = [], args.batch
  for layers in layer_counts:
    van = build_model(_model_config(args, "vanilla", layers), 0)
    fn, toks, kv, st = _plain(args, van, b)
    runs.append(dict(model=f"vanilla{layers}", num_recursions=1, layers=layers, batch=b,
                     path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv, **st))
    if not args.no_vanilla_engine:
      fn, holder, kv, st, _ = _served(args, van, b, 4)
      runs.append(dict(model=f"vanilla{layers}", num_recursions=1, layers=layers, batch=b,
                       path="engine", fn=fn, holder=holder, kv_bytes=kv, **st))
  rec = build_model(_model_config(args, "recursive", 34, 4), 0)
  fn, toks, kv, st = _plain(args, rec, b)
  runs.append(dict(model="recursive", num_recursions=4, layers=34, batch=b,
                   path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv, **st))
  return runs


def _mor_runs(args, n: int, vanilla_kv: int) -> list[dict]:
  """MoR-EC of N_r = n on the capacity schedule, at --batch and at vanilla's KV budget."""
  from mor.models import build_model
  from mor.serving import Engine
  layers = 2 + UNIT[n] * n
  caps, kw = capacity_schedule(n, args.max_len)
  mor = build_model(_model_config(args, "mor", layers, n, caps), 0)
  per_slot = Engine(mor, 1, args.max_len, **kw).kv_bytes()["total"]
  runs = []
  for batch in (args.batch, int(vanilla_kv // per_slot)):
    fn, holder, kv, st, _ = _served(args, mor, batch, n, **kw)
    runs.append(dict(model=f"mor_ec{n}", num_recursions=n, layers=layers, batch=batch,
                     path="engine", fn=fn, holder=holder, kv_bytes=kv,
                     compute_ratio=layers / (2 + UNIT[n] * sum(caps)), **st))
  return runs


def _trained_runs(args) -> list[dict]:
  """Router-decided depths: a MoR whose routers were trained, against its vanilla twin
  and against the same model driven by the capacity schedule."""
  import dataclasses

  from mor import routers as R
  from mor.models import build_model
  model, tcfg, label, data = trained_mor(args.checkpoint, args.train_steps, args.d_model)
  mc, n, applied = tcfg.model, tcfg.model.num_recursions, len(model.plan.applied)
  prompts = None
  if data is not None:   # prompts from held-out text: routers see real hidden states
    prompts = np.concatenate([b["inputs"] for b in data.eval_batches(2)])
  van = build_model(dataclasses.replace(mc, kind="vanilla", num_layers=applied,
                                        max_seq_len=max(mc.max_seq_len, args.max_len)), 0)
  fn, toks, kv, st = _plain(args, van, args.batch)
  runs = [dict(model=f"vanilla{applied}_twin", num_recursions=1, layers=applied,
               batch=args.batch, path="decode_step scan", fn=fn, tokens=toks, kv_bytes=kv,
               twin=True, **st)]
  caps = R.ec_fractions(mc)
  for depth_rule, kw in (("routers", {}),
                         ("capacity schedule", dict(forced_depths=tuple(range(n, 0, -1))))):
    fn, holder, kv, st, _ = _served(args, model, args.batch, n, prompts=prompts,
                                    temperature=1.0, **kw)
    runs.append(dict(model=f"mor_ec{n}_trained", num_recursions=n, layers=applied,
                     batch=args.batch, path="engine", fn=fn, holder=holder, kv_bytes=kv,
                     depths=depth_rule, source=label, twin=True,
                     unit_blocks=len(model.plan.unit), other_blocks=len(model.plan.prefix) +
                     len(model.plan.suffix), capacity_mean_depth=float(sum(caps)), **st))
  return runs


def _plain(args, model, batch: int):
  """Timed call, token count, KV bytes and compiled stats of `steps` jitted decode steps."""
  import jax.numpy as jnp
  from flax import nnx

  from mor import decode
  graphdef, state = nnx.split(model)

  def run(state, caches):
    m = nnx.merge(graphdef, state)

    def body(caches, t):
      logits, caches = decode.decode_step(m, jnp.zeros((batch,), jnp.int32),
                                          jnp.full((batch,), t, jnp.int32), caches)
      return caches, decode.sample(logits, None)
    return jax.lax.scan(body, caches, jnp.arange(args.steps))

  fn = jax.jit(run)
  caches = model.init_caches(batch, args.max_len)
  kv = sum(c.num_bytes for c in caches)
  stats = compiled_stats(fn, state, caches)
  return (lambda: fn(state, caches)), args.steps * batch, kv, stats


def _served(args, model, batch: int, n: int, prompts=None, **kw):
  """Timed engine advance over a request queue; tokens counted from the engine.

  prompts: token rows to draw 4-token prompts from (held-out text), else random ids.
  Returns (call, holder of per-call tokens and unit rows, KV bytes, compiled stats, engine).
  """
  from mor.serving import Engine
  t = args.max_len
  eng = Engine(model, batch, t, steps_per_call=max(8, int(args.steps * 34 / (2 + 8 * n))),
               **kw)
  rng = np.random.default_rng(0)
  vocab = model.cfg.vocab_size
  for i in range(6 * batch):          # far more work than the timed rounds need
    p = (rng.integers(0, vocab, 4) if prompts is None else
         prompts[i % len(prompts), (i // len(prompts)) % (prompts.shape[1] - 4):][:4])
    eng.submit(p, t - 4)
  holder = {"st": eng.start(), "tokens": [], "rows": []}
  stats = compiled_stats(eng._chunk_fn(), eng.params, holder["st"])
  holder["st"], _ = eng.advance(holder["st"])          # slots fill up before timing

  def call():
    before, rows = eng.stats["tokens_processed"], eng.stats["unit_rows"]
    holder["st"], _ = eng.advance(holder["st"])
    holder["tokens"].append(eng.stats["tokens_processed"] - before)
    holder["rows"].append(eng.stats["unit_rows"] - rows)
    return holder["st"].counters
  return call, holder, eng.kv_bytes()["total"], stats, eng


def _decode_record(r: dict, times: list[float]) -> dict:
  """One run's record: best and median tokens/s over its timed rounds (and realised depths)."""
  if "holder" in r:   # the warm-up call's tokens come first
    toks = r["holder"]["tokens"][-len(times):]
  else:
    toks = [r["tokens"]] * len(times)
  rates = sorted(t / max(k, 1) for t, k in zip(times, toks))
  rec = {k: r[k] for k in ("model", "num_recursions", "layers", "batch", "path",
                           "kv_bytes", "peak_mem_bytes") if k in r}
  rec["tokens_per_s"] = 1.0 / rates[0]
  rec["tokens_per_s_median"] = 1.0 / rates[len(rates) // 2]
  rec["rounds"] = len(rates)
  if "compute_ratio" in r:
    rec["compute_ratio"] = r["compute_ratio"]
  if "depths" in r:   # realised depths: unit rows per token over the timed calls
    mean_depth = sum(r["holder"]["rows"][-len(times):]) / max(1, sum(toks))
    rec.update(depths=r["depths"], source=r["source"], mean_depth=mean_depth,
               capacity_mean_depth=r["capacity_mean_depth"],
               compute_ratio=r["layers"] / (r["other_blocks"] + r["unit_blocks"] * mean_depth))
  return rec


def _add_vanilla_ratios(records: list[dict], batch: int) -> None:
  """Throughput and KV bytes of each record against its vanilla (twin) at --batch."""
  for rec in records:
    twin = "_trained" in rec["model"] or rec["model"].endswith("_twin")
    name = f"vanilla{rec['layers']}" + ("_twin" if twin else "")
    base = max(x["tokens_per_s"] for x in records if x["model"] == name and x["batch"] == batch)
    rec["ratio_to_vanilla"] = rec["tokens_per_s"] / base
    vkv = next(x["kv_bytes"] for x in records if x["model"] == name and x["batch"] == batch)
    rec["kv_ratio_to_vanilla"] = rec["kv_bytes"] / vkv * batch / rec["batch"]
    if "compute_ratio" in rec:
      rec["fraction_of_compute_ratio"] = rec["ratio_to_vanilla"] / rec["compute_ratio"]


def bench_offload(model, prompt_BxS: jax.Array, num_new: int, *, cache_size: int,
                  quant: str = "none", variants=None, rounds: int = 3,
                  temperature: float = 1.0, link_bytes_per_s: float = 0.0,
                  seed: int = 0) -> list[dict]:
  """Tokens/s of each variant decoding the same prompt and the same sampled tokens.

  Every engine first decodes exactly the timed shapes once (compilation, caches
  of the jitted pieces); then `rounds` rounds each time every variant once, in
  turn, and the records report the best and the median round. Hits, misses,
  bytes and recall are counts of one decode (identical in every round).
  """
  from mor.offload import VARIANTS, OffloadEngine, echo_fraction, variant_options
  variants = tuple(variants or VARIANTS)
  engines = {v: OffloadEngine(model, quant=quant, link_bytes_per_s=link_bytes_per_s,
                              **variant_options(v, cache_size)) for v in variants}
  out = {}

  def runner(v):
    def run():
      engines[v].reset()
      out[v] = engines[v].decode(prompt_BxS, num_new, temperature=temperature, seed=seed)[1]
    return run

  times = time_interleaved({v: runner(v) for v in variants}, rounds)
  tokens = prompt_BxS.shape[0] * (prompt_BxS.shape[1] + num_new - 1)
  records = []
  for v in variants:
    ts = sorted(times[v])
    summary = engines[v].summary()
    summary.pop("tokens_per_s")
    records.append({"variant": v, "quant": quant, "rounds": len(ts),
                    "tokens_per_s_best": tokens / ts[0],
                    "tokens_per_s_median": tokens / ts[len(ts) // 2],
                    "echo_fraction": echo_fraction(prompt_BxS, out[v]),
                    "same_tokens_as_first": bool(np.array_equal(out[v], out[variants[0]])),
                    "link_bytes_per_s": link_bytes_per_s, **summary})
  return records
