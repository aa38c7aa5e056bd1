"""Text corpora as tfds array_record data sources (no TensorFlow needed).

A folder of .txt/.md/.rst files becomes the tfds dataset `mor_text_folder`, one
example per document, split into train/validation by a hash of each file's
relative path. It is prepared once under <data_dir>/mor_text_folder/<key>/,
where key hashes the folder path, its file list, sizes, mtimes and the eval
fraction, so edits to the folder give a fresh dataset and re-runs are instant.

`tfds:NAME[/CONFIG][:VERSION][#FEATURE]` reads a catalog dataset that is
already prepared in array_record format (`tfds build --file_format=array_record`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from mor.data import corpus as corpus_lib

_SPLIT_SCHEME = "hash-order-bytes-v1"  # part of the cache key: bump when split_files changes
_EXAMPLE_HINT = "use 'default', 'tfds:NAME' or a folder of .txt/.md/.rst files"


@dataclasses.dataclass
class TextSplits:
  """The documents of a corpus: random-access sources of {feature: bytes} records."""
  name: str
  key: str                      # fingerprint of the contents, for downstream caches
  train: Any                    # tfds ArrayRecordDataSource (len, __getitems__)
  validation: Any | None        # None when the corpus has no held-out documents
  feature: str = "text"


def eval_hash(relpath: str) -> float:
  """A fixed pseudo-random number in [0, 1) per path: the split does not depend on order."""
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(sizes: Mapping[str, int], eval_fraction: float) -> tuple[list[str], list[str]]:
  """(train, validation) relative paths, each non-empty when there are >= 2 files.

  Validation takes files in hash order until it holds eval_fraction of the bytes;
  counting files instead would let a few large ones skew the held-out size.
  """
  ranked = sorted(sizes, key=lambda p: (eval_hash(p), p))
  budget, n_val = eval_fraction * sum(sizes.values()), 0
  while n_val < len(ranked) and budget > 0:
    budget -= sizes[ranked[n_val]]
    n_val += 1
  n_val = min(max(n_val, 1), len(ranked) - 1)   # a lone file goes to train
  return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def list_text_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """Text files under folder, recursively, skipping hidden files and folders."""
  return sorted(
      f for f in folder.rglob("*")
      if f.suffix in corpus_lib.TEXT_SUFFIXES and f.is_file()
      and not any(p.startswith(".") for p in f.relative_to(folder).parts))


@dataclasses.dataclass(eq=False)
class TextFolderConfig(tfds.core.BuilderConfig):
  """A folder of text files; name is the content key."""
  folder: str = ""
  # Relative paths, fixed when the key was computed; kept out of repr (tfds logs the config).
  files: tuple = dataclasses.field(default=(), repr=False)
  eval_fraction: float = 0.02


class MorTextFolder(tfds.core.GeneratorBasedBuilder):
  """One example per document of a local folder of text files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Local text documents (mor.data.tfds_text).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}))

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager
    cfg = self.builder_config
    files = cfg.files or tuple(str(f.relative_to(cfg.folder))
                               for f in list_text_files(pathlib.Path(cfg.folder)))
    folder = pathlib.Path(cfg.folder)
    train, validation = split_files({f: (folder / f).stat().st_size for f in files},
                                    cfg.eval_fraction)
    # tfds refuses to finalize an empty split, so only declare non-empty ones.
    splits = {"train": train, "validation": validation}
    return {name: self._generate_examples(paths) for name, paths in splits.items() if paths}

  def _generate_examples(self, relpaths: Sequence[str]) -> Iterator[tuple[str, dict]]:
    folder = pathlib.Path(self.builder_config.folder)
    for rel in relpaths:
      text = (folder / rel).read_text(encoding="utf-8", errors="replace")
      yield rel, {"text": text, "path": rel}


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
  """Hides tfds's warnings about custom configs and fresh folders (expected here)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def prepare_folder(folder: str | pathlib.Path, data_dir: pathlib.Path,
                   eval_fraction: float) -> TextSplits:
  """Prepares (once) and opens the tfds dataset of a folder of text files."""
  folder = pathlib.Path(folder).expanduser().resolve()
  files = list_text_files(folder) if folder.is_dir() else []
  if not files:
    raise FileNotFoundError(
        f"data.corpus={str(folder)!r} does not exist or holds no .txt/.md/.rst files; "
        f"{_EXAMPLE_HINT}")
  relpaths = tuple(str(f.relative_to(folder)) for f in files)
  stats = tuple((r, f.stat().st_size, f.stat().st_mtime_ns) for r, f in zip(relpaths, files))
  key = corpus_lib.short_hash(str(folder), stats, float(eval_fraction), _SPLIT_SCHEME)
  config = TextFolderConfig(name=key, folder=str(folder), files=relpaths,
                            eval_fraction=float(eval_fraction),
                            description=f"text files under {folder}")
  with corpus_lib.locked(data_dir / "mor_text_folder" / key), _quiet_absl():
    builder = MorTextFolder(config=config, data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
      tfds.disable_progress_bar()
      builder.download_and_prepare()
    sources = builder.as_data_source()
  return TextSplits(name=str(folder), key=key, train=sources["train"],
                    validation=sources.get("validation"), feature="text")


def open_catalog(spec: str, data_dir: pathlib.Path) -> TextSplits:
  """Opens `NAME[/CONFIG][:VERSION][#FEATURE]` prepared in data_dir or tfds's default dir."""
  name, _, feature = spec.partition("#")
  sources, errors = None, []
  for where in (str(data_dir), None):   # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    try:
      sources = tfds.data_source(name, data_dir=where, download=False)
      break
    except Exception as e:  # noqa: BLE001 -- tfds raises several types; report them all
      errors.append(f"{where or 'tfds default'}: {str(e).splitlines()[0] if str(e) else e!r}")
  if sources is None:
    raise FileNotFoundError(
        f"data.corpus='tfds:{spec}' is not prepared in array_record format ({'; '.join(errors)}); "
        f"prepare it with `tfds build {name} --data_dir={data_dir} --file_format=array_record`")
  train = sources.get("train")
  if train is None:
    raise ValueError(f"data.corpus='tfds:{spec}' has no train split (splits: {list(sources)})")
  info = train.dataset_info
  texts = [k for k, v in info.features.items() if isinstance(v, tfds.features.Text)]
  if not feature:
    feature = "text" if "text" in texts else (texts[0] if len(texts) == 1 else "")
  if feature not in texts:
    raise ValueError(f"data.corpus='tfds:{spec}': pick a text feature with '#NAME', one of "
                     f"{texts or list(info.features)}")
  validation = sources.get("validation", sources.get("test"))
  split_sizes = sorted((k, s.num_examples, s.num_bytes) for k, s in info.splits.items())
  key = corpus_lib.short_hash(info.full_name, str(info.data_dir), split_sizes, feature)
  return TextSplits(name=f"tfds:{info.full_name}", key=key, train=train,
                    validation=validation, feature=feature)


def open_corpus(corpus: str, data_dir: pathlib.Path, eval_fraction: float) -> TextSplits:
  """Resolves data.corpus: 'default', 'tfds:NAME...' or a folder path."""
  if corpus == "default":
    return prepare_folder(corpus_lib.ensure_default_corpus(str(data_dir)), data_dir,
                          eval_fraction)
  if corpus.startswith("tfds:"):
    return open_catalog(corpus[len("tfds:"):], data_dir)
  path = pathlib.Path(corpus).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"data.corpus={corpus!r} does not exist; {_EXAMPLE_HINT}")
  return prepare_folder(path, data_dir, eval_fraction)


def iter_texts(source: Any, feature: str = "text", chunk: int = 256) -> Iterator[str]:
  """Yields the documents of a data source in index order, as str."""
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      value = record[feature]
      yield value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
