"""Number formatting and Markdown tables shared by the evaluation's reports."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def fmt(x: Any, digits: int = 3) -> str:
  """A float with ``digits`` decimals ("n/a" for None and NaN); other values as ``str``."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def fmt_p(p: float | None) -> str:
  """A p-value: "< 0.001" below 0.001, else three decimals ("n/a" for None and NaN)."""
  if p is None or math.isnan(p):
    return "n/a"
  return "< 0.001" if p < 0.001 else f"{p:.3f}"


def pm(mean: float, std: float) -> str:
  """``mean ± std`` (just the mean when the std is NaN)."""
  if math.isnan(std):
    return fmt(mean)
  return f"{fmt(mean)} ± {fmt(std)}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  """Markdown table lines (and a blank line after)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines + [""]
