"""Training and evaluation token streams as grain datasets over the tfds array_record sources.

Training, in each process (`Data.train`, a checkpointable grain iterator):
  tfds source (one record per document)
    [process_index::process_count]   grain's per-process sharding: disjoint documents
    .shuffle(seed).repeat()          a new document order every epoch
    .map(tokenize, append EOS)       in grain's read threads
    ConcatThenSplitIterDataset       packing: the stream cut into rows of seq_len + 1
                                     tokens, documents continuing across rows, no padding
    WindowShuffleIterDataset         rows of a long document spread over many batches
    .batch(batch_size / processes)   inputs = row[:-1], targets = row[1:]
Evaluation: the validation documents in order, packed the same way (the final
partial row is dropped); global batch i holds rows i*B .. i*B + B - 1 (wrapping),
and process p reads rows p, p + P, ... of it, so every process has the same
batches and together they read the whole global batch.

The iterator's position is grain's `get_state()`; mor.checkpoint saves it with the
orbax checkpoint (grain's checkpoint handler, one file per process) and restoring
it replays exactly the same batches. Tokenizing on the fly runs at about 1M
tokens/s per core (experiments/bench_data.py), hundreds of times what a CPU
train step consumes, so tokens are not cached.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import grain
import numpy as np

from mor.config import DataConfig
from mor.data import corpus as corpus_lib
from mor.data import tasks, tfds_text
from mor.data.tasks import local_batch as _local_batch
from mor.data.tokenizer import Tokenizer, get_tokenizer

_log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]    # inputs, targets: int32[B_local, S]
# Few threads: the step needs ~1e3-1e4 tokens/s and the cores belong to XLA.
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class Tokenize(grain.transforms.Map):
  """A document record -> int32 token ids followed by EOS."""

  def __init__(self, tok: Tokenizer, feature: str):
    self.tok, self.feature = tok, feature

  def map(self, record: dict) -> np.ndarray:
    value = record[self.feature]
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return np.asarray(self.tok.encode(text) + [self.tok.eos_id], np.int32)


def tokenized_docs(source: Any, tok: Tokenizer, feature: str) -> grain.MapDataset:
  """The documents of a tfds data source, tokenized lazily, in index order."""
  return grain.MapDataset.source(source).map(Tokenize(tok, feature))


def pack_rows(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """int32[seq_len + 1] rows of the concatenated stream (grain's ConcatThenSplit).

  A finite stream's last, partial row (zero-padded by grain) is dropped.
  """
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs.map(lambda ids: {"tokens": ids}), length_struct={"tokens": seq_len + 1})
  return packed.filter(lambda r: bool(r["tokens_segment_ids"][-1])).map(lambda r: r["tokens"])


def to_batch(rows_BxS1: np.ndarray) -> Batch:
  rows_BxS1 = np.asarray(rows_BxS1, dtype=np.int32)
  return dict(inputs=np.ascontiguousarray(rows_BxS1[:, :-1]),
              targets=np.ascontiguousarray(rows_BxS1[:, 1:]))


def _json_safe(state: Any) -> Any:
  """A JSON-decoded iterator state as grain built it: slice pairs back to tuples.

  grain 0.2.18's ConcatThenSplit compares `remainder_slices` with the tuple
  (-1, -1); after the JSON round trip of its own orbax handler they are lists,
  and restoring would silently drop a partial document.
  """
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                else _json_safe(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_json_safe(v) for v in state]
  return state


class _Restorable(grain.DatasetIterator):
  """The outermost training iterator: restores states that went through JSON."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(_json_safe(state))


def train_iterator(docs: grain.MapDataset, seq_len: int, local_batch: int, seed: int,
                   window: int) -> grain.DatasetIterator:
  """Infinite local batches from this process's (sharded) tokenized documents."""
  rows = pack_rows(docs.shuffle(seed).repeat().to_iter_dataset(_READ), seq_len)
  if window > 1:
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=window, seed=seed)
  batches = rows.batch(local_batch, drop_remainder=True).map(to_batch)
  return _Restorable(iter(batches))


