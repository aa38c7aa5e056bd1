"""One of two processes: a sharded train step, then its grain data shard (test_multiprocess).

argv: port, process id, output json, corpus folder, data_dir, checkpoint workdir.
"""
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
  out = {"loss": float(m["loss"]), "sums": sums, "devices": jax.device_count(), **data_shard()}
  with open(sys.argv[3], "w") as f:
    json.dump(out, f)


def data_shard() -> dict:
  """This process's first batches, and its grain position saved/restored through orbax."""
  from mor import checkpoint
  from mor.config import DataConfig
  from mor.data import make_data
  cfg = DataConfig(corpus=sys.argv[4], data_dir=sys.argv[5], seq_len=32, batch_size=8,
                   eval_fraction=0.1, seed=3, shuffle_window=16)
  data = make_data(cfg, 384, jax.process_index(), jax.process_count())
  first = [next(data.train)["inputs"].tolist() for _ in range(3)]
  mngr = checkpoint.manager(sys.argv[6], async_save=False)
  checkpoint.save(mngr, 3, {"w": np.ones(2, np.float32)}, data.train, {"model": {}},
                  data.fingerprint)
  mngr.wait_until_finished()
  expected = [next(data.train)["inputs"].tolist() for _ in range(2)]
  fresh = make_data(cfg, 384, jax.process_index(), jax.process_count())
  checkpoint.restore_data(mngr, 3, fresh.train, {"data_fingerprint": fresh.fingerprint})
  mngr.close()
  resumed = [next(fresh.train)["inputs"].tolist() for _ in range(2)]
  return {"first": first, "resumed_equal": resumed == expected,
          "eval": [b["inputs"].tolist() for b in data.eval_batches(2)]}


if __name__ == "__main__":
  main()
