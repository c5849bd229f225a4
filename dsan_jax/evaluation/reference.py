"""Reference classifiers that calibrate a dataset's difficulty beside the networks' rows.

Two rows join Tables II and III when ``eval.reference_models`` is on:

  * ``size_only``: a logistic regression on log(infection ratio) alone. With true ratios (the
    synthetic testbed, or masks) it is the "size-only oracle": how far the infection-size
    imbalance of the data (paper, Fig. 1) carries a classifier that sees nothing else.
  * ``density_features``: a logistic regression on seven crude lung-density features of the
    network's own input (``density_features``), no mask: what a simple hand-made classifier gets.

Both are fitted exactly as the networks are evaluated: for fold k on the other folds' cases,
predicting fold k's validation cases and the test split, so their rows have the same (model,
fold, split, case_id) layout as the networks' (``report.COLUMNS``).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REFERENCE_MODELS = ("size_only", "density_features")
FEATURES = ("log GGO band", "log dense band", "mean", "std", "bright balance L/R",
            "bright peripheral share", "log bright fraction")
_RATIO_FLOOR = 1e-6  # log(ratio) of an uninfected lung.


def density_features(image: np.ndarray, lung: np.ndarray, hu_window) -> np.ndarray:
  """Seven crude density features of one preprocessed input.

  Args:
    image: float [D, H, W] in [0, 1] (windowed CT, times the lung mask).
    lung: bool [D, H, W] lung mask (for the network's input: ``image > 0``).
    hu_window: (low, high) HU of the window.

  Returns:
    float64 [7] (``FEATURES``).
  """
  lo, hi = hu_window
  m = lung.astype(bool)
  if not m.any():
    return np.zeros(len(FEATURES))
  hu_all = image.astype(np.float64) * (hi - lo) + lo
  hu = hu_all[m]
  eps = 1e-4
  ggo = np.mean((hu > -750) & (hu <= -300))
  dense = np.mean(hu > -300)
  bright = (hu_all > -600) & m
  w = image.shape[2]
  left, right = bright[..., : w // 2].sum(), bright[..., w // 2:].sum()
  balance = min(left, right) / max(left + right, 1)
  inner = ndimage.binary_erosion(m, iterations=2)
  periph = (bright & ~inner).sum() / max(bright.sum(), 1)
  return np.array([np.log(ggo + eps), np.log(dense + eps), hu.mean(), hu.std(), balance, periph,
                   np.log(bright.sum() / m.sum() + eps)])


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray):
  """The reference rows' classifier: standardised features, logistic regression.

  Args:
    x_train: float [N, F] features.
    y_train: int [N] labels (both classes present).

  Returns:
    The fitted sklearn pipeline (``predict_proba``).
  """
  return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)


def cross_fitted(x: dict[str, np.ndarray], labels: np.ndarray, folds: np.ndarray,
                 eval_folds: Sequence[int] | None = None,
                 splits: Sequence[str] = ("val", "test")) -> Iterator[tuple]:
  """Fold-by-fold predictions of ``fit_logistic`` on each feature set, as the networks are run.

  For fold k a classifier is fitted on the other folds' cases and predicts fold k's cases
  ("val") and the test split ("test"). Folds whose training cases hold one class are skipped.

  Args:
    x: name -> float [N, F] features of every case.
    labels: int [N].
    folds: int [N] fold of each case, -1 for the test split.
    eval_folds: the folds to fit and predict; None -> every fold.
    splits: which of "val", "test" to predict.

  Yields:
    (name, fold, split, indices int [n], probabilities float [n]), fold by fold.
  """
  test = np.flatnonzero(folds == -1)
  all_folds = np.unique(folds[folds >= 0])
  for fold in all_folds if eval_folds is None else sorted(set(eval_folds) & set(all_folds)):
    train = np.flatnonzero((folds >= 0) & (folds != fold))
    if np.unique(labels[train]).size < 2:
      continue
    parts = {"val": np.flatnonzero(folds == fold), "test": test}
    for name, xm in x.items():
      clf = fit_logistic(xm[train], labels[train])
      for split in splits:
        if parts[split].size:
          yield name, int(fold), split, parts[split], clf.predict_proba(xm[parts[split]])[:, 1]


def reference_rows(dataset: Any, folds: np.ndarray, hu_window: Sequence[float],
                   models: Sequence[str] = REFERENCE_MODELS,
                   eval_folds: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """Prediction rows of the reference classifiers, fold by fold.

  Args:
    dataset: a ``CachedDataset`` (items with "image"; ``labels``, ``ratios``, ``case_ids``).
    folds: int [N] fold of each case, -1 for the test split.
    hu_window: the window of the cached images.
    models: which of ``REFERENCE_MODELS``; "size_only" is skipped when a ratio is unknown.
    eval_folds: the folds to fit and predict (those the networks were evaluated on); None ->
      every fold.

  Returns:
    Rows {model, fold, split, case_id, label, ratio, prob} (``report.COLUMNS``).
  """
  labels = np.asarray(dataset.labels, np.int64)
  ratios = np.asarray(dataset.ratios, np.float64)
  x: dict[str, np.ndarray] = {}
  if "size_only" in models and np.all(np.isfinite(ratios)):
    x["size_only"] = np.log(np.maximum(ratios, _RATIO_FLOOR))[:, None]
  if "density_features" in models:
    feats = []
    for i in range(len(labels)):
      img = dataset[i]["image"]
      feats.append(density_features(img, img > 0, hu_window))
    x["density_features"] = np.stack(feats)
  rows = []
  for model, fold, split, idx, prob in cross_fitted(x, labels, folds, eval_folds):
    rows += [dict(model=model, fold=fold, split=split, case_id=dataset.case_ids[i],
                  label=int(labels[i]), ratio=float(ratios[i]), prob=float(p))
             for i, p in zip(idx, prob)]
  return rows
