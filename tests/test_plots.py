"""Tests of dsan_jax.evaluation.plots: the figures are written as valid PNGs of a sensible size."""

import numpy as np
import pytest
from matplotlib import image as mpimg

from dsan_jax.evaluation import metrics
from dsan_jax.evaluation import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_w=300, min_h=200):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  img = mpimg.imread(str(path))
  h, w = img.shape[:2]
  assert w >= min_w and h >= min_h, (w, h)
  assert w <= 5000 and h <= 5000, (w, h)
  assert img[..., :3].std() > 0.01  # Not a blank canvas.
  return w, h


def _phantom():
  d, h, w = 12, 24, 20
  z, y, x = np.mgrid[:d, :h, :w]
  lung = (((x - 10) / 8) ** 2 + ((y - 12) / 10) ** 2 + ((z - 6) / 5) ** 2) < 1
  infection = lung & (((x - 13) / 2.5) ** 2 + ((y - 15) / 2.5) ** 2 + ((z - 8) / 2) ** 2 < 1)
  ct = np.where(lung, 0.2, 0.7) + np.where(infection, 0.4, 0.0)
  return ct, lung.astype(np.uint8), infection.astype(np.uint8)


def test_plot_roc(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 50)
  curves = {}
  for fold in range(3):
    curves[fold] = {}
    for m, q in (("rn34_us", 0.3), ("att_rn34_us", 0.6)):
      probs = np.clip(q * labels + rng.random(50), 0, 1)
      fpr, tpr, _ = metrics.roc_curve_points(labels, probs)
      curves[fold][m] = (fpr, tpr, metrics.auc_score(labels, probs))
  path = tmp_path / "roc.png"
  plots.plot_roc(curves, curves[0], path, title="t")
  w, h = _assert_png(path)
  assert w > h  # 4 panels on a 3-column grid: 2 rows of 3.
  plots.plot_roc({0: curves[0]}, None, tmp_path / "one.png")
  _assert_png(tmp_path / "one.png")
  with pytest.raises(ValueError):
    plots.plot_roc({}, None, tmp_path / "none.png")


def test_default_slice_index_and_resize():
  ct, lung, infection = _phantom()
  default = plots.default_slice_index(infection, lung, ct.shape)
  com = np.argwhere(infection).mean(axis=0)
  assert default == tuple(int(round(c)) for c in com)
  assert plots.default_slice_index(None, lung, ct.shape) == tuple(
      int(round(c)) for c in np.argwhere(lung).mean(axis=0))
  assert plots.default_slice_index(np.zeros_like(lung), None, (12, 24, 20)) == (6, 12, 10)
  small = np.random.default_rng(0).random((3, 6, 5))
  assert plots.resize_to(small, ct.shape).shape == ct.shape
  np.testing.assert_allclose(plots.resize_to(np.full((3, 6, 5), 0.25), ct.shape), 0.25, atol=1e-6)


def test_plot_attention_figure(tmp_path):
  ct, lung, infection = _phantom()
  maps = {"RN34 + US Grad-CAM": np.random.default_rng(0).random((3, 6, 5)),
          "Att. RN34 + US T(A)": infection.astype(float) * 0.8,
          "Att. RN34 + SS T(A)": np.zeros(ct.shape)}
  path = tmp_path / "att.png"
  plots.plot_attention_figure(ct, lung, infection, maps, path, spacing=(1.25, 0.72, 0.72))
  w, h = _assert_png(path)
  assert w > h  # 6 columns, 2 rows.
  plots.plot_attention_figure(ct, None, None, {}, tmp_path / "plain.png", slice_index=(3, 5))
  _assert_png(tmp_path / "plain.png", min_w=200, min_h=150)
  with pytest.raises(ValueError):
    plots.plot_attention_figure(ct, lung[:-1], infection, maps, tmp_path / "bad.png")
  with pytest.raises(ValueError):
    plots.plot_attention_figure(ct[0], None, None, {}, tmp_path / "bad.png")


def test_plot_training_curves(tmp_path):
  rows = [dict(epoch=e, train_loss=1.0 / (e + 1), val_loss=1.1 / (e + 1), val_auc=0.5 + 0.02 * e,
               val_accuracy=float("nan") if e == 0 else 0.6, note="x") for e in range(8)]
  path = tmp_path / "curves.png"
  plots.plot_training_curves(rows, path)
  _assert_png(path)
  with pytest.raises(ValueError):
    plots.plot_training_curves([], tmp_path / "empty.png")


def test_clinical_overview_goes_through_the_attention_maximum(tmp_path):
  ct = np.random.default_rng(0).random((12, 20, 24)).astype(np.float32)
  lung = np.zeros(ct.shape, np.uint8)
  lung[2:10, 4:16, 3:11] = 1
  att = np.zeros((12, 20, 24), np.float32)
  att[7, 5, 18] = 1.0  # The maximum, off the lung.
  att[3, 10, 6] = 0.5
  path = tmp_path / "summary.png"
  where = plots.plot_clinical_overview(ct, lung, att, path, spacing=(2.5, 1.0, 1.0),
                                       lines=["P(COVID) = 0.9", "ratio 0.01 (ESTIMATED)"],
                                       title="t")
  assert where == (7, 5, 18)
  assert path.stat().st_size > 5_000
  # A coarser map is resampled to the CT's grid first; its maximum maps to the same region.
  coarse = np.zeros((6, 10, 12), np.float32)
  coarse[3, 2, 9] = 1.0
  z, y, x = plots.plot_clinical_overview(ct, None, coarse, tmp_path / "b.png")
  assert (z // 2, y // 2, x // 2) == (3, 2, 9)
