"""Per-epoch metrics of a run: JSONL (the record), CSV (for spreadsheets), TensorBoard if installed."""

import csv
import json
import os
import pathlib
from typing import Any, Mapping

from dsan_jax import files
from dsan_jax.files import jsonable


class RunLog:
  """Appends one row per epoch to ``metrics.jsonl`` and ``metrics.csv`` in ``run_dir``."""

  def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
    self.dir = pathlib.Path(run_dir)
    self.jsonl = self.dir / "metrics.jsonl"
    self.csv = self.dir / "metrics.csv"
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # Optional dependency.
        self._tb = SummaryWriter(str(self.dir / "tensorboard"))
      except ImportError:
        self._tb = None

  def rows(self) -> list[dict[str, Any]]:
    if not self.jsonl.exists():
      return []
    with open(self.jsonl) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate(self, num_epochs_done: int) -> None:
    """Drops rows of epochs that a resumed run will redo (``epoch >= num_epochs_done``)."""
    self._rewrite([r for r in self.rows() if r["epoch"] < num_epochs_done])

  def _rewrite(self, rows) -> None:
    self.dir.mkdir(parents=True, exist_ok=True)
    files.write_text(self.jsonl, "".join(
        json.dumps({k: jsonable(v) for k, v in r.items()}) + "\n" for r in rows))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
    with files.atomic_path(self.csv) as tmp, open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=keys)
      w.writeheader()
      for r in rows:
        w.writerow({k: jsonable(v) for k, v in r.items()})

  def write(self, row: Mapping[str, Any]) -> None:
    row = {k: jsonable(v) for k, v in row.items()}
    self._rewrite(self.rows() + [row])
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "epoch":
          self._tb.add_scalar(k, v, row["epoch"])
      self._tb.flush()
