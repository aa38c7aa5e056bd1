"""Parameter-sharing plans: which unique block each applied layer uses.

With L applied layers and N_r recursions (REFERENCE.md section 1):
- cycle: B = L / N_r blocks applied in order N_r times (0..B-1, 0..B-1, ...).
- sequence: B blocks, each applied N_r times in a row (0,0,0, 1,1,1, ...).
- middle_cycle: first and last layers unique; the middle L - 2 layers cycle.
- middle_sequence: first and last unique; the middle in sequence groups.
A plan is prefix + recursion unit x N_r + suffix; MoR routes between the unit's
applications, so it needs cycle or middle_cycle.
"""
from __future__ import annotations

from dataclasses import dataclass

from mor.config import ModelConfig


@dataclass(frozen=True)
class Plan:
  prefix: tuple[int, ...]     # unique blocks applied once before the recursions
  unit: tuple[int, ...]       # shared blocks applied per recursion (cycle) or repeated (sequence)
  suffix: tuple[int, ...]
  num_recursions: int
  cycle: bool

  @property
  def num_blocks(self) -> int:
    return len(self.prefix) + len(self.unit) + len(self.suffix)

  @property
  def applied(self) -> tuple[int, ...]:
    """Block index of every applied layer, in order."""
    if self.cycle:
      middle = self.unit * self.num_recursions
    else:
      middle = tuple(b for b in self.unit for _ in range(self.num_recursions))
    return self.prefix + middle + self.suffix


def make_plan(cfg: ModelConfig) -> Plan:
  if cfg.kind in ("vanilla", "moe"):
    return Plan((), tuple(range(cfg.num_layers)), (), 1, True)
  middle = cfg.sharing.startswith("middle_")
  n_shared = cfg.num_layers - 2 if middle else cfg.num_layers
  width = n_shared // cfg.num_recursions
  first = 1 if middle else 0
  unit = tuple(range(first, first + width))
  prefix, suffix = ((0,), (first + width,)) if middle else ((), ())
  return Plan(prefix, unit, suffix, cfg.num_recursions, cfg.sharing.endswith("cycle"))
