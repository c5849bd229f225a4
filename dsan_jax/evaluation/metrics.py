"""Classification and attention-quality metrics on host-side predictions (Section IV-C).

Everything here is NumPy on finished predictions (one probability per case), never inside jit.

Conventions:
  * Label 1 = COVID-19 is the positive class, 0 = CAP.
  * A case is predicted COVID when ``prob >= threshold`` (the paper's threshold is 0.5; ``>=`` so
    that a probability of exactly 0.5 counts as COVID, matching ``evaluation.threshold`` in
    ``configs/default.py``).
  * A metric whose denominator is empty is NaN, not 0 (e.g. sensitivity of a group without COVID
    cases; AUC when one class is absent), so that tables show "n/a" instead of a fake number.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "f1")
DEFAULT_RATIO_EDGES = (0.005, 0.030)  # Table III.


def _as_binary_inputs(labels, probs) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts ``labels`` [N] in {0, 1} and finite ``probs`` [N]."""
  labels = np.asarray(labels)
  probs = np.asarray(probs, dtype=np.float64)
  if labels.ndim != 1 or probs.ndim != 1 or labels.shape != probs.shape:
    raise ValueError(
        f"labels and probs must be 1-D of equal length, got {labels.shape} and {probs.shape}")
  if labels.size and not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"labels must be 0 (CAP) or 1 (COVID), got values {np.unique(labels)}")
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs contain NaN or inf")
  return labels.astype(np.int64), probs


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks along the last axis, ties sharing the mean of their ranks ("midranks").

  Args:
    x: [..., N] real values.

  Returns:
    [..., N] float64 ranks; ``average_ranks([3, 1, 3]) == [2.5, 1, 2.5]``.
  """
  x = np.asarray(x, dtype=np.float64)
  n = x.shape[-1]
  if n == 0:
    return np.zeros(x.shape, np.float64)
  order = np.argsort(x, axis=-1, kind="mergesort")
  s = np.take_along_axis(x, order, axis=-1)
  idx = np.broadcast_to(np.arange(n), s.shape)
  # A tie group spans [start, end] in sorted order; every member gets (start + end) / 2 + 1.
  new_group = np.ones(s.shape, bool)
  new_group[..., 1:] = s[..., 1:] != s[..., :-1]
  start = np.maximum.accumulate(np.where(new_group, idx, 0), axis=-1)
  last_of_group = np.ones(s.shape, bool)
  last_of_group[..., :-1] = new_group[..., 1:]
  end_rev = np.maximum.accumulate(
      np.where(last_of_group, n - 1 - idx, 0)[..., ::-1], axis=-1)[..., ::-1]
  end = n - 1 - end_rev
  sorted_ranks = (start + end) / 2.0 + 1.0
  ranks = np.empty(s.shape, np.float64)
  np.put_along_axis(ranks, order, sorted_ranks, axis=-1)
  return ranks


def auc_score(labels, probs) -> float:
  """Area under the ROC curve by the Mann-Whitney U statistic with midranks for ties.

  AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), where R_pos is the sum of the positive
  cases' midranks: the probability that a random COVID case scores above a random CAP case, ties
  counting one half. Equals scikit-learn's ``roc_auc_score``.

  Args:
    labels: [N] 0/1.
    probs: [N] scores (any monotone score works).

  Returns:
    The AUC, or NaN when one of the classes is absent (the AUC is undefined then).
  """
  labels, probs = _as_binary_inputs(labels, probs)
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = average_ranks(probs)
  r_pos = ranks[labels == 1].sum()
  return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, Any]:
  """The paper's five metrics (Table II) for COVID (label 1) vs CAP (label 0).

  Args:
    labels: [N] int, 1 = COVID, 0 = CAP.
    probs: [N] float, predicted COVID probability.
    threshold: a case is predicted COVID when ``prob >= threshold``.

  Returns:
    dict with ``auc`` (NaN if a class is absent), ``accuracy``, ``sensitivity`` (recall of
    COVID; NaN without COVID cases), ``specificity`` (recall of CAP; NaN without CAP cases),
    ``f1`` (of the COVID class; NaN when 2TP + FP + FN = 0), the counts ``n``, ``n_pos``,
    ``n_neg`` and the confusion counts ``tp``, ``fp``, ``tn``, ``fn``. Accuracy is NaN for N = 0.
  """
  labels, probs = _as_binary_inputs(labels, probs)
  pred = probs >= threshold
  pos = labels == 1
  tp = int(np.sum(pred & pos))
  fn = int(np.sum(~pred & pos))
  fp = int(np.sum(pred & ~pos))
  tn = int(np.sum(~pred & ~pos))
  n = labels.size

  def ratio(a: int, b: int) -> float:
    return float(a / b) if b > 0 else float("nan")

  return dict(
      auc=auc_score(labels, probs),
      accuracy=ratio(tp + tn, n),
      sensitivity=ratio(tp, tp + fn),
      specificity=ratio(tn, tn + fp),
      f1=ratio(2 * tp, 2 * tp + fp + fn),
      n=n, n_pos=tp + fn, n_neg=tn + fp, tp=tp, fp=fp, tn=tn, fn=fn)


def roc_curve_points(labels, probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve at every distinct score, like ``sklearn.metrics.roc_curve(drop_intermediate=False)``.

  Args:
    labels: [N] 0/1.
    probs: [N] scores.

  Returns:
    ``(fpr [K+1], tpr [K+1], thresholds [K+1])`` for the K distinct scores in decreasing order,
    starting at (0, 0) with threshold +inf; point k predicts positive when ``prob >=
    thresholds[k]``. fpr (tpr) is all NaN when there is no negative (positive) case.
  """
  labels, probs = _as_binary_inputs(labels, probs)
  order = np.argsort(-probs, kind="mergesort")
  s = probs[order]
  y = labels[order]
  # The last index of every run of equal scores closes one operating point.
  distinct = np.flatnonzero(np.diff(s) != 0) if s.size else np.zeros(0, int)
  ends = np.r_[distinct, s.size - 1] if s.size else np.zeros(0, int)
  tps = np.cumsum(y)[ends]
  fps = (ends + 1) - tps
  tps = np.r_[0, tps].astype(np.float64)
  fps = np.r_[0, fps].astype(np.float64)
  n_pos, n_neg = tps[-1], fps[-1]
  with np.errstate(invalid="ignore", divide="ignore"):
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)
  thresholds = np.r_[np.inf, s[ends]]
  return fpr, tpr, thresholds


