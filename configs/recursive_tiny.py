"""CPU-sized recursive Transformer: middle-cycle sharing, N_r = 3 (1 + 2 x 3 + 1 layers)."""
from mor.config import as_config_dict
from mor.presets import tiny_config


def get_config():
  return as_config_dict(tiny_config("recursive", num_recursions=3, sharing="middle_cycle"))
