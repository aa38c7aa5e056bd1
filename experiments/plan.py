"""Will it fit? python -m experiments.plan --config configs/paper.py:vanilla,360m --accelerator h100 --devices 8

Prints one JSON line per plan (mor.memory.plan): the per-device memory estimate
(params, optimizer, activations, batch), whether the config's batch fits, the
largest global batch that does, and the step time at --mfu. --sizes plans
--variant at each of the paper's sizes instead of --config, e.g.
  --sizes 135m,360m,730m,1.7b --variant vanilla --accelerator tpu_v5e --devices 8
Mesh overrides go through the config: --config.mesh.data=2 --config.mesh.fsdp=4.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from mor import config, memory, presets

_CONFIG = config_flags.DEFINE_config_file("config", "configs/paper.py:mor_ec3,360m",
                                          "Python config file with get_config().")
_ACCEL = flags.DEFINE_string("accelerator", "h100",
                             f"One of {', '.join(memory.ACCELERATORS)}.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Accelerators the mesh spans.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed for the step time.")
_USABLE = flags.DEFINE_float("usable", 0.9, "Share of device memory the program may use.")
_SIZES = flags.DEFINE_list("sizes", [], "Paper sizes to plan --variant at (overrides --config).")
_VARIANT = flags.DEFINE_string("variant", "mor_ec3", "mor.presets.VARIANTS name for --sizes.")


def main(argv):
  del argv
  try:
    memory.accelerator(_ACCEL.value)   # bad names fail before any model is built
    if _SIZES.value:
      cfgs = [presets.variant_config(_VARIANT.value, s) for s in _SIZES.value]
      cfgs = [config.replace(c, mesh=_CONFIG.value.mesh.to_dict()) for c in cfgs]
    else:
      cfgs = [config.from_dict(_CONFIG.value)]
    for cfg in cfgs:
      memory.mesh_sizes(cfg.mesh, _DEVICES.value)
    rows = [memory.plan(c, _ACCEL.value, _DEVICES.value, _MFU.value, _USABLE.value)
            for c in cfgs]
  except config.ConfigError as e:
    raise app.UsageError(str(e)) from None
  for cfg, row in zip(cfgs, rows):
    m = cfg.model
    print(json.dumps({"kind": m.kind, "layers": m.num_layers, "d_model": m.d_model,
                      "num_recursions": m.num_recursions, **row}))


if __name__ == "__main__":
  app.run(main)
