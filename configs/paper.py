"""The paper's comparison (Bae et al. 2025, Table 3), at CPU or paper scale.

Pick a variant and a scale after a colon:
  --config configs/paper.py:mor_ec3,cpu     --config configs/paper.py:vanilla,360m
Variants: vanilla, vanilla_unshared (the control: only the 2 unshared layers),
recursive2/3/4, recursive3_cycle/_sequence/_middle_sequence (sharing ablation),
mor_ec2/3/4 (expert-choice, KV caching), mor_ec3_share (expert-choice, KV sharing),
mor_ec3_st (straight-through combine), mor_tc3 / mor_tc3_share (token-choice).
Scales: cpu (minutes on 2 cores) or 135m/360m/730m/1.7b (16.5e18 forward FLOPs, the
paper's convention, 2048 context,
batch 1024 x 2048, warmup-stable-decay). Middle-cycle sharing throughout; N_r = 4
uses 34 layers at paper scale (1 + 8 x 4 + 1) and 10 at CPU scale, as the paper does.
"""
from mor.config import as_config_dict
from mor.presets import VARIANTS, variant_config


def get_config(arg: str = "mor_ec3,cpu"):
  variant, _, scale = arg.partition(",")
  return as_config_dict(variant_config(variant, scale or "cpu"))


def all_variants():
  return list(VARIANTS)
