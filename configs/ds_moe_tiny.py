"""CPU-sized DS-MoE: dense training over 8 experts with the mutual-information loss,
sparse inference by a threshold on E * p(e|x) (0.48)."""
from mor.config import MoEConfig, as_config_dict
from mor.presets import tiny_config


def get_config():
  return as_config_dict(tiny_config("moe", moe=MoEConfig(
      num_experts=8, router="top2", top_k=2, every=2, expert_ffn_dim=192, dense_training=True,
      mi_loss_coef=5e-4, ds_threshold=0.48)))
