"""CPU-sized MoR expert-choice (N_r = 3, middle-cycle) uptrained from a dense checkpoint.

The source is the vanilla tiny model (configs/vanilla_tiny.py: same shapes, 8
layers) exported to Llama format:
  python -m experiments.train --config configs/vanilla_tiny.py --workdir runs/vanilla_tiny
  python -c "from mor import analysis; analysis.export_checkpoint('runs/vanilla_tiny', \
'runs/vanilla_tiny/llama')"
  python -m experiments.train --config configs/uptrain_mor_tiny.py --workdir runs/uptrain_mor
Both runs train their tokenizer on the default corpus, so the vocabularies agree.
Any Llama-format folder of these shapes works: --config.uptrain.source=DIR.
Stepwise: the shared blocks 1-2 start as dense layers 1 and 6 (evenly spaced over
the middle layers 1..6), layers 0 and 7 are copied; the mapping is printed at
start-up. --config.uptrain.strategy=average|lower|upper|random for the others.
"""
import dataclasses

from mor.config import RouterConfig, UptrainConfig, as_config_dict
from mor.presets import tiny_config


def get_config():
  cfg = tiny_config("mor", num_recursions=3, sharing="middle_cycle",
                    router=RouterConfig(routing="expert_choice", kv="cache"))
  return as_config_dict(dataclasses.replace(
      cfg, uptrain=UptrainConfig(source="runs/vanilla_tiny/llama", strategy="stepwise")))
