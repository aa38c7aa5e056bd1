"""Eight fake CPU devices for every test, set before the JAX backend starts.

Tests compile far more than they run, so LLVM codegen runs at level 0: it
halves compile time and leaves the HLO (and so every number) unchanged.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
