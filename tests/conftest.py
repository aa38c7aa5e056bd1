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

# MOR_COMPILE_PROFILE=FILE: per test, seconds spent tracing, lowering and compiling, and
# persistent-cache hits, appended as JSON lines (the suite is compile-bound; this says where).
_PROFILE = os.environ.get("MOR_COMPILE_PROFILE")
if _PROFILE:
  import collections  # noqa: E402
  import json  # noqa: E402
  import time  # noqa: E402

  import pytest  # noqa: E402

  import logging  # noqa: E402
  import re  # noqa: E402

  _acc, _compiles = collections.Counter(), []

  class _CompileLog(logging.Handler):
    def emit(self, record):
      m = re.search(r"Finished XLA compilation of (\S+) in ([\d.e-]+) sec", record.getMessage())
      if m:
        _compiles.append((m[1], round(float(m[2]), 2)))

  jax.config.update("jax_log_compiles", True)
  _log = logging.getLogger("jax._src.interpreters.pxla")
  _log.addHandler(_CompileLog())
  _log.setLevel(logging.DEBUG)
  _log.propagate = False
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: _acc.update({name.rsplit("/", 1)[-1]: secs}))
  jax.monitoring.register_event_listener(
      lambda name, **kw: _acc.update({name.rsplit("/", 1)[-1]: 1}))

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    _acc.clear()
    _compiles.clear()
    t0 = time.perf_counter()
    yield
    with open(_PROFILE, "a") as f:
      f.write(json.dumps({"test": item.nodeid, "wall": time.perf_counter() - t0,
                          **{k: round(v, 3) for k, v in _acc.items()},
                          "compiles": sorted(_compiles, key=lambda c: -c[1])}) + "\n")
