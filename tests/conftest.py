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

# Tests rebuild the same jitted functions many times (every train.run, every seed): a
# persistent compilation cache, fresh per session, compiles each distinct HLO once.
import tempfile  # noqa: E402
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mor_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
