"""One of two processes computing a sharded train step (driven by test_multiprocess)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.update(MOR_COORDINATOR=f"127.0.0.1:{sys.argv[1]}", MOR_NUM_PROCESSES="2",
                  MOR_PROCESS_ID=sys.argv[2], MOR_CPU_DEVICES="4")

from mor import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mor import config, train  # noqa: E402
from tests.test_train import ArrayData, tiny_cfg  # noqa: E402


def main():
  cfg = config.replace(tiny_cfg(), mesh=dict(data=4, fsdp=2))
  s = train.setup(cfg)
  state = train.init_state(s)
  batch = next(ArrayData(cfg))
  per = cfg.data.batch_size // jax.process_count()
  local = {k: v[jax.process_index() * per:(jax.process_index() + 1) * per]
           for k, v in batch.items()}
  state, m = s.train_step(state, train.to_global(s, local))
  params = multihost_utils.process_allgather(state["params"], tiled=True)
  sums = [float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(params)]
  with open(sys.argv[3], "w") as f:
    json.dump({"loss": float(m["loss"]), "sums": sums, "devices": jax.device_count()}, f)


if __name__ == "__main__":
  main()
