"""Offloaded MoE decoding ablation: full, no_prefetch, no_cache, naive; prints JSON records.

python -m experiments.bench_offload [--quant none,int8,int4] [--cache_size 4] [--tokens 32]
"""
import argparse
import json

import jax

from mor.config import MoEConfig, tiny_model
from mor.models import build_model
from mor.offload import VARIANTS, benchmark


def main():
  p = argparse.ArgumentParser(description=__doc__)
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
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  cfg = tiny_model(kind="moe", num_layers=a.layers, d_model=a.d_model, num_heads=4,
                   num_kv_heads=2, ffn_dim=a.expert_ffn, vocab_size=512,
                   max_seq_len=a.prompt + a.tokens,
                   moe=MoEConfig(num_experts=a.experts, top_k=a.top_k, router="top2",
                                 dropless=True))
  model = build_model(cfg, a.seed)
  prompt = jax.random.randint(jax.random.key(a.seed), (1, a.prompt), 0, cfg.vocab_size)
  records = []
  for quant in a.quant.split(","):
    records += benchmark(model, prompt, a.tokens, cache_size=a.cache_size, quant=quant,
                         variants=a.variants.split(","))
  for r in records:
    r["device"] = jax.devices()[0].platform
  print(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
