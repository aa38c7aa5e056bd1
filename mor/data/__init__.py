"""Data: default corpus, tfds text builder, SentencePiece tokenizer, packed batches."""
from mor.data.corpus import ensure_default_corpus, resolve_data_dir
from mor.data.pipeline import Data, PackedDataset, make_data
from mor.data.tokenizer import Tokenizer, get_tokenizer

__all__ = ["Data", "PackedDataset", "Tokenizer", "ensure_default_corpus", "get_tokenizer",
           "make_data", "resolve_data_dir"]