def group_of_ratio(ratios, edges: Sequence[float] = DEFAULT_RATIO_EDGES) -> np.ndarray:
  """Infection-ratio group of Table III: 0: r < 0.005, 1: 0.005 <= r <= 0.030, 2: r > 0.030.

  The paper names the groups "< 0.005", "0.005 - 0.030" and "> 0.030", so both edges belong to
  the middle group.

  Args:
    ratios: [N] infection/lung volume ratios; NaN = unknown.
    edges: (low, high) with low <= high.

  Returns:
    [N] int64 in {0, 1, 2}, and -1 where the ratio is NaN.
  """
  low, high = (float(e) for e in edges)
  if not low <= high:
    raise ValueError(f"edges must be increasing, got {edges}")
  r = np.asarray(ratios, dtype=np.float64)
  groups = np.where(r < low, 0, np.where(r > high, 2, 1)).astype(np.int64)
  groups[np.isnan(r)] = -1
  return groups


def group_names(edges: Sequence[float] = DEFAULT_RATIO_EDGES) -> dict[int, str]:
  """Display names of the groups returned by ``group_of_ratio`` (as Table III writes them)."""
  low, high = edges
  return {0: f"< {low:.3f}", 1: f"{low:.3f} - {high:.3f}", 2: f"> {high:.3f}", -1: "unknown"}


