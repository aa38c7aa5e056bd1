"""Two processes on loopback (jax.distributed, gloo), 4 CPU devices each, equal one process."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker

from mor import config, train
from tests.test_train import ArrayData, tiny_cfg

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_compute_the_single_process_step(tmp_path):
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "mp_worker.py"), str(port),
                             str(i), str(tmp_path / f"out{i}.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
  outs = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]

  cfg = config.replace(tiny_cfg(), mesh=dict(data=4, fsdp=2))
  s = train.setup(cfg)
  state, m = s.train_step(train.init_state(s), train.to_global(s, next(ArrayData(cfg))))
  sums = [float(np.abs(np.asarray(x, np.float64)).sum()) for x in jax.tree.leaves(state["params"])]
  for out in outs:
    assert out["devices"] == 8
    assert abs(out["loss"] - float(m["loss"])) < 1e-5
    np.testing.assert_allclose(out["sums"], sums, rtol=1e-5)
