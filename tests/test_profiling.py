"""mor.profiling: time shares from a trace, and thunks mapped back to source lines."""
import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mor import bench, profiling
from xla_flags import FAST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A module text with the stack-frame tables: frame 2 (b.py:g:20) is called from
# frame 1 (pkg/a.py:f:10); parents print 1-based (parent_frame_id - 1 is the parent).
HLO = """HloModule m

FileNames
1 "/x/pkg/a.py"
2 "/x/b.py"

FunctionNames
1 "f"
2 "g"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

ENTRY %main {
  %fusion.1 = f32[4] fusion(%p), metadata={op_name="jit(f)/exp" stack_frame_id=1}
  %fusion.2 = f32[4] fusion(%p), metadata={op_name="jit(f)/transpose(jvp())/mul" stack_frame_id=2}
  %dot.3 = f32[4] dot(%p, %p), metadata={op_name="jit(f)/dot_general" stack_frame_id=1}
  %while.4 = f32[4] while(%p), metadata={op_name="jit(f)/while" stack_frame_id=1}
}
"""


def _ev(name, ts, dur, module=None):
  e = {"ph": "X", "name": name, "ts": ts, "dur": dur}
  if module:
    e["args"] = {"hlo_module": module}
  return e


def test_concurrent_thunks_share_time_and_async_thunks_end_at_their_end_event():
  events = [
      _ev("fusion.1", 0, 10),           # alone for 4 us, then beside dot.3 for 6
      _ev("dot.3", 4, 1),               # launch; runs until its end event at 20
      _ev("end: dot.3", 20, 0),
      _ev("fusion.2", 22, 1),           # an async launch: runs alone until its end at 26
      _ev("end: fusion.2", 26, 0),
      _ev("while.4", 0, 30),            # a loop: its body's thunks count, not itself
      _ev("ThreadpoolListener::Record", 1, 2),
  ]
  ops = {o.op: o for o in profiling.attribute(events, HLO, calls=2, package="pkg")}
  assert set(ops) == {"fusion.1", "fusion.2", "dot.3"}
  assert ops["fusion.1"].ms == pytest.approx((4 + 6 / 2) / 1e3 / 2)
  assert ops["dot.3"].ms == pytest.approx((6 / 2 + 10) / 1e3 / 2)
  assert ops["fusion.2"].ms == pytest.approx(4 / 1e3 / 2)
  # alone: fusion.1 for 4 us, dot.3 for 10, fusion.2 for 4; nothing while they overlap
  assert [ops[k].alone_ms * 2e3 for k in ("fusion.1", "dot.3", "fusion.2")] == pytest.approx(
      [4, 10, 4])
  assert sum(o.ms for o in ops.values()) == pytest.approx(24 / 1e3 / 2)   # busy time
  assert ops["dot.3"].count == 0.5
  # frame 2 lies outside the package: the walk reaches its caller in pkg/a.py
  assert ops["fusion.2"].source == "a.py:f:10" and ops["fusion.2"].backward
  assert ops["fusion.1"].source == "a.py:f:10" and not ops["fusion.1"].backward
  rows = profiling.by_source(list(ops.values()))
  assert rows[0][:2] == ("a.py:f:10", "fwd") and rows[1][:2] == ("a.py:f:10", "bwd")


def test_zero_length_spans_and_other_modules_take_no_time():
  events = [
      _ev("fusion.1", 5, 0, module="m"),          # opens and closes at once
      _ev("dot.3", 5, 1, module="m"), _ev("end: dot.3", 15, 0),
      _ev("fusion.2", 20, 8, module="jit_other"),   # same name, another jitted function
  ]
  ops = {o.op: o for o in profiling.attribute(events, HLO, calls=1, package="pkg")}
  assert "fusion.2" not in ops and ops.get("fusion.1", ops["dot.3"]._replace(ms=0)).ms == 0
  assert ops["dot.3"].ms == pytest.approx(10 / 1e3)


def test_profile_maps_a_real_trace_to_the_calling_line(tmp_path):
  # the heavy op is emitted in a helper outside the package (this tests/ dir),
  # so attribution must walk up to the line here that called it
  helper = tmp_path / "helper_mm.py"
  helper.write_text("import jax.numpy as jnp\n"
                    "def chain(x):\n"
                    "  for _ in range(4):\n"
                    "    x = jnp.tanh(x @ x)\n"
                    "  return x\n")
  spec = importlib.util.spec_from_file_location("helper_mm", helper)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)

  def fn(x):
    y = mod.chain(x)
    return y, jnp.sum(x * 2.0)      # y is an output: no reduction fuses onto the chain
  line = inspect.getsourcelines(fn)[1] + 1
  x = jax.random.normal(jax.random.key(0), (384, 384)) / 20
  ops = profiling.profile(jax.jit(fn), x, repeats=2, warmup=1, package="tests")
  rows = profiling.by_source(ops)
  assert rows[0][:2] == (f"test_profiling.py:{fn.__qualname__}:{line}", "fwd"), rows
  assert rows[0][2] > 0.5 * sum(r[2] for r in rows)
  assert all(o.count == 1.0 for o in ops)


def test_profile_feeds_donated_outputs_back():
  step = jax.jit(lambda s, x: (s + x, jnp.sum(s)), donate_argnums=0)
  ops = profiling.profile(step, jnp.zeros(1000), jnp.ones(1000), repeats=2, package="tests",
                          feed=lambda a, o: (o[0], a[1]))
  assert any(o.source.startswith("test_profiling.py:") for o in ops)


def test_profile_step_cli_attributes_a_train_step_to_model_lines():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=FAST_XLA_FLAGS)   # one device
  run = subprocess.run(
      [sys.executable, "-m", "experiments.profile_step", "--model", "mor_ec", "--seq_len", "32",
       "--batch", "2", "--d_model", "32", "--vocab", "64", "--num_layers", "5",
       "--num_heads", "2", "--num_kv_heads", "1", "--repeats", "1", "--top", "200"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  rec = json.loads(run.stdout)
  files = {r["source"].split(":")[0] for r in rec["by_source"]}
  assert {"mlp.py", "attention.py", "train.py", "routers.py"} <= files, files
  assert {r["pass"] for r in rec["by_source"]} == {"fwd", "bwd"}
  assert rec["attributed_ms_per_step"] == pytest.approx(
      sum(r["ms"] for r in rec["by_source"]), abs=0.01)


def test_profile_follows_the_serving_engine_state():
  eng, st = bench.decode_engine(2, batch=4, d_model=32, num_heads=2, num_kv_heads=1,
                                vocab=64, max_len=16, steps_per_call=4)
  seen = []

  def feed(args, out):
    seen.append(int(out[0].counters[0]))    # engine steps so far
    return args[0], out[0]
  ops = profiling.profile(eng._chunk_fn(), eng.params, st, repeats=2, warmup=1, feed=feed)
  assert seen == [8, 12, 16]                # one advanced call before, then 4 steps per call
  assert any(o.source.startswith("serving.py:") for o in ops)
