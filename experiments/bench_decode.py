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
over a queue of requests. Every run is first called once on exactly its timed
shapes (compilation excluded), then all runs are timed in `--rounds` interleaved
rounds; `tokens_per_s` is the best round (the CPU is shared; the best round is
the least disturbed) and `tokens_per_s_median` the median. Batches: the fixed
--batch, and for MoR the largest batch whose KV cache fits the vanilla model's
KV bytes at --batch.

Router-decided rows (`mor_ec3_trained`, `depths: routers`): a MoR whose routers
were trained decides every token's depth itself. `--checkpoint DIR` loads a run
(e.g. the README main job's runs/main); by default a CPU-sized expert-choice MoR
(1 + 2 x 3 + 1 layers at --d_model) trains for --train_steps on the default
corpus first. Prompts come from held-out text and generation samples (T = 1).
The same model also runs under the capacity schedule (`depths: capacity
schedule`), and both are compared with a vanilla twin of its applied layers;
`mean_depth` is the realised recursions per token and `compute_ratio` follows
from it. `--no_trained` skips these rows.
"""
import argparse
import json
import os
import sys


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
  p.add_argument("--checkpoint", default="", help="MoR run dir for router-decided rows")
  p.add_argument("--train_steps", type=int, default=60,
                 help="in-bench training of the router-decided MoR (without --checkpoint)")
  p.add_argument("--no_trained", action="store_true", help="skip the router-decided rows")
  return p.parse_args()


def main():
  args = parse()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mor.bench import bench_decode

  records, timings = bench_decode(args)
  print(json.dumps(records, indent=1))
  print(json.dumps(timings), file=sys.stderr)


if __name__ == "__main__":
  main()