@dataclasses.dataclass
class Data:
  """Everything the trainer needs from the data side."""
  tokenizer: Tokenizer
  train: grain.DatasetIterator     # next() -> this process's slice of the next global batch
  train_docs: grain.MapDataset     # this process's documents, tokenized (one epoch, in order)
  eval_docs: grain.MapDataset      # all validation documents, tokenized, in order
  batch_size: int                  # global
  process_index: int
  process_count: int
  seq_len: int
  corpus: str
  fingerprint: str                 # corpus, tokenizer and stream settings
  _eval_rows: list = dataclasses.field(default_factory=list, repr=False)
  _eval_done: bool = False

  def _rows(self, n: int) -> list[np.ndarray]:
    """The first n packed validation rows (fewer if the split is shorter), cached."""
    if len(self._eval_rows) < n and not self._eval_done:
      it = iter(pack_rows(self.eval_docs.to_iter_dataset(_READ), self.seq_len))
      self._eval_rows.clear()
      for row in it:
        self._eval_rows.append(row)
        if len(self._eval_rows) >= n:
          break
      else:
        self._eval_done = True
    return self._eval_rows[:n]

  @property
  def num_eval_batches(self) -> int:
    """Global eval batches before eval_batches starts repeating rows (packs the whole split)."""
    return max(1, len(self._rows(2**62)) // self.batch_size)

  @property
  def num_eval_tokens(self) -> int:
    return sum(len(r) for r in self._rows(2**62))

  def eval_batches(self, n: int) -> list[Batch]:
    """n fixed validation batches (this process's slices), in order, wrapping if needed."""
    if n <= 0:
      return []
    rows = grain.MapDataset.source(self._rows(n * self.batch_size)).repeat()
    mine = rows[:n * self.batch_size][self.process_index::self.process_count]
    return list(mine.batch(self.batch_size // self.process_count).map(to_batch))


def _hold_out_tail(docs: grain.MapDataset, cfg: DataConfig) -> tuple[grain.MapDataset,
                                                                     grain.MapDataset]:
  """(train, eval) documents when a corpus has no validation split: the stream's tail.

  Tokenizes the whole split once: cheap for the single-file folders that lack one;
  a large catalog dataset without a validation or test split pays a full pass.
  """
  lengths = np.array([len(d) for d in docs])
  total, need = int(lengths.sum()), cfg.seq_len + 1
  n_val = max(int(cfg.eval_fraction * total), need)
  if total - n_val < need:
    raise ValueError(f"data.corpus={cfg.corpus!r} has only {total} tokens, too few for "
                     f"train and eval sequences of data.seq_len={cfg.seq_len}")
  _log.warning("data.corpus=%r has no validation documents; holding out its last %d tokens",
               cfg.corpus, n_val)
  keep = total - n_val
  last = int(np.searchsorted(np.cumsum(lengths), keep, side="left"))   # doc holding the cut
  cut = keep - int(lengths[:last].sum())
  train = docs[:last + 1].map_with_index(lambda i, d: d[:cut] if i == last else d)
  tail = np.concatenate([docs[last][cut:]] + [docs[i] for i in range(last + 1, len(docs))])
  return train, grain.MapDataset.source([tail])


def make_data(cfg: DataConfig, vocab_size: int, process_index: int = 0,
              process_count: int = 1) -> Data:
  """Corpus -> tokenizer -> grain streams: this process's training iterator and the eval set.

  data.corpus='task:NAME' returns a depth task's generated streams instead
  (mor.data.tasks.TaskData: same interface, no tokenizer).
  """
  if cfg.corpus.startswith("task:"):
    return tasks.make_task_data(cfg, process_index, process_count)
  local = _local_batch(cfg.batch_size, process_index, process_count)  # fail before any work
  data_dir = corpus_lib.resolve_data_dir(cfg.data_dir)
  splits = tfds_text.open_corpus(cfg.corpus, data_dir, cfg.eval_fraction)
  tok = get_tokenizer(cfg, vocab_size, tfds_text.iter_texts(splits.train, splits.feature),
                      corpus_key=splits.key)
  train = tokenized_docs(splits.train, tok, splits.feature)
  evals = (tokenized_docs(splits.validation, tok, splits.feature)
           if splits.validation is not None else None)
  first_row = (next(iter(pack_rows(evals.to_iter_dataset(_READ), cfg.seq_len)), None)
               if evals is not None else None)
  if first_row is None:
    train, evals = _hold_out_tail(train, cfg)   # no held-out document, or too short
  if len(train) < process_count:
    raise ValueError(f"data.corpus={cfg.corpus!r} has {len(train)} training documents, fewer "
                     f"than the {process_count} processes that each read their own")
  mine = train[process_index::process_count]
  fingerprint = corpus_lib.short_hash(splits.key, tok.fingerprint, cfg.seq_len, cfg.batch_size,
                                      cfg.seed, cfg.shuffle_window, process_count, "grain-v1")
  return Data(tokenizer=tok,
              train=train_iterator(mine, cfg.seq_len, local, cfg.seed, cfg.shuffle_window),
              train_docs=mine, eval_docs=evals, batch_size=cfg.batch_size,
              process_index=process_index, process_count=process_count, seq_len=cfg.seq_len,
              corpus=splits.name, fingerprint=fingerprint)


def measure_throughput(cfg: DataConfig, vocab_size: int, batches: int = 200) -> dict:
  """Tokens/s of the training iterator (after start-up), start-up and restore times."""
  tic = time.perf_counter()
  data = make_data(cfg, vocab_size)
  next(data.train)                       # fills grain's buffers and the first shuffle window
  startup = time.perf_counter() - tic
  tic = time.perf_counter()
  for _ in range(batches):
    next(data.train)
  dt = time.perf_counter() - tic
  state = json.loads(json.dumps(data.train.get_state()))
  tic = time.perf_counter()
  make_data(cfg, vocab_size).train.set_state(state)   # what a resume pays
  restore = time.perf_counter() - tic
  tokens = batches * cfg.batch_size * cfg.seq_len
  return {"batches": batches, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          "shuffle_window": cfg.shuffle_window, "data_tokens_per_s": tokens / dt,
          "data_batch_time_s": dt / batches, "startup_s": startup, "restore_s": restore}
