"""Metrics outputs: TensorBoard events equal metrics.jsonl, optional W&B, progress bar or lines."""
import io
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mor import config, metrics, presets, train
from test_train import ArrayData


def tiny_mor_cfg(**train_kw):
  base = config.to_dict(presets.tiny_config("mor"))
  base["model"].update(vocab_size=256, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64,
                       num_layers=4, num_recursions=2, max_seq_len=16)
  base["data"].update(seq_len=16, batch_size=8)
  base["train"].update(steps=4, log_every=2, eval_every=2, eval_batches=1, checkpoint_every=0,
                       peak_flops=1e11)
  base["train"].update(train_kw)
  return config.from_dict(base)


def read_events(workdir) -> dict[str, dict[int, float]]:
  acc = EventAccumulator(str(workdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def expected_tags(rows) -> dict[str, dict[int, float]]:
  """metrics.jsonl as TensorBoard would hold it: train/..., eval/..., list entries split."""
  out = {}
  for row in rows:
    kind = "eval" if "eval_nll" in row else "train"
    for tag, v in metrics.scalars(row, f"{kind}/").items():
      out.setdefault(tag, {})[row["step"]] = float(np.float32(v))   # events hold float32
  return out


def test_tensorboard_events_equal_metrics_jsonl(tmp_path, monkeypatch):
  """A tiny MoR run: every scalar of metrics.jsonl is in the event files, and nothing else.

  Read back with tensorboard's own EventAccumulator (no TensorFlow). Catches
  scalars missing from TensorBoard (eval rows, routing stats, aux losses,
  per-depth vectors), wrong steps or values, and a W&B import when it is off
  (`import wandb` would raise here).
  """
  monkeypatch.setitem(sys.modules, "wandb", None)
  cfg = tiny_mor_cfg()
  train.run(cfg, str(tmp_path), data=ArrayData(cfg))
  rows = metrics.read_metrics(str(tmp_path))
  want, got = expected_tags(rows), read_events(tmp_path)
  assert got == want
  assert {"train/loss", "train/lr", "eval/eval_nll", "eval/eval_nll_topk"} <= set(got)
  assert any(t.startswith("train/aux_loss/") for t in got)
  assert any(t.startswith("train/stats/") and t[-2:] == "/0" for t in got)   # a 1-D stat
  assert set(got["train/loss"]) == {2, 4} and set(got["eval/eval_nll"]) == {2, 4}


def test_tensorboard_can_be_turned_off(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"loss": 2.0})
  w.close()
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


class FakeWandb(types.ModuleType):
  """Records what mor sends to W&B."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], 0

  def init(self, **kw):
    self.inits.append(kw)
    return self

  def log(self, values, step):
    self.logged.append((step, dict(values)))

  def finish(self):
    self.finished += 1


def test_wandb_logs_the_same_scalars(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  w = metrics.MetricsWriter(str(tmp_path), wandb_project="proj", config={"a": 1})
  w.write(10, {"loss": 2.5, "stats/depth": [0.5, 0.25]})
  w.write(10, {"eval_nll": 3.0}, kind="eval")
  w.close()
  assert fake.inits[0]["project"] == "proj" and fake.inits[0]["config"] == {"a": 1}
  assert fake.logged == [(10, {"train/loss": 2.5, "train/stats/depth/0": 0.5,
                               "train/stats/depth/1": 0.25}), (10, {"eval/eval_nll": 3.0})]
  assert fake.finished == 1


def test_wandb_missing_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)     # `import wandb` raises ImportError
  cfg = config.replace(tiny_mor_cfg(wandb="proj"), data={"corpus": str(tmp_path / "none")})
  with pytest.raises(ImportError, match=r"^train.wandb='proj' needs the wandb package") as e:
    train.run(cfg, str(tmp_path / "wd"))             # data=None: the corpus would fail next
  assert "\n" not in str(e.value)


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_on_a_terminal_and_lines_otherwise():
  """Same fields either way: a tqdm bar when the stream is a terminal, plain lines if not."""
  values = {"loss": 2.5, "tokens_per_s": 1234.5, "mfu": 0.125}
  plain = io.StringIO()
  p = metrics.Progress(10, 0, stream=plain)
  assert p.bar is None
  p.advance(3)
  p.log(5, values)
  p.close()
  line = plain.getvalue()
  assert line.startswith("[5/10] loss=2.5 tokens_per_s=1234 mfu=0.125 eta=") and \
      line.count("\n") == 1
  tty = Terminal()
  p = metrics.Progress(10, 0, stream=tty)
  assert p.bar is not None
  p.advance(3)
  p.log(5, values)
  p.close()
  out = tty.getvalue()
  assert "5/10" in out and "loss=2.5" in out and "tokens_per_s=1234" in out and \
      "mfu=0.125" in out and "[5/10]" not in out


def test_peak_meter_remeasures_the_cpu_rate_and_keeps_pins(monkeypatch):
  calls = []
  monkeypatch.setattr(metrics, "matmul_flop_rate",
                      lambda n=2048, repeats=8: calls.append(1) or [1e11 * len(calls)] * repeats)
  now = [0.0]
  meter = metrics.PeakMeter(clock=lambda: now[0])
  ndev = metrics.jax.local_device_count()
  assert meter() == pytest.approx(1e11 / ndev) and len(calls) == 1
  now[0] = metrics.PEAK_RESAMPLE_S / 2
  assert meter() == pytest.approx(1e11 / ndev) and len(calls) == 1   # recent: reused
  now[0] = metrics.PEAK_RESAMPLE_S * 1.5
  assert meter() == pytest.approx(2e11 / ndev) and len(calls) == 2   # stale: measured again
  pinned = metrics.PeakMeter(5e10, clock=lambda: now[0])
  now[0] = 1e9
  assert pinned() == 5e10 and len(calls) == 2


def test_training_mfu_uses_a_peak_measured_beside_each_window(tmp_path, monkeypatch):
  # a host whose matmul rate halves between log lines: a start-up peak would misstate MFU 2x
  rates = iter([4e11, 2e11, 1e11, 5e10])
  monkeypatch.setattr(metrics, "matmul_flop_rate",
                      lambda n=2048, repeats=8: [next(rates)] * repeats)
  monkeypatch.setattr(metrics, "PEAK_RESAMPLE_S", 0.0)
  cfg = tiny_mor_cfg(peak_flops=0.0, eval_every=0, steps=6)
  train.run(cfg, str(tmp_path), data=ArrayData(cfg))
  rows = [r for r in metrics.read_metrics(str(tmp_path)) if "mfu" in r]
  ndev = metrics.jax.device_count()
  assert [r["peak_flops"] * ndev for r in rows] == pytest.approx([4e11, 2e11, 1e11])
  for r in rows:
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] * 1e12 / (r["peak_flops"] * ndev))
