"""Every notebook in notebooks/ runs headless on a tiny MoR checkpoint without errors.

The committed notebooks carry their outputs (plots from the README's main job) and
import the installed `mor` (no sys.path edits); the kernel here finds this
checkout through PYTHONPATH, as an editable install would.
"""
import glob
import os

import numpy as np
import pytest

from mor import config, presets, train
from test_train import ArrayData
from xla_flags import FAST_XLA_FLAGS

import nbformat
import nbclient
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def tiny_mor_cfg():
  base = config.to_dict(presets.tiny_config("mor"))
  base["model"].update(vocab_size=256, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64,
                       num_layers=4, num_recursions=2, max_seq_len=16)
  base["data"].update(seq_len=16, batch_size=8)   # 8 test devices
  base["train"].update(steps=4, log_every=2, eval_every=0, eval_batches=0, checkpoint_every=0,
                       peak_flops=1e11)
  return config.from_dict(base)


@pytest.fixture(scope="module")
def mor_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("nb_run")
  cfg = tiny_mor_cfg()
  data = ArrayData(cfg)
  train.run(cfg, str(wd), data=data)
  np.save(wd / "tokens.npy", data.seqs[:8].astype(np.int32))
  return wd


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, mor_run, monkeypatch):
  monkeypatch.setenv("MOR_WORKDIR", str(mor_run))
  monkeypatch.setenv("MOR_TOKENS", str(mor_run / "tokens.npy"))
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # the kernel is a fresh process: no fake devices from conftest, one CPU device; the
  # compile-speed flags as in conftest (the kernel compiles a dozen functions, runs them once)
  monkeypatch.setenv("XLA_FLAGS", FAST_XLA_FLAGS)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()   # raises CellExecutionError on the first failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert "same depth under causal and top-k routing" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_notebook_has_plots_and_no_path_edits(path):
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [c for c in code if "sys.path" in c.source], "import the installed mor instead"
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), "commit it with outputs"
  assert not [o for o in outputs if o.get("output_type") == "error"]
