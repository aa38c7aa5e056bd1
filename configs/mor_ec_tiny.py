"""CPU-sized MoR, expert-choice routing, N_r = 3, recursive KV caching (the README's main job)."""
from mor.config import RouterConfig, as_config_dict
from mor.presets import tiny_config


def get_config():
  return as_config_dict(tiny_config("mor", num_recursions=3, sharing="middle_cycle",
                                    router=RouterConfig(routing="expert_choice", kv="cache")))
