"""Train-step benchmark: python -m experiments.bench_train [--vocab 8192 --num_heads 8 ...].

Prints a JSON list of records (model, step_time_s, tokens_per_s, flops_analytic,
flops_compiler, peak_mem_bytes, mfu, peak_flops, ...) for vanilla, recursive and
MoR (expert- and token-choice) of equal shape, timed in interleaved rounds in
one run with a jitted f32 matmul beside each step (the same-run peak that MFU
uses; --peak_flops pins it), plus ratios to recursive.
--devices N runs on N fake CPU devices (data-parallel mesh).
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
  p.add_argument("--models", default="vanilla,recursive,mor_ec,mor_tc")
  train_shape.add_flags(p)
  p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
  p.add_argument("--peak_flops", type=float, default=0.0,
                 help="pin the per-device peak FLOP/s for MFU (0: measure beside each step)")
  p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: as found)")
  return p.parse_args()


def main():
  args = parse()
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  from mor import bench

  cfgs = {name: train_shape.config(name, args) for name in args.models.split(",")}
  load = os.getloadavg()
  records = bench.bench_train_steps(cfgs, args.repeats, peak_flops=args.peak_flops)
  for r in records:
    r.update(seq_len=args.seq_len, batch=args.batch, vocab=args.vocab,
             load_avg_before=round(load[0], 2), load_avg_after=round(os.getloadavg()[0], 2))
  base = next((r for r in records if r["model"] == "recursive"), None)
  if base:
    for r in records:
      r["time_ratio_to_recursive"] = r["step_time_s"] / base["step_time_s"]
      r["flop_ratio_to_recursive"] = r["flops_analytic"] / base["flops_analytic"]
      r["compiler_flop_ratio_to_recursive"] = r["flops_compiler"] / base["flops_compiler"]
  print(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
