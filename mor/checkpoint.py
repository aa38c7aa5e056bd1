"""Orbax checkpoints that resume exactly.

A checkpoint holds the train state (parameters, optimizer state, non-parameter
model state such as router biases and RNG streams, step), the data iterator
position and the config. orbax writes each step into a temporary folder and
renames it only when complete, so a half-written checkpoint is never listed;
steps already saved are never overwritten.

The data position is a grain iterator state, written by grain's orbax handler
as one JSON file per process (`data/process_i-of-n.json`): with per-process
sharding every process has its own position. Any iterator with JSON-able
`get_state()`/`set_state()` (e.g. an in-memory test stream) is stored the same way.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

_log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: corrupt, or for a different model."""


def manager(workdir: str, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                      create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=opts)


class _JsonState:
  """Adapts a state (or a non-grain iterator) to grain's handler, which stores bytes as is.

  Saving snapshots the state now, so an iterator that moves on while orbax
  writes in the background cannot change what is saved.
  """

  def __init__(self, state: Any = None, target: Any = None):
    self.state, self.target = state, target

  def get_state(self) -> bytes:
    return json.dumps(self.state, indent=1).encode()

  def set_state(self, state: bytes) -> None:
    self.target.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Called by grain's handler after restoring; nothing to prefetch."""


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data: Any, cfg_dict: dict,
         data_fingerprint: str = "") -> None:
  """Saves state, the data position (an iterator, or its state dict) and the config."""
  data_state = data.get_state() if hasattr(data, "get_state") else data
  meta = {"config": cfg_dict, "step": int(step), "data_fingerprint": data_fingerprint}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
      data=grain.checkpoint.CheckpointSave(_JsonState(data_state))))


def restore_data(mngr: ocp.CheckpointManager, step: int, data: Any, meta: dict,
                 data_fingerprint: str = "") -> None:
  """Moves `data` (a grain or other iterator) to the position saved at step."""
  where = os.path.join(str(mngr.directory), str(step), "data")
  if not os.path.isdir(where):
    _log.warning("checkpoint %d has no data position (written before grain); the data stream "
                 "starts from its beginning", step)
    return
  mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not os.path.exists(os.path.join(where, mine)):
    raise CheckpointError(f"checkpoint {where} holds the data positions of "
                          f"{', '.join(sorted(os.listdir(where)))}, not {mine}: resume with the "
                          "number of processes that wrote it")
  if meta.get("data_fingerprint", data_fingerprint) != data_fingerprint:
    _log.warning("the data position was saved for another corpus/tokenizer/seq_len/batch/seed "
                 "(%s != %s); resuming from it anyway", meta["data_fingerprint"], data_fingerprint)
  item = data if isinstance(data, grain.DatasetIterator) else _JsonState(target=data)
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(item)))


def abstract_like(state_shape: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
  leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
            for x, sh in zip(jax.tree.leaves(state_shape), jax.tree.leaves(shardings))]
  return jax.tree.unflatten(jax.tree.structure(state_shape), leaves)


def restore_latest(mngr: ocp.CheckpointManager, state_shape: Any, shardings: Any,
                   cfg_dict: dict) -> tuple[Any, dict] | None:
  """Returns (state, meta) of the newest checkpoint, or None when there is none.

  Raises CheckpointError when the checkpoint was written for another model or
  cannot be read.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  where = os.path.join(str(mngr.directory), str(step))
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # orbax raises many types for unreadable files
    raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}); move it "
                          "away to start over") from e
  saved_model = _with_defaults(meta.get("config", {}).get("model") or {})
  # as JSON stores it (tuples become lists); a caller's dict read from an older run gets the
  # newer fields' defaults too, as the saved one does
  model = _with_defaults(json.loads(dumps(cfg_dict["model"])))
  if saved_model != model:
    diff = sorted(k for k in model if (saved_model or {}).get(k) != model[k])
    raise CheckpointError(f"checkpoint {where} was written for another model (fields differ: "
                          f"{', '.join('model.' + k for k in diff)}); use a new workdir")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(state_shape, shardings))))
  except Exception as e:
    raise CheckpointError(f"checkpoint {where} is corrupt or incomplete ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from e
  return restored.state, meta


def _with_defaults(model: dict) -> dict:
  """A saved model section with fields added since it was written set to their defaults."""
  from mor import config
  try:
    return json.loads(dumps(config.to_dict(config._build(config.ModelConfig, model, "model."))))
  except config.ConfigError:   # a field since removed: compare as saved, which reports it
    return model


def read_config(workdir: str) -> dict:
  """The config saved with the newest checkpoint of a workdir (for notebooks)."""
  mngr = manager(workdir, async_save=False)
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {workdir}")
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["config"]


def dumps(obj: Any) -> str:
  return json.dumps(obj, sort_keys=True, default=str)
