"""Train-step benchmark: python -m experiments.bench_train [--seq_len 512] [--devices 8].

Prints a JSON list of records (model, step_time_s, tokens_per_s, flops_analytic,
flops_compiler, peak_mem_bytes, ...) for vanilla, recursive and MoR (expert- and
token-choice) of equal shape, measured in one run, plus ratios to recursive.
--devices N runs on N fake CPU devices (data-parallel mesh).
"""
import argparse
import json
import os
import sys


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="vanilla,recursive,mor_ec,mor_tc")
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--num_layers", type=int, default=8)
  p.add_argument("--num_recursions", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: as found)")
  return p.parse_args()


def main():
  args = parse()
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mor import bench, config

  records = []
  for name in args.models.split(","):
    cfg = config.bench_config(name, seq_len=args.seq_len, batch=args.batch,
                              d_model=args.d_model, num_layers=args.num_layers,
                              num_recursions=args.num_recursions, dtype=args.dtype)
    rec = {"model": name, "seq_len": args.seq_len, "batch": args.batch,
           **bench.bench_train_step(cfg, args.repeats)}
    records.append(rec)
    print(json.dumps(rec), file=sys.stderr, flush=True)
  base = next((r for r in records if r["model"] == "recursive"), None)
  if base:
    for r in records:
      r["time_ratio_to_recursive"] = r["step_time_s"] / base["step_time_s"]
      r["flop_ratio_to_recursive"] = r["flops_analytic"] / base["flops_analytic"]
      r["compiler_flop_ratio_to_recursive"] = r["flops_compiler"] / base["flops_compiler"]
  print(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
