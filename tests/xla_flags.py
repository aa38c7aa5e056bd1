"""XLA flags for compile speed, shared by the test process and the subprocesses tests start.

Tests compile far more than they run (backend compile was ~60% of the suite's CPU
time), so codegen is set for compile speed: LLVM at level 0, and XLA's older IR
emitters for fusions instead of the MLIR fusion emitters. Together they cut the
sharded MoR train step's compile from ~8 s to ~4.5 s on 2 cores; the HLO, and
so every number, is unchanged (the same loss to 1e-6). No imports: conftest reads
this before JAX starts.
"""
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
