"""Offloaded MoE decoding ablation: full, no_prefetch, no_cache, naive; prints JSON records.

python -m experiments.bench_offload [--quant none,int8,int4] [--cache_size 4] [--tokens 32]
    [--rounds 3] [--temperature 1.0] [--link_gbps 0,4]

Fair by construction: every variant decodes the same prompt and samples the same
tokens (same key); each engine first decodes exactly the timed shapes once, then
the variants are timed in --rounds interleaved rounds (best and median reported).
The model has an untied head and O(1) initialisation, and generation samples
(T = --temperature), so it does not echo its input (an echoing model repeats its
experts and inflates LRU hit rates); `echo_fraction` reports it. Hits, misses,
bytes and prefetch loads are counts per decode (on CPU, "device" memory is host
memory: counts, not transfer times). --link_gbps > 0 simulates a host-device link
of that many GB/s (a sleep per copy), under which the background prefetch can
hide copies behind compute; 0 measures this CPU as it is.
"""
import argparse
import json

import jax

from mor.config import MoEConfig
from mor.presets import tiny_model
from mor.models import build_model
from mor.bench import bench_offload
from mor.offload import VARIANTS


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quant", default="none,int8,int4", help="comma list of none|int8|int4")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--cache_size", type=int, default=4, help="experts resident per layer")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--expert_ffn", type=int, default=512)
  p.add_argument("--prompt", type=int, default=8)
  p.add_argument("--tokens", type=int, default=32, help="tokens generated after the prompt")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--link_gbps", default="0", help="comma list; 0 = no simulated link")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if a.rounds < 1:
    raise SystemExit("--rounds must be at least 1")
  cfg = tiny_model(kind="moe", num_layers=a.layers, d_model=a.d_model, num_heads=4,
                   num_kv_heads=2, ffn_dim=a.expert_ffn, vocab_size=512,
                   max_seq_len=a.prompt + a.tokens, tie_embeddings=False,
                   init_std=a.d_model ** -0.5,
                   moe=MoEConfig(num_experts=a.experts, top_k=a.top_k, router="top2",
                                 dropless=True))
  model = build_model(cfg, a.seed)
  prompt = jax.random.randint(jax.random.key(a.seed), (1, a.prompt), 0, cfg.vocab_size)
  records = []
  for gbps in (float(x) for x in a.link_gbps.split(",")):
    for quant in a.quant.split(","):
      records += bench_offload(model, prompt, a.tokens, cache_size=a.cache_size, quant=quant,
                               variants=a.variants.split(","), rounds=a.rounds,
                               temperature=a.temperature, link_bytes_per_s=gbps * 1e9,
                               seed=a.seed)
  for r in records:
    r["device"] = jax.devices()[0].platform
    r["counts_note"] = "hits/misses/bytes are counts per decode; on CPU no real transfer"
  print(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
