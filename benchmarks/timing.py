"""Timing shared by the benchmarks: interleaved repetitions, so every variant sees the same noise."""

import time
from typing import Callable


def interleave(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
  """Runs each function once per repetition, in turn; returns the wall times of each, in s."""
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times
