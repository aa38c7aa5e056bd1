"""CPU-sized MoE baseline: top-2 of 4 experts of half the FFN width in every other layer.

Active expert FFN per token = 2 x ffn/2 = the dense FFN, so training FLOPs per
token match vanilla_tiny (plus the small router).
"""
from mor.config import MoEConfig, as_config_dict
from mor.presets import tiny_config


def get_config():
  return as_config_dict(tiny_config("moe", moe=MoEConfig(num_experts=4, router="top2", top_k=2,
                                                         every=2, expert_ffn_dim=384)))
