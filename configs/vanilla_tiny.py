"""CPU-sized vanilla Transformer (8 unique layers)."""
from mor.config import as_config_dict
from mor.presets import tiny_config


def get_config():
  return as_config_dict(tiny_config("vanilla"))
