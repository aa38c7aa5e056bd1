"""Every `python -m experiments...` command in a fenced block of README.md and docs/ parses.

The commands are taken from fenced code blocks (backslash continuations joined, `&&`, `;` and
`|` split, `VAR=value` prefixes dropped) and parsed by the module's own parser, not run:
- argparse modules: `main()` is called with the command's argv and the parser's `parse_args`
  stops it as soon as the arguments have parsed (an unknown or renamed flag exits with 2);
- absl modules: `flags.FLAGS(argv)` after importing the module (an unknown flag raises), then
  for a `--config` file its dotted overrides (a renamed field raises) and `mor.config.from_dict`
  (a bad value raises); leftover positional words fail too.
All in one subprocess (one JAX import). Each module also parses a flag that exists nowhere and
must fail on it, so a checker that stopped detecting unknown flags would fail here as well.
Paper-scale plans and cluster commands parse but are never run.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOGUS = "--no_such_flag_in_any_module=1"


def doc_files():
  files = [os.path.join(ROOT, "README.md")]
  for base, _, names in sorted(os.walk(os.path.join(ROOT, "docs"))):
    files += [os.path.join(base, n) for n in sorted(names) if n.endswith(".md")]
  return files


def fenced_lines(text):
  """(line number, logical line) of every fenced code block, continuations joined."""
  out, fence, buf, start = [], None, "", 0
  for i, line in enumerate(text.splitlines(), 1):
    m = re.match(r"\s*(```+|~~~+)", line)
    if m and (fence is None or m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)):
      fence = m.group(1) if fence is None else None
      buf = ""
      continue
    if fence is None:
      continue
    if not buf:
      start = i
    if line.rstrip().endswith("\\"):
      buf += line.rstrip()[:-1] + " "
      continue
    out.append((start, buf + line))
    buf = ""
  return out


def experiment_commands(line):
  """[(module, argv)] for each `python[3] -m experiments.X ...` in one shell line."""
  lex = shlex.shlex(line, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  lex.commenters = "#"
  segments, cur = [], []
  for tok in lex:
    if tok in ("&&", "||", ";", "|", "&"):
      segments.append(cur)
      cur = []
    else:
      cur.append(tok)
  segments.append(cur)
  found = []
  for seg in segments:
    while seg and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", seg[0]):   # MOR_X=... prefixes
      seg = seg[1:]
    if len(seg) >= 3 and re.fullmatch(r"python3?", seg[0]) and seg[1] == "-m" \
        and seg[2].startswith("experiments."):
      found.append((seg[2], seg[3:]))
  return found


def collect():
  cmds = []
  for path in doc_files():
    with open(path) as f:
      text = f.read()
    for lineno, line in fenced_lines(text):
      for module, argv in experiment_commands(line):
        cmds.append((f"{os.path.relpath(path, ROOT)}:{lineno}", module, argv))
  return cmds


COMMANDS = collect()

# Runs in one subprocess: stdin [[module, [argv, ...]], ...]; stdout one JSON list per module
# of [ok, message] per argv. absl flags are process-global and modules define flags of the same
# names (--workdir, --seeds, ...), so each module's flags are taken out of FLAGS after its import
# and put back only while its own commands are parsed.
DRIVER = r"""
import argparse, contextlib, importlib, inspect, io, json, sys
from absl import app, flags, logging
F = flags.FLAGS
jobs = json.load(sys.stdin)
class Parsed(Exception):
  pass
orig = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
  orig(self, args, namespace)
  raise Parsed()
argparse.ArgumentParser.parse_args = parse_args

def check(name, mod, own, argv):
  sys.argv = [name] + argv
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      if own is None:                  # argparse: main() up to its parse_args
        try:
          mod.main()
          raise RuntimeError("main() returned without parsing its arguments")
        except Parsed:
          pass
      else:
        F.unparse_flags()
        for f in list(F):              # override flags a previous --config parse defined
          if "." in f:
            delattr(F, f)
        rest = F(sys.argv)
        if rest[1:]:
          raise ValueError(f"positional words left over: {rest[1:]}")
        cfg = getattr(mod, "_CONFIG", None)
        if cfg is not None:
          from mor import config
          config.from_dict(cfg.value)
    return [True, ""]
  except SystemExit as e:
    return [e.code in (0, None), f"exit {e.code}: {err.getvalue().strip()[-400:]}"]
  except Exception as e:
    return [False, f"{type(e).__name__}: {str(e)[:400]}"]

