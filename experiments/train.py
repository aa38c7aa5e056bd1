"""Train one model: python -m experiments.train --config configs/NAME.py --workdir DIR.

Any field can be overridden: --config.model.num_layers=10 --config.train.steps=50.
Running again on a workdir with a checkpoint resumes it.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from mor import config, distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/recursive_tiny.py",
                                          "Python config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Run directory (metrics, checkpoints).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint step at INFO
  try:
    cfg = config.from_dict(_CONFIG.value)
  except config.ConfigError as e:
    raise app.UsageError(str(e)) from None
  distributed.initialize()
  summary = train.run(cfg, _WORKDIR.value)
  distributed.print_summary(cfg, summary)


if __name__ == "__main__":
  app.run(main)
