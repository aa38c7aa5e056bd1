"""Data: default corpus, tfds text builder, SentencePiece tokenizer, grain input pipeline.

Exports resolve lazily, so `python -m mor.data.corpus` runs without importing
(and warning about) its own module twice, and without loading tfds.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # static names for type checkers and IDEs
  from mor.data.corpus import ensure_default_corpus, resolve_data_dir
  from mor.data.pipeline import Data, make_data
  from mor.data.tokenizer import Tokenizer, get_tokenizer

_EXPORTS = {
    "ensure_default_corpus": "corpus", "resolve_data_dir": "corpus",
    "Data": "pipeline", "make_data": "pipeline",
    "Tokenizer": "tokenizer", "get_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mor.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'mor.data' has no attribute {name!r}")
