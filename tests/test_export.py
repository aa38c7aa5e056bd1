"""Every step lowers for GPU and TPU from this CPU host (jax.export, no compile).

At a tiny shape in the paper's dtypes (bf16 compute, f32 master weights, remat
on) and the default attention ("auto"): the full train step of every model
kind, also with its real shardings over the 8 fake devices; the cached prefill
and decode step; the serving engine's step. Each accelerator program must be
free of CPU-only custom calls, XLA:CPU options and the CPU-tuned loops
(basic.CPU_LOOP_SCOPE), and the TPU train step must reach the splash kernel.

Each platform is exported on its own: in jax 0.10 a Pallas TPU kernel inside
lax.platform_dependent cannot lower in one ("cuda", "tpu") module (the branch
is lowered for every platform of the module), and jit lowers for one platform
anyway. The traced jaxpr is cached by jit, so the second export only lowers.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from mor import config, decode, presets, sharding, train
from mor.layers.basic import CPU_LOOP_SCOPE
from mor.models import build_model
from mor.serving import Engine

PLATFORMS = ("cuda", "tpu")
SEQ, BATCH = 128, 8
# custom-call targets that only XLA:CPU implements (LAPACK, DUCC FFT, oneDNN, XNNPACK, ...)
CPU_ONLY = re.compile(r"cpu|lapack|ducc|onednn|mkl|xnn|eigen", re.IGNORECASE)
KINDS = {   # name: (kind, model overrides)
    "vanilla": ("vanilla", {}),
    "recursive": ("recursive", {}),
    "mor_ec": ("mor", {}),
    "mor_tc": ("mor", {"router": {"routing": "token_choice", "gate": "softmax", "alpha": 1.0}}),
    "moe_top2": ("moe", {"moe": {"router": "top2", "num_experts": 4}}),
    "moe_switch": ("moe", {"moe": {"router": "switch", "top_k": 1, "num_experts": 4}}),
    "moe_noisy_topk": ("moe", {"moe": {"router": "noisy_topk", "num_experts": 4}}),
}


def tiny(name: str, mesh: dict | None = None) -> config.Config:
  """The paper's dtypes and remat at a shape that traces in seconds.

  Recursive and MoR: middle-cycle 1 + 1 x 2 + 1 (token-choice routes after a unique
  first layer); the others 2 layers.
  """
  kind, over = KINDS[name]
  cfg = presets.tiny_config(kind, dtype="bfloat16", remat=True,
                           num_layers=4 if kind in ("recursive", "mor") else 2, d_model=64,
                           num_heads=4, num_kv_heads=2, ffn_dim=128, vocab_size=256,
                           num_recursions=2)
  return config.replace(cfg, model=over, data={"seq_len": SEQ, "batch_size": BATCH},
                        mesh=mesh or {"data": 1})


def custom_calls(text: str) -> set:
  return set(re.findall(r"custom_call @([\w.$-]+)", text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', text))


def check_accelerator(exp: export.Exported, platform: str) -> str:
  """Fails on anything CPU-specific in an exported accelerator program; returns its text."""
  assert exp.platforms == (platform,)
  text = exp.mlir_module()
  bad = sorted(t for t in custom_calls(text) if CPU_ONLY.search(t))
  assert not bad, f"CPU-only custom calls in the {platform} program: {bad}"
  assert "xla_cpu" not in text, f"an XLA:CPU option reached the {platform} program"
  assert CPU_LOOP_SCOPE not in text, f"a CPU-tuned loop reached the {platform} program"
  if platform == "cuda":
    assert "tpu_custom_call" not in custom_calls(text)
  return text


def export_all(fn, *args) -> dict:
  """{platform: text} of fn exported for each accelerator platform, each checked."""
  return {p: check_accelerator(export.export(fn, platforms=(p,))(*args), p) for p in PLATFORMS}


def step_args(s: train.Setup):
  state = jax.eval_shape(s.init, jax.random.key(0))
  tok = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=s.batch_sharding)
  return state, {"inputs": tok, "targets": tok}


@pytest.fixture(scope="module")
def single_device_steps():
  """{name: (setup, abstract args)} of the one-device train steps."""
  out = {}
  for name in KINDS:
    cfg = tiny(name)
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    out[name] = (s, step_args(s))
  return out


@pytest.mark.parametrize("name", list(KINDS))
def test_train_step_exports_for_gpu_and_tpu(single_device_steps, name):
  s, args = single_device_steps[name]
  texts = export_all(s.train_step.program, *args, s.train_step.schedule)
  # self-attention of every kind (MoR's gathered depths included) runs the splash kernel
  assert "tpu_custom_call" in custom_calls(texts["tpu"])


def test_cpu_loops_are_live_in_the_cpu_program(single_device_steps):
  """The marker the accelerator checks look for is really there on CPU (attention, MLP)."""
  s, args = single_device_steps["vanilla"]
  text = s.train_step.trace(*args).lower(lowering_platforms=("cpu",)).as_text(debug_info=True)
  for loop in ("attention", "swiglu"):
    assert f"{CPU_LOOP_SCOPE}_{loop}/while" in text, loop


@pytest.mark.parametrize("name,mesh", [   # MoR covers the dense blocks too
    ("mor_ec", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("moe_top2", {"data": 2, "expert": 2, "tensor": 2}),
])
def test_sharded_train_step_exports(name, mesh):
  cfg = tiny(name, mesh)
  s = train.setup(cfg)
  assert s.mesh.devices.size == 8
  step = s.train_step
  exp = export.export(step.program, platforms=("tpu",))(*step_args(s), step.schedule)
  check_accelerator(exp, "tpu")
  assert exp.nr_devices == 8
  # the state stays sharded over every mesh axis in use (not all replicated)
  specs = " ".join(str(sh.spec) for sh in exp.in_shardings_jax(s.mesh) if sh is not None)
  for axis, size in mesh.items():
    assert size == 1 or f"'{axis}'" in specs, (axis, specs[:300])
  exp = export.export(step.program, platforms=("cuda",))(*step_args(s), step.schedule)
  check_accelerator(exp, "cuda")


@pytest.mark.parametrize("name", ["vanilla", "mor_ec"])
def test_prefill_and_decode_step_export(name):
  cfg = tiny(name).model
  model = build_model(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  max_len, prompt_len = 32, 8

  def prefill(st, prompt_BxS):
    return decode.prefill(nnx.merge(graphdef, st), prompt_BxS, max_len)

  prompt = jnp.zeros((2, prompt_len), jnp.int32)
  export_all(jax.jit(prefill), state, prompt)
  _, caches = jax.eval_shape(prefill, state, prompt)

  def step(st, token_B, pos_B, caches):
    return decode.decode_step(nnx.merge(graphdef, st), token_B, pos_B, caches)

  export_all(jax.jit(step), state, jnp.zeros((2,), jnp.int32),
             jnp.full((2,), prompt_len, jnp.int32), caches)


def test_serving_engine_step_exports():
  model = build_model(tiny("mor_ec").model, nnx.Rngs(0))
  eng = Engine(model, num_slots=4, max_len=16, steps_per_call=2)
  for n in (3, 5):
    eng.submit(np.arange(1, n + 1), 4)
  st = eng.start()
  export_all(eng._chunk_fn(), eng.params, st)


def _script_command(text: str, module: str) -> list:
  """The flags scripts/device_check.sh passes to `python3 -m module` ($SHAPE expanded)."""
  joined = text.replace("\\\n", " ")
  shape = " ".join(re.findall(r'^SHAPE="(?:\$SHAPE )?([^"]*)"', joined, re.MULTILINE))
  line = next(ln for ln in joined.splitlines() if f"-m {module} " in ln)
  flags = line.split(f"-m {module} ", 1)[1].split(">", 1)[0]
  return flags.replace("$SHAPE", shape).split()


def test_device_check_script_parses_and_its_bench_flags_exist(monkeypatch):
  import subprocess
  import sys
  from experiments import bench_decode, bench_train
  path = "scripts/device_check.sh"
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  for mod, expect in ((bench_train, {"d_model": 960, "num_layers": 32, "dtype": "bfloat16",
                                     "remat": True, "seq_len": 2048, "vocab": 49152}),
                      (bench_decode, {"d_model": 960, "no_trained": True})):
    argv = _script_command(text, mod.__name__)
    monkeypatch.setattr(sys, "argv", [mod.__name__, *argv])
    args = mod.parse()              # an unknown or malformed flag exits here
    for k, v in expect.items():
      assert getattr(args, k) == v, (mod.__name__, k)
