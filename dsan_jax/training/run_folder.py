"""The folder of one training run, ``<workdir>/<variant>/fold_<k>/``, and reading it back.

  config.json             the config, with the implementations chosen by dsan_jax.runtime and
                          its ``runtime`` section (backend, devices, XLA flags, oneDNN)
  metrics.jsonl / .csv    one row per epoch (train loss, validation metrics, throughput)
  val_predictions.csv     per-case validation predictions of the best epoch
  checkpoints/latest/     Orbax: state, data iterator state, meta (resume from here)
  checkpoints/best/       Orbax: the best epoch's state
  done.json               written last; its presence means the run is complete
  .owner.lock             held (fcntl.flock) by the process training the run: one owner at a time
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Any

import ml_collections
import numpy as np

from dsan_jax import files, run_lock, runtime, variants
from dsan_jax.errors import DsanError, ResourceError
from dsan_jax.models.dsan import model_from_config
from dsan_jax.training import checkpoints, optim, sharding, steps

PREDICTION_FIELDS = ("case_id", "label", "ratio", "prob")
EVALUATION_DIR = "evaluation"  # <workdir>/evaluation/: evaluate.py's output, not a variant.
_FOLD_RE = re.compile(r"^fold_(\d+)$")


def run_dir(workdir: str | os.PathLike, variant: str, fold: int) -> pathlib.Path:
  return pathlib.Path(workdir) / variant / f"fold_{fold}"


def is_complete(workdir, variant: str, fold: int) -> bool:
  return (run_dir(workdir, variant, fold) / "done.json").exists()


def run_status(rd: str | os.PathLike) -> str:
  """"complete", "in progress (pid P on host H since T)", or "interrupted" (neither)."""
  rd = pathlib.Path(rd)
  if (rd / "done.json").exists():
    return "complete"
  owner = run_lock.run_owner(rd)
  return f"in progress ({owner.describe()})" if owner else "interrupted"


def incomplete_note(variant: str, fold: int, rd: str | os.PathLike) -> str | None:
  """One line about a run that is not complete (None for a complete one), for the readers."""
  rd = pathlib.Path(rd)
  if (rd / "done.json").exists():
    return None
  owner = run_lock.run_owner(rd)
  what = (f"still being trained ({owner.describe()})" if owner else
          "interrupted (nobody trains it; rerun its train.py command to finish it)")
  return f"{variant} fold {fold} is {what}: its best checkpoint so far is used"


@dataclasses.dataclass(frozen=True)
class RunInfo:
  variant: str
  fold: int
  run_dir: pathlib.Path


def _has_best(rd: pathlib.Path) -> bool:
  best = rd / "checkpoints" / "best"
  return (rd / "config.json").exists() and best.is_dir() and any(
      p.is_dir() and p.name.isdigit() for p in best.iterdir())


def _variant_order(name: str) -> tuple[int, str]:
  order = list(variants.VARIANTS)
  return (order.index(name) if name in order else len(order), name)


def find_runs(workdir: str | os.PathLike) -> list[RunInfo]:
  """Every ``<workdir>/<variant>/fold_<k>`` that has a config and a best checkpoint.

  Returns:
    RunInfo list sorted by variant (Table II order first) and fold.
  """
  root = pathlib.Path(workdir)
  runs = []
  if root.is_dir():
    for vdir in root.iterdir():
      if not vdir.is_dir() or vdir.name == EVALUATION_DIR:
        continue
      for fdir in vdir.iterdir():
        m = _FOLD_RE.match(fdir.name)
        if m and fdir.is_dir() and _has_best(fdir):
          runs.append(RunInfo(vdir.name, int(m.group(1)), fdir))
  return sorted(runs, key=lambda r: (_variant_order(r.variant), r.fold))


def check_workdir(path: pathlib.Path, need_bytes: int) -> None:
  """Fails early, with a clear message, when ``path`` is not writable or too full."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = files.temp_path(path / "write_test")  # Unique: other commands may probe at once.
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    raise ResourceError(f"{path}: work directory is not writable ({e.strerror or e})") from None
  free = shutil.disk_usage(path).free
  if free < need_bytes:
    raise ResourceError(f"{path}: only {free / 2**30:.2f} GiB free, the run needs about "
                        f"{need_bytes / 2**30:.2f} GiB (checkpoints and cache)")


def write_predictions(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  """Per-case predictions as CSV, written atomically."""
  with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=PREDICTION_FIELDS)
    w.writeheader()
    for r in rows:
      w.writerow(r)


def read_predictions(path: pathlib.Path) -> list[dict[str, Any]]:
  with open(path) as f:
    return [dict(case_id=r["case_id"], label=int(r["label"]), ratio=float(r["ratio"]),
                 prob=float(r["prob"])) for r in csv.DictReader(f)]


def prediction_rows(dataset, pred: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  return [dict(case_id=dataset.case_ids[i], label=int(l), ratio=float(r), prob=float(p))
          for i, l, r, p in zip(pred["index"], pred["label"], pred["ratio"], pred["prob"])]


@dataclasses.dataclass
class TrainedModel:
  """A run's config, network and restored (best or latest) state."""
  config: ml_collections.ConfigDict  # With this process's ``runtime`` section.
  model: Any
  state: Any
  meta: dict
  run_dir: pathlib.Path


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """A run's ``config.json`` as a ConfigDict."""
  return ml_collections.ConfigDict(json.loads(pathlib.Path(path).read_text()))


def load_trained(rd: str | os.PathLike, mesh=None, which: str = "best") -> TrainedModel:
  """Restores a run's ``best`` (default) or ``latest`` checkpoint for inference.

  Args:
    rd: the run folder ``<workdir>/<variant>/fold_<k>``.
    mesh: restore onto this mesh (default: all devices).
    which: "best" or "latest".
  """
  rd = pathlib.Path(rd)
  if not (rd / "config.json").exists():
    raise DsanError(f"{rd}: not a training run (no config.json)")
  config = runtime.resolve_config(load_config(rd / "config.json"), recorded=True)
  model = model_from_config(config.model, config.runtime.device_count)
  mesh = mesh or sharding.make_mesh()
  tx = optim.make_optimizer(config.optim, 1)
  input_shape = (1, *config.data.target_shape)
  abstract = steps.abstract_train_state(model, tx, config.seed, input_shape)
  ckpts = checkpoints.RunCheckpoints(rd, read_only=True)  # The run may be in progress.
  try:
    state, _, meta = ckpts.restore(which, abstract, mesh)
  except FileNotFoundError:
    raise DsanError(f"{rd}: no {which} checkpoint (has this run trained an epoch?)") from None
  finally:
    ckpts.close()
  return TrainedModel(config=config, model=model, state=state, meta=meta, run_dir=rd)
