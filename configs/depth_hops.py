"""One row of the depth-task table: the recursive model (cycle 2 x 3) on multi-hop induction.

Any row or task through overrides, e.g. --config.model.kind=mor --config.data.corpus=task:assign;
mor.depth.row_config builds every row of experiments/depth_tasks.py.
"""
from mor.config import as_config_dict
from mor.depth import row_config


def get_config():
  return as_config_dict(row_config("hops", "recursive"))