def metrics_by_group(labels, probs, ratios, edges: Sequence[float] = DEFAULT_RATIO_EDGES,
                     threshold: float = 0.5) -> list[dict[str, Any]]:
  """``binary_metrics`` per infection-ratio group (Table III).

  Args:
    labels: [N] 0/1.
    probs: [N] COVID probabilities.
    ratios: [N] infection ratios (NaN = unknown).
    edges: group edges, see ``group_of_ratio``.
    threshold: decision threshold.

  Returns:
    One dict per group, in order 0, 1, 2 (always present, even when empty) and then -1
    ("unknown", only when some ratio is NaN): ``group`` (int), ``name``, ``n_covid``, ``n_cap``
    and the keys of ``binary_metrics``.
  """
  labels, probs = _as_binary_inputs(labels, probs)
  groups = group_of_ratio(ratios, edges)
  if groups.shape != labels.shape:
    raise ValueError(f"ratios shape {groups.shape} != labels shape {labels.shape}")
  names = group_names(edges)
  wanted = [0, 1, 2] + ([-1] if np.any(groups == -1) else [])
  rows = []
  for g in wanted:
    sel = groups == g
    m = binary_metrics(labels[sel], probs[sel], threshold)
    rows.append(dict(group=g, name=names[g], n_covid=m["n_pos"], n_cap=m["n_neg"], **m))
  return rows


# ------------------------------------------------------------------ attention quality numbers.


def _as_map_and_mask(attention_map, mask) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(attention_map, dtype=np.float64)
  m = np.asarray(mask)
  if a.shape != m.shape:
    raise ValueError(f"map shape {a.shape} != mask shape {m.shape}; resample the map first")
  if not np.all(np.isfinite(a)):
    raise ValueError("attention map contains NaN or inf")
  if a.size and a.min() < 0:
    raise ValueError(f"attention map must be >= 0, min is {a.min()}")
  if m.size and not np.all((m == 0) | (m == 1)):
    raise ValueError("mask must be binary (0/1)")
  return a, m.astype(np.float64)


def normalize_map(attention_map) -> np.ndarray:
  """Scales a non-negative map to [0, 1] by its maximum (all-zero maps stay zero).

  Soft Dice depends on the map's scale, so maps of different models (Grad-CAM, T(A)) are
  compared after this normalisation; the mass fraction does not depend on scale.
  """
  a = np.asarray(attention_map, dtype=np.float64)
  peak = a.max() if a.size else 0.0
  return a / peak if peak > 0 else np.zeros_like(a)


def attention_mass_inside(attention_map, mask) -> float:
  """Fraction of the map's total mass that lies inside the mask: sum(map * mask) / sum(map).

  Args:
    attention_map: [D, H, W] non-negative map, already at the mask's resolution.
    mask: [D, H, W] binary infection mask.

  Returns:
    A value in [0, 1]; NaN when the map has no mass or the mask is empty (no infection to
    localise), so that averages over cases (``np.nanmean``) skip such cases.
  """
  a, m = _as_map_and_mask(attention_map, mask)
  total = a.sum()
  if total <= 0 or m.sum() <= 0:
    return float("nan")
  return float((a * m).sum() / total)


def soft_dice(attention_map, mask) -> float:
  """Soft Dice between a map in [0, 1] and a binary mask: 2 sum(map mask) / (sum(map) + sum(mask)).

  Args:
    attention_map: [D, H, W] non-negative map (see ``normalize_map``).
    mask: [D, H, W] binary mask.

  Returns:
    The soft Dice; NaN when both the map and the mask are empty (0 / 0). When only one is empty
    the formula gives 0.
  """
  a, m = _as_map_and_mask(attention_map, mask)
  denom = a.sum() + m.sum()
  if denom <= 0:
    return float("nan")
  return float(2.0 * (a * m).sum() / denom)


def attention_quality(attention_map, mask) -> dict[str, float]:
  """Both attention numbers for one case: ``mass_inside`` and ``soft_dice`` of the map / max.

  Args:
    attention_map: [D, H, W] non-negative map at the mask's resolution.
    mask: [D, H, W] binary infection mask.

  Returns:
    {"mass_inside": attention_mass_inside(map, mask),
     "soft_dice": soft_dice(normalize_map(map), mask)}.
  """
  return dict(mass_inside=attention_mass_inside(attention_map, mask),
              soft_dice=soft_dice(normalize_map(attention_map), mask))
