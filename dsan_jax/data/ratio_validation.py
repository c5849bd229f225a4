"""Phantom lesions and agreement figures for validating the infection-ratio estimate.

Used by ``benchmarks/validate_ratio_estimate.py`` and the tests; nothing here is needed to
train or predict.

* ``add_pleural_consolidation``: renders a dense blob against the chest wall into a phantom
  (the case the lung-mask fallback must keep, docs/data.md "Lung-mask fallback").
* ``spearman``, ``auc``: rank statistics (ties get mid-ranks).
* ``group_agreement``: how often the estimated and the true ratio put a case in the same
  size-balanced group (``sampling.size_groups``) and the same Table III group
  (``metrics.group_of_ratio``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats

from dsan_jax.data import sampling
from dsan_jax.evaluation import metrics


def add_pleural_consolidation(hu: np.ndarray, lung: np.ndarray, infection: np.ndarray,
                              spacing_zyx, rng: np.random.Generator, side: str = "lateral",
                              radius_fraction: float = 0.5, hu_range=(-60.0, 40.0),
                              noise_hu: float = 15.0):
  """Turns the part of the lung inside a ball on the costal contour into consolidation.

  The ball is centred on the lung's outermost voxel (``side`` = "lateral": farthest from the
  midline in x; "posterior": lowest y) in the axial slice with the most lung of the chosen
  lung, with radius ``radius_fraction`` of that lung's in-plane half-width.

  Args:
    hu: float [D, H, W] phantom CT in HU (canonical RAS+), not modified.
    lung, infection: {0, 1} [D, H, W] true masks, not modified.
    spacing_zyx: (z, y, x) mm.
    rng: picks the lung (right or left) and the blob's HU.
    side: "lateral" or "posterior".
    radius_fraction, hu_range, noise_hu: blob size, mean HU range, noise std.

  Returns:
    (hu float32, lung uint8, infection uint8, blob bool) [D, H, W]; the blob's voxels are lung
    and infection.
  """
  labels, n = ndimage.label(lung > 0)
  if n == 0:
    raise ValueError("phantom has no lung")
  sizes = np.bincount(labels.ravel())[1:]
  lab = int(rng.choice(np.argsort(sizes)[::-1][:2])) + 1
  one = labels == lab
  z = int(np.argmax(one.sum(axis=(1, 2))))
  ys, xs = np.nonzero(one[z])
  mid_x = (hu.shape[2] - 1) / 2.0
  if side == "lateral":
    k = int(np.argmax(np.abs(xs - mid_x)))
  elif side == "posterior":
    k = int(np.argmin(ys))
  else:
    raise ValueError(f"side must be 'lateral' or 'posterior', got {side!r}")
  sz, sy, sx = (float(s) for s in spacing_zyx)
  radius = radius_fraction * 0.5 * (xs.max() - xs.min() + 1) * sx
  zz, yy, xx = np.ogrid[:hu.shape[0], :hu.shape[1], :hu.shape[2]]
  ball = (((zz - z) * sz) ** 2 + ((yy - ys[k]) * sy) ** 2 + ((xx - xs[k]) * sx) ** 2
          <= radius ** 2)
  blob = ball & one
  out = np.asarray(hu, np.float32).copy()
  out[blob] = (rng.uniform(*hu_range)
               + rng.normal(0.0, noise_hu, int(blob.sum()))).astype(np.float32)
  return out, (lung > 0).astype(np.uint8), ((infection > 0) | blob).astype(np.uint8), blob


def spearman(a, b) -> float:
  """Spearman rank correlation of two [N] arrays (NaN when either is constant)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(stats.spearmanr(a, b).statistic)


def auc(labels, scores) -> float:
  """ROC AUC of ``scores`` [N] for binary ``labels`` [N] (Mann-Whitney, mid-ranks)."""
  return float(metrics.auc_score(np.asarray(labels), np.asarray(scores, np.float64)))


def group_agreement(labels, true_ratios, est_ratios, covid_small: float = 0.030,
                    cap_small: float = 0.001, table3_edges=(0.005, 0.030)) -> dict:
  """Agreement of the groups that the true and the estimated ratios give.

  Args:
    labels: [N] 1 = COVID, 0 = CAP.
    true_ratios, est_ratios: [N] ratios.
    covid_small, cap_small: size-balanced thresholds (``sampling.size_groups``).
    table3_edges: Table III edges (``metrics.group_of_ratio``).

  Returns:
    dict(size_groups=fraction of cases in the same size-balanced group, table3=same for the
    Table III groups, size_confusion=[4, 4] counts (true group x estimated group),
    table3_confusion=[3, 3] counts).
  """
  labels = np.asarray(labels)
  gt = sampling.size_groups(labels, true_ratios, covid_small, cap_small)
  ge = sampling.size_groups(labels, est_ratios, covid_small, cap_small)
  tt = metrics.group_of_ratio(np.asarray(true_ratios, np.float64), table3_edges)
  te = metrics.group_of_ratio(np.asarray(est_ratios, np.float64), table3_edges)
  size_conf = np.zeros((4, 4), np.int64)
  np.add.at(size_conf, (gt, ge), 1)
  t3_conf = np.zeros((len(table3_edges) + 1,) * 2, np.int64)
  np.add.at(t3_conf, (tt, te), 1)
  return dict(size_groups=float(np.mean(gt == ge)), table3=float(np.mean(tt == te)),
              size_confusion=size_conf.tolist(), table3_confusion=t3_conf.tolist())
