"""Where a step's time goes: python -m experiments.profile_step --model mor_ec [--decode 4] [...].

Runs the jitted train step of one bench_train model (or, with --decode N_r,
calls of the MoR serving engine at bench_decode's defaults: d 192, 6 / 2 KV
heads, vocab 512, cache 128, --decode_batch slots, times per engine step)
under jax.profiler and prints JSON: the time attributed to each source line of
`mor` (forward and backward separately) and the largest HLO ops, each with the
part of its time during which nothing else ran (see mor.profiling for how
concurrent thunks are shared). Train shapes and flags as bench_train;
--trace_dir keeps the trace for TensorBoard / xprof.
The issue-12 shape: --vocab 8192 --num_heads 8 --num_kv_heads 4 --batch 8.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import train_shape  # noqa: E402  (also when run as a script)


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="mor_ec", help="vanilla, recursive, mor_ec or mor_tc")
  train_shape.add_flags(p)
  p.add_argument("--repeats", type=int, default=3, help="profiled steps")
  p.add_argument("--top", type=int, default=25, help="rows of each table")
  p.add_argument("--trace_dir", default="", help="keep the trace here")
  p.add_argument("--decode", type=int, default=0,
                 help="N_r: profile the MoR serving engine instead (bench_decode's shape)")
  p.add_argument("--decode_batch", type=int, default=32, help="engine slots with --decode")
  return p.parse_args()


def main():
  args = parse()
  import time

  import jax

  from mor import bench, profiling

  if args.decode:
    eng, st = bench.decode_engine(args.decode, batch=args.decode_batch)
    # per engine step: one call runs steps_per_call steps
    fn, inputs, per = eng._chunk_fn(), (eng.params, st), eng.steps_per_call
    feed = lambda a, o: (a[0], o[0])
  else:
    cfg = train_shape.config(args.model, args)
    s, state, batch = bench.train_step_inputs(cfg)
    # the jitted program itself (AOT-compiled by profile), with this run's schedule numbers
    fn, inputs, per = s.train_step.program, (state, batch, s.train_step.schedule), 1
    feed = lambda a, o: (o[0], *a[1:])
  t = time.perf_counter()
  ops = profiling.profile(fn, *inputs, repeats=args.repeats, trace_dir=args.trace_dir or None,
                          feed=feed)
  ops = [o._replace(ms=o.ms / per, alone_ms=o.alone_ms / per, count=o.count / per)
         for o in ops]
  wall = time.perf_counter() - t
  print(json.dumps({
      "model": f"mor_ec{args.decode} engine" if args.decode else args.model,
      "profiled_calls": args.repeats, "engine_steps_per_call": per if args.decode else None,
      "attributed_ms_per_step": round(sum(o.ms for o in ops), 3),
      "wall_s_with_compile": round(wall, 1),
      "by_source": [{"source": src, "pass": p, "ms": ms, "alone_ms": alone}
                    for src, p, ms, alone in profiling.by_source(ops)[:args.top]],
      "top_ops": [dict(op=o.op, ms=round(o.ms, 3), alone_ms=round(o.alone_ms, 3),
                       count=o.count, source=o.source, backward=o.backward)
                  for o in ops[:args.top]],
  }, indent=1))


if __name__ == "__main__":
  main()
