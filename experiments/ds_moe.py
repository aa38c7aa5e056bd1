"""DS-MoE report: python -m experiments.ds_moe --config configs/ds_moe_tiny.py --workdir DIR.

Trains (or resumes) the DS-MoE run, then prints held-out NLL and active
parameters for dense and for sparse inference as JSON.
"""
import json

from absl import app, flags, logging
from ml_collections import config_flags

from mor import config, train
from mor.models.moe import ds_moe_report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ds_moe_tiny.py", "DS-MoE config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ds_moe", "Run directory.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    cfg = config.from_dict(_CONFIG.value)
  except config.ConfigError as e:
    raise app.UsageError(str(e)) from None
  from mor.data import make_data
  data = make_data(cfg.data, cfg.model.vocab_size)
  out = train.run(cfg, _WORKDIR.value, data=data)
  model = train.model_from_state(out["setup"], out["state"])
  print(json.dumps(ds_moe_report(model, data.eval_batches(cfg.train.eval_batches)), indent=1))


if __name__ == "__main__":
  app.run(main)
