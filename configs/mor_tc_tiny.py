"""CPU-sized MoR, token-choice routing (softmax, balancing loss 0.1), N_r = 3."""
from mor.config import RouterConfig, as_config_dict
from mor.presets import tiny_config


def get_config():
  return as_config_dict(tiny_config(
      "mor", num_recursions=3, sharing="middle_cycle",
      router=RouterConfig(routing="token_choice", gate="softmax", alpha=1.0, balance="loss",
                          balance_coef=0.1)))
