"""Token streams packed into fixed-length sequences, sharded across processes.

Documents are tokenized once (cached as .npy under <data_dir>/tokens/), each
followed by EOS, concatenated, and cut into non-overlapping rows of seq_len + 1
tokens: inputs are the first seq_len, targets the same row shifted by one. The
training iterator shuffles rows per epoch from (seed, epoch), so its position
is just a step counter and restoring it reproduces the same batches.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Iterator

import numpy as np

from mor.config import DataConfig
from mor.data import corpus as corpus_lib
from mor.data import tfds_text
from mor.data.tokenizer import Tokenizer, get_tokenizer

_log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]    # inputs, targets: int32[B_local, S]
_DOCS_PER_CHUNK = 256


def tokenize_docs(tok: Tokenizer, source: Any, feature: str) -> np.ndarray:
  """All documents of a data source as one stream, each followed by EOS."""
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
  parts, docs = [], []

  def flush():
    for ids in tok.encode_batch(docs):
      parts.append(np.asarray(ids + [tok.eos_id], dtype))
    docs.clear()

  for text in tfds_text.iter_texts(source, feature, chunk=_DOCS_PER_CHUNK):
    docs.append(text)
    if len(docs) == _DOCS_PER_CHUNK:
      flush()
  flush()
  return np.concatenate(parts) if parts else np.zeros([0], dtype)


def cached_tokens(tok: Tokenizer, source: Any, feature: str, path: pathlib.Path) -> np.ndarray:
  """tokenize_docs, memoised in path (memory-mapped on load)."""
  if not path.exists():
    with corpus_lib.locked(path):
      if not path.exists():
        tokens = tokenize_docs(tok, source, feature)
        corpus_lib.atomic_write(path, lambda tmp: np.save(tmp, tokens))
  return np.load(path, mmap_mode="r")


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """[N, seq_len + 1] view of the stream; the final partial row is dropped."""
  n = len(tokens) // (seq_len + 1)
  return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _to_batch(rows_BxS1: np.ndarray) -> Batch:
  rows_BxS1 = np.asarray(rows_BxS1, dtype=np.int32)
  return dict(inputs=np.ascontiguousarray(rows_BxS1[:, :-1]),
              targets=np.ascontiguousarray(rows_BxS1[:, 1:]))


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"data.batch_size={batch_size} must be divisible by the number of "
                     f"processes ({process_count})")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class PackedDataset:
  """Infinite iterator of this process's slice of each shuffled global batch."""

  def __init__(self, seqs_NxS1: np.ndarray, batch_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, fingerprint: str = ""):
    self.seqs_NxS1 = seqs_NxS1
    self.batch_size = batch_size
    self.seed = seed
    self.fingerprint = fingerprint
    self.local_slice = _local_slice(batch_size, process_index, process_count)
    self.num_sequences = len(seqs_NxS1)
    if self.num_sequences < batch_size:
      raise ValueError(
          f"the training split has {self.num_sequences} sequences of data.seq_len+1="
          f"{seqs_NxS1.shape[1]} tokens, fewer than one batch (data.batch_size={batch_size}); "
          "use a bigger corpus or a smaller data.seq_len / data.batch_size")
    self.steps_per_epoch = self.num_sequences // batch_size  # the ragged tail is skipped
    self.step = 0
    self._perm_epoch, self._perm = -1, None

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm, self._perm_epoch = rng.permutation(self.num_sequences), epoch
    return self._perm

  def global_rows(self, step: int) -> np.ndarray:
    """Row indices of the whole global batch at a step (all processes)."""
    epoch, b = divmod(step, self.steps_per_epoch)
    return self._permutation(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    rows = self.global_rows(self.step)[self.local_slice]
    self.step += 1
    # Sorted reads are faster on a memory map; restore the shuffled order afterwards.
    order = np.argsort(rows)
    out_BxS1 = np.empty([len(rows), self.seqs_NxS1.shape[1]], self.seqs_NxS1.dtype)
    out_BxS1[order] = self.seqs_NxS1[rows[order]]
    return _to_batch(out_BxS1)

  def get_state(self) -> dict:
    """JSON-serialisable position; set_state(get_state()) replays the same next batches."""
    return dict(step=int(self.step), epoch=int(self.epoch), fingerprint=self.fingerprint)

  def set_state(self, state: dict) -> None:
    if state.get("fingerprint", self.fingerprint) != self.fingerprint:
      _log.warning("data state was saved for a different corpus/tokenizer/seq_len/batch/seed "
                      "(%s != %s); resuming at step %d anyway", state["fingerprint"],
                      self.fingerprint, state["step"])
    self.step = int(state["step"])


@dataclasses.dataclass
class Data:
  """Everything the trainer needs from the data side."""
  tokenizer: Tokenizer
  train: PackedDataset
  eval_seqs_NxS1: np.ndarray
  num_train_tokens: int         # tokens in the training stream (EOS included)
  num_eval_tokens: int
  corpus: str

  @property
  def num_eval_batches(self) -> int:
    """Global eval batches before eval_batches starts repeating sequences."""
    return max(1, len(self.eval_seqs_NxS1) // self.train.batch_size)

  def eval_batches(self, n: int) -> list[Batch]:
    """n fixed validation batches (this process's slices), in order, wrapping if needed."""
    b, rows = self.train.batch_size, np.arange(self.train.batch_size)[self.train.local_slice]
    return [_to_batch(self.eval_seqs_NxS1[(i * b + rows) % len(self.eval_seqs_NxS1)])
            for i in range(n)]


def make_data(cfg: DataConfig, vocab_size: int, process_index: int = 0,
              process_count: int = 1) -> Data:
  """Corpus -> tokenizer -> cached token streams -> packed train iterator and eval set."""
  _local_slice(cfg.batch_size, process_index, process_count)  # fail before any work
  data_dir = corpus_lib.resolve_data_dir(cfg.data_dir)
  splits = tfds_text.open_corpus(cfg.corpus, data_dir, cfg.eval_fraction)
  tok = get_tokenizer(cfg, vocab_size, tfds_text.iter_texts(splits.train, splits.feature),
                      corpus_key=splits.key)
  prefix = data_dir / "tokens" / f"{splits.key}-{tok.fingerprint}"
  train = cached_tokens(tok, splits.train, splits.feature, pathlib.Path(f"{prefix}-train.npy"))
  need = cfg.seq_len + 1
  val = (cached_tokens(tok, splits.validation, splits.feature,
                       pathlib.Path(f"{prefix}-validation.npy"))
         if splits.validation is not None else train[:0])
  if len(val) < need:
    # No held-out documents (e.g. a single file): hold out the tail of the stream instead.
    n_val = max(int(cfg.eval_fraction * len(train)), need)
    if len(train) - n_val < need:
      raise ValueError(f"data.corpus={cfg.corpus!r} has only {len(train)} tokens, too few for "
                       f"train and eval sequences of data.seq_len={cfg.seq_len}")
    _log.warning("data.corpus=%r has no validation documents; holding out its last %d "
                    "tokens", cfg.corpus, n_val)
    train, val = train[:-n_val], train[-n_val:]
  fingerprint = corpus_lib.short_hash(splits.key, tok.fingerprint, cfg.seq_len, cfg.batch_size,
                                      cfg.seed)
  dataset = PackedDataset(pack(train, cfg.seq_len), cfg.batch_size, cfg.seed, process_index,
                          process_count, fingerprint)
  return Data(tokenizer=tok, train=dataset, eval_seqs_NxS1=pack(val, cfg.seq_len),
              num_train_tokens=len(train), num_eval_tokens=len(val), corpus=splits.name)
