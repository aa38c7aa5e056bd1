"""Per-op and per-source-line time of a jitted function, from a jax.profiler trace.

    ops = profiling.profile(fn, *args)                   # fn: jitted or plain
    for row in profiling.by_source(ops)[:20]: print(row)

The trace (kept in `trace_dir` for TensorBoard / xprof when given) has one event
per executed XLA thunk, named after its HLO instruction. Each instruction's
metadata carries a stack frame id; the compiled module's text holds the stack
frame tables, so every thunk maps back to the Python line that emitted it
(the innermost frame under `package`), and `transpose(` in its op name marks
the backward pass.

Attribution on a multi-core CPU: XLA runs independent thunks concurrently,
and some run asynchronously (Eigen dots, loop fusions partitioned over the
thread pool): a thunk's span ends at its `end:` event when the trace has one,
not at its launch event's duration. Time is therefore split evenly among the
thunks running at each instant, so the shares add up to the time any thunk
was running; `alone_ms` is the part of a share during which no other thunk ran
(the op held up everything). A share is what an op occupied, not what removing
it would save: on the 2-core CPU, ops that overlap others were often free to
drop (docs/notes/train_step.md, issue 12). Loop instructions (while, call, conditional) are
skipped; their bodies' thunks are counted. Only launches of the profiled module
count (a `feed` that runs other jitted code adds nothing). On several devices,
times and counts add up over the devices.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable, NamedTuple

import jax

_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


class OpTime(NamedTuple):
  op: str             # HLO instruction name
  ms: float           # mean share per call, milliseconds
  alone_ms: float     # of which no other thunk was running (per call)
  count: float        # executions per call
  source: str         # "file.py:function:line" of the innermost frame under the package
  backward: bool      # emitted under a transpose (the backward pass)


def profile(fn: Callable, *args, repeats: int = 3, warmup: int = 2, package: str = "mor",
            trace_dir: str | None = None, feed: Callable | None = None) -> list[OpTime]:
  """Runs fn(*args) `repeats` times under jax.profiler; per-op time, largest first.

  feed(args, outputs) -> the next call's args, for functions that donate their
  inputs (a train step: `lambda a, o: (o[0],) + a[1:]`); default: the same args.
  """
  compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile()

  def call(args):
    out = jax.block_until_ready(compiled(*args))
    return tuple(feed(args, out)) if feed else args
  for _ in range(warmup):
    args = call(args)
  with tempfile.TemporaryDirectory() as tmp:
    out = trace_dir or tmp
    jax.profiler.start_trace(out)
    try:
      for _ in range(repeats):
        args = call(args)
    finally:
      jax.profiler.stop_trace()
    paths = sorted(glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {out}")
    with gzip.open(paths[-1]) as f:
      events = json.load(f)["traceEvents"]
  return attribute(events, compiled.as_text(), repeats, package)


def attribute(events: list[dict], hlo_text: str, calls: int, package: str = "mor"
              ) -> list[OpTime]:
  """Splits trace time among the module's thunks (see the module docstring)."""
  meta, source, loops = _instructions(hlo_text, package)
  module = re.match(r"HloModule ([^\s,]+)", hlo_text)
  module = module[1] if module else None
  spans, pending = [], collections.defaultdict(list)
  for e in sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]):
    name = e["name"]
    if name.startswith("end: "):
      # the thunk's completion: after its launch event for async ones (Eigen dots, loop
      # fusions partitioned over the thread pool), at it for synchronous ones
      if pending[name[5:]]:
        start, stop = pending[name[5:]].pop(0)
        spans.append((name[5:], start, max(stop, e["ts"])))
    elif name in meta and name not in loops and e.get("args", {}).get(
        "hlo_module", module) == module:     # other jitted calls in the trace are not ours
      pending[name].append((e["ts"], e["ts"] + e["dur"]))
  spans += [(name, start, stop) for name, q in pending.items() for start, stop in q]
  share, alone, count = collections.Counter(), collections.Counter(), collections.Counter()
  # at equal times starts sort first, so a zero-length span opens and closes at once
  edges = sorted([(s, 0, i) for i, (_, s, _) in enumerate(spans)] +
                 [(t, 1, i) for i, (_, _, t) in enumerate(spans)])
  running, last = set(), None
  for t, kind, i in edges:
    if running and last is not None:
      for j in running:
        share[j] += (t - last) / len(running)
      if len(running) == 1:
        alone[next(iter(running))] += t - last
    last = t
    if kind == 0:
      running.add(i)
      count[spans[i][0]] += 1
    else:
      running.discard(i)
  per_op, per_op_alone = collections.Counter(), collections.Counter()
  for i, us in share.items():
    per_op[spans[i][0]] += us
    per_op_alone[spans[i][0]] += alone[i]
  return [OpTime(op, us / 1e3 / calls, per_op_alone[op] / 1e3 / calls, count[op] / calls,
                 source(meta[op][0]), "transpose(" in meta[op][1])
          for op, us in per_op.most_common()]


def by_source(ops: list[OpTime]) -> list[tuple[str, str, float, float]]:
  """(source line, "fwd"/"bwd", ms, alone ms) per call, largest first."""
  total, alone = collections.Counter(), collections.Counter()
  for o in ops:
    key = (o.source, "bwd" if o.backward else "fwd")
    total[key] += o.ms
    alone[key] += o.alone_ms
  return [(src, p, round(ms, 3), round(alone[(src, p)], 3))
          for (src, p), ms in total.most_common()]


def _instructions(hlo_text: str, package: str):
  """{instruction: (stack frame id, op_name)} and a frame id -> source line function."""
  lines = hlo_text.splitlines()
  tables = {k: {} for k in _TABLES}
  section = None
  for line in lines:
    if line in _TABLES:
      section = line
      continue
    if section is None:
      continue
    if not line.strip():
      if section == "StackFrames":
        break
      continue
    idx, rest = line.split(" ", 1)
    if section in ("FileNames", "FunctionNames"):
      tables[section][int(idx)] = rest.strip('"')
    else:
      tables[section][int(idx)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
  meta, loops = {}, set()
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if m:
      frame = re.search(r"stack_frame_id=(\d+)", line)
      name = re.search(r'op_name="([^"]*)"', line)
      meta[m[1]] = (int(frame[1]) if frame else 0, name[1] if name else "")
      if re.search(r"\s(?:while|call|conditional)\(", line):
        loops.add(m[1])
  files, funcs = tables["FileNames"], tables["FunctionNames"]
  locs, frames = tables["FileLocations"], tables["StackFrames"]
  pkg = os.sep + package + os.sep

  def source(frame: int) -> str:
    seen = set()
    while frame in frames and frame not in seen:   # innermost frame first
      seen.add(frame)
      loc = locs[frames[frame]["file_location_id"]]
      path = files[loc["file_name_id"]]
      if pkg in path:
        return f"{os.path.basename(path)}:{funcs[loc['function_name_id']]}:{loc['line']}"
      parent = frames[frame]["parent_frame_id"]
      frame = parent - 1 if parent > 0 else 0   # the text prints parents 1-based
    return "other"
  return meta, source, loops