out = []
for name, argvs in jobs:
  try:
    mod = importlib.import_module(name)
  except Exception as e:
    out.append([[False, f"import failed: {type(e).__name__}: {e}"]] * len(argvs))
    continue
  own = None                           # the module's own absl flags (libraries' stay put)
  if "argparse.ArgumentParser" not in inspect.getsource(mod):
    own = {f.name: f for f in F.flags_by_module_dict().get(name, [])}
  for f in own or ():
    delattr(F, f)                      # out of the way of the next module's flags
  for f, flag in (own or {}).items():
    F[f] = flag
  out.append([check(name, mod, own, argv) for argv in argvs])
  for f in own or ():
    delattr(F, f)
print(json.dumps(out))
"""


def parse_all(commands):
  """({index in commands: (ok, message)}, {module: (ok, message)} for the unknown flag)."""
  by_module = {}
  for i, (_, module, argv) in enumerate(commands):
    by_module.setdefault(module, []).append((i, argv))
  jobs = [[m, [a for _, a in items] + [[BOGUS]]] for m, items in by_module.items()]
  p = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, input=json.dumps(jobs),
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True,
                     capture_output=True, timeout=300)
  try:
    res = json.loads(p.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    raise AssertionError(f"driver crashed: {p.stderr[-2000:]}") from None
  results, controls = {}, {}
  for (module, items), r in zip(by_module.items(), res):
    for (i, _), ri in zip(items, r):
      results[i] = tuple(ri)
    controls[module] = tuple(r[-1])
  return results, controls


@pytest.fixture(scope="module")
def parsed():
  return parse_all(COMMANDS)


def test_extractor_handles_continuations_env_prefixes_and_chains():
  text = ("x\n```bash\nbash setup.sh && MOR_A=1 MOR_B=x:2 python3 -m experiments.train \\\n"
          "    --config c.py --workdir 'runs/a b'  # comment\n"
          "python -m experiments.sweep --seeds 2; echo done\n```\n"
          "`python -m experiments.evaluate` outside a fence is not taken\n")
  cmds = [c for _, line in fenced_lines(text) for c in experiment_commands(line)]
  assert cmds == [("experiments.train", ["--config", "c.py", "--workdir", "runs/a b"]),
                  ("experiments.sweep", ["--seeds", "2"])]


def test_the_two_fresh_machine_commands_come_first_and_ci_runs_the_test_one():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  blocks = [line for _, line in fenced_lines(readme)]
  assert blocks[0].startswith("bash setup.sh && python3 -m experiments.train ")
  assert blocks[1] == "bash setup.sh && python3 -m pytest -q -n 2 tests"
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert blocks[1] in f.read().splitlines()


def test_docs_hold_commands_of_both_parser_kinds():
  modules = {m for _, m, _ in COMMANDS}
  assert {"experiments.train", "experiments.reproduce", "experiments.bench_train"} <= modules
  assert len(COMMANDS) >= 20, len(COMMANDS)


def test_an_unknown_flag_fails_in_every_module(parsed):
  _, controls = parsed
  assert controls, controls
  for module, (ok, msg) in controls.items():      # fails, and for the flag's sake
    assert not ok and "no_such_flag_in_any_module" in msg, (module, msg)


@pytest.mark.parametrize("where,module,argv", COMMANDS,
                         ids=[f"{w} {m.split('.')[1]}" for w, m, _ in COMMANDS])
def test_documented_command_parses(parsed, where, module, argv):
  results, _ = parsed
  ok, msg = results[COMMANDS.index((where, module, argv))]
  assert ok, f"{where}: python -m {module} {shlex.join(argv)}\n{msg}"
