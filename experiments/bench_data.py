"""Input-pipeline benchmark: python -m experiments.bench_data [--config configs/mor_ec_tiny.py].

Prints JSON: tokens/s of the grain training stream (on the config's corpus, one
process), its start-up and restore times, and the train step's tokens/s for the
same config measured in the same run; `step_over_data_time` above 1 means the
pipeline keeps ahead of the step (it runs while the device computes).
"""
import argparse
import json
import runpy


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mor_ec_tiny.py")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--repeats", type=int, default=5, help="timed train steps")
  p.add_argument("--no_step", action="store_true", help="skip timing the train step")
  args = p.parse_args()
  from mor import bench, config
  from mor.data.pipeline import measure_throughput

  cfg = config.from_dict(runpy.run_path(args.config)["get_config"]())
  out = {"config": args.config,
         **measure_throughput(cfg.data, cfg.model.vocab_size, args.batches)}
  if not args.no_step:
    step = bench.bench_train_step(cfg, args.repeats)
    out.update(step_time_s=step["step_time_s"], step_tokens_per_s=step["tokens_per_s"],
               step_over_data_time=step["step_time_s"] / out["data_batch_time_s"])
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
