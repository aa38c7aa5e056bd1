"""Two processes on loopback (jax.distributed, gloo), 4 CPU devices each, equal one process.

Also the grain input pipeline under jax.distributed: each process reads the shard
make_data(process_index=i, process_count=2) reads in this process, and its iterator
position goes into the orbax checkpoint as its own file and comes back exactly.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker

from mor import config, train
from mor.config import DataConfig
from mor.data import make_data
from tests.test_data import _write_corpus
from tests.test_train import ArrayData, tiny_cfg
from tests.xla_flags import FAST_XLA_FLAGS

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_compute_the_single_process_step(tmp_path):
  _write_corpus(tmp_path / "corpus", 30)
  data_cfg = DataConfig(corpus=str(tmp_path / "corpus"), data_dir=str(tmp_path / "cache"),
                        seq_len=32, batch_size=8, eval_fraction=0.1, seed=3, shuffle_window=16)
  local = [make_data(data_cfg, 384, i, 2) for i in range(2)]   # also prepares the shared cache
  port = portpicker.pick_unused_port()
  # not the 8 fake devices (mor.distributed gives each process 4), but the compile-speed flags
  env = {**os.environ, "XLA_FLAGS": FAST_XLA_FLAGS}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "mp_worker.py"), str(port),
                             str(i), str(tmp_path / f"out{i}.json"), str(tmp_path / "corpus"),
                             str(tmp_path / "cache"), str(tmp_path / "ckpt")], env=env,
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
  for i, out in enumerate(outs):
    assert out["first"] == [next(local[i].train)["inputs"].tolist() for _ in range(3)]
    assert out["resumed_equal"]
    assert (tmp_path / "ckpt" / "checkpoints" / "3" / "data" / f"process_{i}-of-2.json").exists()
  assert outs[0]["first"] != outs[1]["first"]            # different documents
  whole = make_data(data_cfg, 384).eval_batches(2)
  for b in range(2):
    rows = outs[0]["eval"][b] + outs[1]["eval"][b]
    assert sorted(rows) == sorted(whole[b]["inputs"].tolist())
