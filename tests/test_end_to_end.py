"""End to end on configs/smoke.py: train (3 variants) -> checkpoint -> evaluate -> predict.

The trained work directory is shared with tests/test_evaluation.py and tests/test_predict.py
(``trained_workdir`` below, imported there): it is built once per test session (and once across
pytest-xdist workers, under a file lock) by the real command line,

  python train.py --config configs/smoke.py --protocol --folds 0 --workdir W \
      --config.train.num_epochs=1 --noprogress

which trains rn34_us, att_rn34_us and att_rn34_ss on fold 0 and then runs the evaluation. It runs
with XLA_FLAGS=--xla_backend_optimization_level=0 (``FAST_COMPILE``): the run is dominated by
compiling the three variants' steps (~116 -> ~60 CPU-seconds), and nothing here depends on how
XLA optimises. The tests check the files, the protocol's bookkeeping, and predictions made by
this test process (default optimisation) against the run's own, to 5e-3 or by structure.
"""

import csv
import fcntl
import json
import math
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("rn34_us", "att_rn34_us", "att_rn34_ss")
MODELS = VARIANTS + ("att_rn34_ds",)
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
TRAIN_ARGS = ("--config", "configs/smoke.py", "--protocol", "--folds", "0",
              "--config.train.num_epochs=1", "--noprogress")


# XLA at optimisation level 0: compiles the tiny networks about twice as fast.
FAST_COMPILE = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                              + " --xla_backend_optimization_level=0").strip()}


def _env(extra=None):
  env = dict(os.environ, **(extra or {}))
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_cli(args, timeout=900, env=None):
  """Runs a command line from the repository root (``env``: extra variables); returns
  CompletedProcess (text)."""
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(env),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """A work directory with the three variants trained on fold 0 of the smoke set, evaluated."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # Shared by the workers of one session.
  root = base / "dsan_smoke_workdir"
  marker = root / ".fixture_complete"
  with open(base / "dsan_smoke_workdir.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not marker.exists():
      res = run_cli(["train.py", *TRAIN_ARGS, "--workdir", str(root)], env=FAST_COMPILE)
      assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
      (root / ".train_stdout").write_text(res.stdout)
      marker.write_text("ok")
  return root


def smoke_manifest(workdir: pathlib.Path) -> pathlib.Path:
  (manifest,) = (workdir / "synthetic").glob("*/manifest.csv")
  return manifest


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def in_unit_or_none(x) -> bool:
  return x is None or (isinstance(x, (int, float)) and 0.0 <= x <= 1.0)


@pytest.mark.slow
def test_train_evaluate_predict(trained_workdir, tmp_path):
  w = trained_workdir
  # ---- train + checkpoint: every run folder is complete.
  for v in VARIANTS:
    rd = w / v / "fold_0"
    for name in ("config.json", "metrics.jsonl", "val_predictions.csv", "done.json"):
      assert (rd / name).is_file(), rd / name
    for which in ("best", "latest"):
      steps = [p for p in (rd / "checkpoints" / which).iterdir() if p.name.isdigit()]
      assert len(steps) == 1, (rd, which)
    done = json.loads((rd / "done.json").read_text())
    assert done["variant"] == v and done["fold"] == 0 and done["best_epoch"] == 0
    rows = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines() if l]
    assert [r["epoch"] for r in rows] == [0]
    assert math.isfinite(rows[0]["train_loss"]) and rows[0]["train_loss"] > 0

  # ---- evaluate (run by the protocol at the end of training).
  ev = w / "evaluation"
  for name in ("report.md", "metrics.json", "table2.csv", "table3.csv", "ttests.csv",
               "delong.csv", "predictions.csv", "attention.csv", "attention_cases.csv",
               "runs.csv", "ensemble.json", "roc_val.png"):
    assert (ev / name).is_file(), name
  assert len(list((ev / "attention").glob("*.png"))) >= 2
  assert sorted(p.name for p in (ev / "curves").glob("*.png")) == sorted(
      f"{v}_fold0.png" for v in VARIANTS)
  report_md = (ev / "report.md").read_text()
  assert "NOT clinical" in report_md.splitlines()[2]  # The data note heads the report.
  m = json.loads((ev / "metrics.json").read_text())
  assert m["models"] == list(MODELS) + ["size_only", "density_features"]  # + reference rows.
  for model in MODELS:
    pooled = m["table2"][model]["val"]["pooled"]
    assert set(METRICS) <= set(pooled)
    assert all(in_unit_or_none(pooled[k]) for k in METRICS), pooled
  ens = json.loads((ev / "ensemble.json").read_text())
  assert ens["available"] and (ens["w_extreme"], ens["w_middle"]) == (0.35, 0.96)
  runs = read_csv(ev / "runs.csv")
  assert [(r["variant"], r["fold"]) for r in runs] == [(v, "0") for v in VARIANTS]
  # Re-predicted validation probabilities equal those saved by training.
  assert all(float(r["max_abs_prob_diff"]) < 1e-5 for r in runs)

  # ---- predict one scan through the command line.
  manifest = read_csv(smoke_manifest(w))
  case = next(r for r in manifest if r["label"] == "covid" and r["infection_mask"])
  root = smoke_manifest(w).parent
  out = tmp_path / "pred"
  res = run_cli(["-m", "dsan_jax.predict", "--workdir", str(w),
                 "--image", str(root / case["image"]),
                 "--lung-mask", str(root / case["lung_mask"]),
                 "--infection-mask", str(root / case["infection_mask"]), "--out", str(out)],
                timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "P(COVID)" in res.stdout
  pred = json.loads((out / "prediction.json").read_text())
  assert 0 <= pred["probability"] <= 1 and pred["probability_model"] == "att_rn34_ds"
  assert pred["label"] == ("COVID" if pred["probability"] >= 0.5 else "CAP")
  assert set(pred["models"]) == set(VARIANTS)
  assert pred["ratio"] == pytest.approx(float(case["infection_ratio"]), rel=1e-6)
  img = nib.load(str(root / case["image"]))
  att = nib.load(str(out / "attention.nii.gz"))
  assert att.shape == img.shape
  np.testing.assert_allclose(att.affine, img.affine, atol=1e-5)
  data = np.asarray(att.dataobj)
  assert np.all(np.isfinite(data)) and data.min() >= 0 and data.max() <= 1
  for name in ("overview.png", "attention_att_rn34_us.nii.gz", "attention_att_rn34_ss.nii.gz",
               "gradcam_rn34_us.nii.gz"):
    assert (out / name).is_file(), name
  assert sorted(pred["files"]) == sorted(p.name for p in out.iterdir())
