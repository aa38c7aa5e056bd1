"""Exact resume: kill and resume equals the uninterrupted run bit for bit."""
import os
import signal

import jax
import numpy as np
import pytest

from mor import checkpoint, config, sharding, train
from tests.test_train import ArrayData, tiny_cfg


class CrashingData(ArrayData):
  """Raises (a simulated kill) or sends SIGTERM when batch `at` is requested."""

  def __init__(self, cfg, at, how):
    super().__init__(cfg)
    self.at, self.how = at, how

  def __next__(self):
    if self.i == self.at:
      if self.how == "crash":
        raise KeyboardInterrupt("killed")
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def params_of(out):
  return [np.asarray(x) for x in jax.tree.leaves(out["state"]["params"])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  cfg = tiny_cfg(steps=8, checkpoint_every=3, eval_every=0)
  return cfg, params_of(train.run(cfg, str(tmp_path_factory.mktemp("ref")), ArrayData(cfg)))


def assert_same(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_kill_and_resume_is_bit_identical(tmp_path, uninterrupted):
  """Catches a resume that does not restore the data iterator's position (checked), or
  the optimizer state / step: the resumed run must be bit-identical."""
  cfg, ref = uninterrupted
  with pytest.raises(KeyboardInterrupt):
    train.run(cfg, str(tmp_path), CrashingData(cfg, at=5, how="crash"))
  assert checkpoint.manager(str(tmp_path)).latest_step() == 3   # work since step 3 is lost
  out = train.run(cfg, str(tmp_path), ArrayData(cfg))
  assert out["step"] == 8
  assert_same(params_of(out), ref)


def test_sigterm_saves_and_resumes_exactly(tmp_path, uninterrupted):
  cfg, ref = uninterrupted
  out = train.run(cfg, str(tmp_path), CrashingData(cfg, at=5, how="sigterm"))
  assert out == {"step": 6, "preempted": True}
  assert checkpoint.manager(str(tmp_path)).latest_step() == 6
  assert_same(params_of(train.run(cfg, str(tmp_path), ArrayData(cfg))), ref)


def test_restore_onto_another_mesh_gives_same_loss(tmp_path):
  cfg = config.replace(tiny_cfg(steps=4, eval_every=0), mesh=dict(data=8))
  out = train.run(cfg, str(tmp_path), ArrayData(cfg))
  other = config.replace(cfg, mesh=dict(data=2, fsdp=2, tensor=2))
  s = train.setup(other, sharding.make_mesh(other.mesh))
  state, _ = checkpoint.restore_latest(checkpoint.manager(str(tmp_path)),
                                       jax.eval_shape(s.init, jax.random.key(0)),
                                       s.state_shardings, config.to_dict(other))
  batch = ArrayData(cfg).eval_batches(1)
  assert train.evaluate(s, state, batch)["eval_nll"] == pytest.approx(
      train.evaluate(out["setup"], out["state"], batch)["eval_nll"], abs=1e-5)


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
  cfg = tiny_cfg(steps=2, eval_every=0)
  train.run(cfg, str(tmp_path), ArrayData(cfg))
  other = config.replace(cfg, model={"d_model": 128})
  with pytest.raises(checkpoint.CheckpointError, match="written for another model.*model.d_model"):
    train.run(other, str(tmp_path), ArrayData(other))
  # a config dict from before a field existed (as a notebook reads an older run's) still loads
  s = train.setup(cfg)
  older = config.to_dict(cfg)
  del older["model"]["router"]["depth_from"]
  state, _ = checkpoint.restore_latest(checkpoint.manager(str(tmp_path)),
                                       jax.eval_shape(s.init, jax.random.key(0)),
                                       s.state_shardings, older)
  assert int(state["step"]) == 2
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.write(b"\x00garbage\x00" * 8)
  with pytest.raises(checkpoint.CheckpointError, match="corrupt or incomplete") as e:
    train.run(cfg, str(tmp_path), ArrayData(cfg))
  assert "\n" not in str(e.value)
  assert checkpoint.manager(str(tmp_path)).all_steps() == [2]   # nothing overwritten
