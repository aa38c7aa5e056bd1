"""SentencePiece tokenizer: load a .model file or train BPE on the corpus (seconds).

Trained models are lossless (identity normalisation, whitespace kept, byte
fallback), so decode(encode(text)) == text, and use the ids pad=0, unk=1,
bos=2, eos=3. They are cached under <data_dir>/tokenizers/, keyed by the
corpus fingerprint, the vocabulary size and the trainer settings.
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
from typing import Iterable, Sequence

import sentencepiece as spm

from mor.config import DataConfig
from mor.data import corpus as corpus_lib

SAMPLE_BYTES = 20_000_000       # training sample cap; BPE on 11 MB takes ~2 s
_MAX_PIECE_CHARS = 4000         # SentencePiece drops training "sentences" over its max length
_TRAINER_ARGS = dict(
    model_type="bpe", character_coverage=0.9995, byte_fallback=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
    pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=4 * _MAX_PIECE_CHARS + 16,
    shuffle_input_sentence=False, minloglevel=2)


class Tokenizer:
  """A SentencePiece model with the special ids the pipeline needs."""

  def __init__(self, model_path: str | os.PathLike):
    self.path = pathlib.Path(model_path)
    proto = self.path.read_bytes()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.fingerprint = hashlib.sha256(proto).hexdigest()[:16]
    if self._sp.eos_id() < 0:
      raise ValueError(f"tokenizer {self.path} has no end-of-text (eos) piece; the pipeline "
                       "separates documents with it")

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def pad_id(self) -> int:
    """The pad piece, or eos for models without one (padding is always masked anyway)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Encodes many texts in parallel (num_threads=-1: one per core)."""
    threads = (os.cpu_count() or 1) if num_threads < 0 else num_threads
    return self._sp.encode(list(texts), num_threads=threads)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def __repr__(self) -> str:
    return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def training_sample(texts: Iterable[str], max_bytes: int = SAMPLE_BYTES) -> list[str]:
  """Paragraph-sized training "sentences" from the first max_bytes of the documents."""
  pieces, total = [], 0
  for doc in texts:
    for para in doc.split("\n\n"):
      if not para.strip():
        continue
      for start in range(0, len(para), _MAX_PIECE_CHARS):
        pieces.append(para[start:start + _MAX_PIECE_CHARS])
        total += len(pieces[-1])
      if total >= max_bytes:
        return pieces
  return pieces


def train_bpe(sentences: Iterable[str], vocab_size: int, path: pathlib.Path) -> None:
  """Trains a lossless BPE model and writes it to path (atomically)."""
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf,
                                   vocab_size=vocab_size, num_threads=os.cpu_count() or 1,
                                   **_TRAINER_ARGS)
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1].rpartition("] ")[2]  # drop the C++ location
    raise ValueError(f"model.vocab_size={vocab_size}: SentencePiece cannot train a vocabulary of "
                     f"that size on this corpus ({reason})") from None
  corpus_lib.atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


def _hash_texts(texts: Sequence[str]) -> str:
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode("utf-8", errors="replace"))
    h.update(b"\0")
  return h.hexdigest()[:16]


def get_tokenizer(cfg: DataConfig, vocab_size: int, texts_iter: Iterable[str],
                  corpus_key: str | None = None) -> Tokenizer:
  """Loads data.tokenizer, or trains (once, cached) a BPE model on texts_iter.

  texts_iter yields the training documents; it is only consumed when the model is
  not cached yet if corpus_key (a fingerprint of the documents) is given.
  """
  if cfg.tokenizer:
    path = pathlib.Path(cfg.tokenizer).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer!r} does not exist; give a "
                              "SentencePiece .model file or '' to train one on the corpus")
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size:
      raise ValueError(f"data.tokenizer={cfg.tokenizer!r} has {tok.vocab_size} pieces but "
                       f"model.vocab_size={vocab_size}; they must match")
    return tok
  sample = None
  if corpus_key is None:
    sample = training_sample(texts_iter)
    corpus_key = _hash_texts(sample)
  key = corpus_lib.short_hash(corpus_key, vocab_size, sorted(_TRAINER_ARGS.items()), SAMPLE_BYTES)
  path = corpus_lib.resolve_data_dir(cfg.data_dir) / "tokenizers" / f"bpe{vocab_size}-{key}.model"
  if not path.exists():
    with corpus_lib.locked(path):
      if not path.exists():
        train_bpe(sample if sample is not None else training_sample(texts_iter), vocab_size, path)
  return Tokenizer(path)
