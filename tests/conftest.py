"""Eight fake CPU devices for every test, set before the JAX backend starts.

Compile-speed flags (tests/xla_flags.py) for every test: the suite is compile-bound.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.xla_flags import FAST_XLA_FLAGS  # noqa: E402  (no imports of its own)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " + FAST_XLA_FLAGS).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Tests rebuild the same jitted functions many times (every train.run, every seed): a
# persistent compilation cache, fresh per session, compiles each distinct HLO once.
import tempfile  # noqa: E402
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mor_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
