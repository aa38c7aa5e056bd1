"""Multi-process start-up (GPU clusters, TPU pods, several processes on one host).

Launch one process per host (or per GPU group) with either
- MOR_COORDINATOR=host:port MOR_NUM_PROCESSES=N MOR_PROCESS_ID=i  (any cluster), optionally
  MOR_LOCAL_DEVICE_IDS=0,1,... to pin GPUs; or
- MOR_DISTRIBUTED=auto on Cloud TPU pods and SLURM, where jax finds the rest itself.
On a CPU host MOR_CPU_DEVICES=n gives each process n devices (gloo collectives).
Nothing set: a single process, nothing to do.
"""
from __future__ import annotations

import os

import jax


def initialize() -> None:
  coord = os.environ.get("MOR_COORDINATOR")
  cpu_devices = os.environ.get("MOR_CPU_DEVICES")
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coord:
    ids = os.environ.get("MOR_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=coord, num_processes=int(os.environ["MOR_NUM_PROCESSES"]),
        process_id=int(os.environ["MOR_PROCESS_ID"]),
        local_device_ids=[int(i) for i in ids.split(",")] if ids else None)
  elif os.environ.get("MOR_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def print_summary(cfg, summary: dict) -> None:
  """The end-of-run lines: held-out NLL, FLOPs spent, throughput, tokens per depth."""
  if jax.process_index() != 0:
    return
  keys = ("step", "eval_nll", "flops_spent", "tokens_seen", "tokens_per_s", "mfu")
  print("summary: " + " ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary))
  depth = summary.get("stats/tokens_per_depth")
  if depth is not None:
    print("tokens per depth: " + ", ".join(f"{d:.1f}" for d in depth))
