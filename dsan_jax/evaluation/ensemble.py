"""The dual-sampling ensemble (Section III-E, Eq. 5): P = w P_US + (1 - w) P_SS.

w depends on the case's infection/lung volume ratio r: ``w_extreme`` (paper: 0.35) when
r < ``low`` (0.001) or r > ``high`` (0.030), i.e. where the size-balanced model was trained to
help (COVID with small infections, CAP with large ones), and ``w_middle`` (0.96) otherwise. Both
edges (r == 0.001, r == 0.030) belong to the middle, as the paper's strict "< 0.001 or > 0.030".

Unknown ratio (NaN, e.g. no infection mask at prediction time): the default fallback is
``w_middle``. That is the literal reading of Eq. 5 (a NaN ratio does not meet "< 0.001 or
> 0.030", so it is one of "the rest cases"), and it leans on the uniform-sampling model, which the
paper calls the robust one because it saw the data's own distribution. Pass ``nan_weight`` to
choose another value (e.g. 0.5).

The paper picked its two weights "with a hyperparameter search on the TV set";
``search_weights`` is that search, on the pooled validation predictions of the 5 folds.

Every function takes the weights and edges as arguments; the paper's values are the config's
(``configs/default.py``, ``ensemble.*``; ``config_weights`` reads them).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dsan_jax.evaluation import metrics



def config_weights(ensemble_config) -> dict[str, float]:
  """``w_extreme``, ``w_middle``, ``low``, ``high`` from a config's ``ensemble`` section.

  The paper's values (0.35, 0.96, 0.001, 0.030) live in ``configs/default.py`` only.
  """
  e = ensemble_config
  return dict(w_extreme=float(e.w_extreme), w_middle=float(e.w_middle), low=float(e.low_ratio),
              high=float(e.high_ratio))


def _as_1d(name: str, x, n: int | None = None) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 1 or (n is not None and x.shape[0] != n):
    raise ValueError(f"{name} must have shape [{n if n is not None else 'N'}], got {x.shape}")
  return x


def is_extreme(ratios, low: float, high: float) -> np.ndarray:
  """[N] bool: r < low or r > high (False for NaN ratios)."""
  r = np.asarray(ratios, dtype=np.float64)
  with np.errstate(invalid="ignore"):
    return (r < low) | (r > high)


def ensemble_weight(ratios, w_extreme: float, w_middle: float, low: float, high: float,
                    nan_weight: float | None = None) -> np.ndarray:
  """Weight w of the uniform-sampling model for each case.

  Args:
    ratios: [N] infection/lung volume ratios, NaN = unknown.
    w_extreme: w where r < low or r > high.
    w_middle: w where low <= r <= high.
    low, high: ratio edges.
    nan_weight: w for NaN ratios; None -> ``w_middle`` (see the module docstring).

  Returns:
    [N] float64 weights in [0, 1].
  """
  r = _as_1d("ratios", ratios)
  for name, w in (("w_extreme", w_extreme), ("w_middle", w_middle), ("nan_weight", nan_weight)):
    if w is not None and not 0.0 <= w <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {w}")
  w = np.where(is_extreme(r, low, high), float(w_extreme), float(w_middle))
  w[np.isnan(r)] = w_middle if nan_weight is None else float(nan_weight)
  return w


def _mix(w, p_us: np.ndarray, p_ss: np.ndarray) -> np.ndarray:
  # One formula shared by combine() and the search, so that a searched score is reproduced
  # bit-for-bit by evaluating combine() with the found weights.
  return w * p_us + (1.0 - w) * p_ss


def combine(p_us, p_ss, ratios, w_extreme: float, w_middle: float, low: float, high: float,
            nan_weight: float | None = None) -> np.ndarray:
  """Eq. 5: P = w P_US + (1 - w) P_SS with the ratio-dependent w of ``ensemble_weight``.

  Args:
    p_us: [N] COVID probabilities of the uniform-sampling model ("Attention RN34 + US").
    p_ss: [N] COVID probabilities of the size-balanced model ("Attention RN34 + SS").
    ratios: [N] infection ratios (NaN = unknown).
    w_extreme, w_middle, low, high, nan_weight: see ``ensemble_weight``.

  Returns:
    [N] float64 ensemble probabilities ("Attention RN34 + DS").
  """
  p_us = _as_1d("p_us", p_us)
  p_ss = _as_1d("p_ss", p_ss, p_us.shape[0])
  w = ensemble_weight(_as_1d("ratios", ratios, p_us.shape[0]), w_extreme, w_middle, low, high,
                      nan_weight)
  return _mix(w, p_us, p_ss)


class SearchResult(NamedTuple):
  w_extreme: float
  w_middle: float
  score: float  # The objective at the chosen weights.


def weight_grid(step: float) -> np.ndarray:
  """Weights 0, step, 2 step, ..., 1; ``1 / step`` must be (close to) an integer."""
  k = round(1.0 / step)
  if step <= 0 or k < 1 or abs(k * step - 1.0) > 1e-9:
    raise ValueError(f"grid step must divide 1 (e.g. 0.01, 0.05, 0.1), got {step}")
  return np.round(np.linspace(0.0, 1.0, k + 1), 12)


def _batched_auc(labels: np.ndarray, p: np.ndarray) -> np.ndarray:
  """AUC of each row of ``p`` [G, N] (midrank Mann-Whitney, as ``metrics.auc_score``)."""
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return np.full(p.shape[0], np.nan)
  r_pos = metrics.average_ranks(p)[:, labels == 1].sum(axis=1)
  return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def search_weights(labels, p_us, p_ss, ratios, *, low: float, high: float,
                   reference: tuple[float, float], grid_step: float = 0.01,
                   objective: str = "accuracy", threshold: float = 0.5,
                   nan_weight: float | None = None,
                   ) -> SearchResult:
  """Grid search of (w_extreme, w_middle) on pooled validation predictions.

  Objective (documented choice; the paper does not say which it maximised):
    * ``"accuracy"`` (default): accuracy at ``threshold`` of the ensemble. Ties are broken by
      the larger AUC, then by the smaller Euclidean distance to ``reference`` (the configured
      weights: the paper's (0.35, 0.96) by default), then by the smaller (w_extreme, w_middle)
      lexicographically.
    * ``"auc"``: AUC of the ensemble; ties broken by accuracy at ``threshold``, then as above.

  Accuracy is a sum over the two ratio groups, each depending on one weight only, so it is
  evaluated exactly on the whole grid in O(G N); AUCs (which mix the groups) are computed only
  where needed: for the accuracy ties, or on the whole grid for ``"auc"`` (G^2 AUCs of N cases).
  Scores are compared after rounding to 12 decimals so that float noise does not decide ties.

  Args:
    labels: [N] 0/1 (1 = COVID).
    p_us, p_ss: [N] probabilities of the US and SS models for the same cases.
    ratios: [N] infection ratios (NaN = unknown, weighted by ``nan_weight``, fixed during the
      search; None -> they take ``w_middle`` and so follow the middle weight).
    grid_step: spacing of the grid on [0, 1] for both weights.
    objective: "accuracy" or "auc".
    threshold: decision threshold of the accuracy.
    low, high: ratio edges of ``ensemble_weight``.
    nan_weight: see ``ensemble_weight``.
    reference: (w_extreme, w_middle) preferred among equal scores.

  Returns:
    ``SearchResult(w_extreme, w_middle, score)`` where score is the objective's value, equal to
    what ``metrics.binary_metrics(labels, combine(..., w_extreme, w_middle))`` reports.
  """
  if objective not in ("accuracy", "auc"):
    raise ValueError(f"objective must be 'accuracy' or 'auc', got {objective!r}")
  p_us = _as_1d("p_us", p_us)
  n = p_us.shape[0]
  p_ss = _as_1d("p_ss", p_ss, n)
  r = _as_1d("ratios", ratios, n)
  labels, _ = metrics._as_binary_inputs(labels, p_us)  # pylint: disable=protected-access
  if n == 0:
    raise ValueError("search_weights needs at least one case")
  grid = weight_grid(grid_step)
  ext = is_extreme(r, low, high)
  fixed = np.isnan(r) if nan_weight is not None else np.zeros(n, bool)
  groups = _Groups(labels, p_us, p_ss, ext, fixed, ~ext & ~fixed, nan_weight)
  return _best_on_grid(groups, grid, _accuracy_grid(groups, grid, threshold), objective,
                       reference)


def _best_on_grid(groups: "_Groups", grid: np.ndarray, acc: np.ndarray, objective: str,
                  reference: tuple[float, float]) -> SearchResult:
  """The grid point of the best objective, ties broken as ``search_weights`` documents."""
  g = grid.size
  ii, jj = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  ii, jj = ii.ravel(), jj.ravel()
  if objective == "accuracy":
    raw = acc.ravel()
    primary = _comparable(raw)
    cand = np.flatnonzero(primary == primary.max())
    secondary = _comparable(_auc_at(groups, grid, ii[cand], jj[cand]))
  else:
    raw = _auc_at(groups, grid, ii, jj)
    primary = _comparable(raw)
    cand = np.flatnonzero(primary == primary.max())
    secondary = _comparable(acc.ravel()[cand])
  dist = np.round(np.hypot(grid[ii[cand]] - reference[0], grid[jj[cand]] - reference[1]), 12)
  # np.lexsort sorts by the last key first: best secondary, then nearest, then smallest weights.
  best = cand[np.lexsort((grid[jj[cand]], grid[ii[cand]], dist, -secondary))[0]]
  return SearchResult(float(grid[ii[best]]), float(grid[jj[best]]), float(raw[best]))


class _Groups(NamedTuple):
  """The search's cases: [N] arrays and which weight each case takes."""
  labels: np.ndarray  # 0/1.
  p_us: np.ndarray
  p_ss: np.ndarray
  ext: np.ndarray  # bool: takes w_extreme.
  fixed: np.ndarray  # bool: takes the fixed nan_weight.
  mid: np.ndarray  # bool: takes w_middle.
  nan_weight: float | None


def _accuracy_grid(c: _Groups, grid: np.ndarray, threshold: float) -> np.ndarray:
  """[G, G] accuracy with w_extreme = grid[i], w_middle = grid[j], exactly in O(G N)."""
  is_pos = c.labels == 1
  g = grid.size

  def correct_counts(sel: np.ndarray) -> np.ndarray:
    """[G] number of correct decisions among ``sel`` for each grid weight."""
    if not sel.any():
      return np.zeros(g, np.int64)
    p = _mix(grid[:, None], c.p_us[sel][None, :], c.p_ss[sel][None, :])
    return np.sum((p >= threshold) == is_pos[sel][None, :], axis=1)

  fixed_correct = 0
  if c.fixed.any():
    p_fixed = _mix(float(c.nan_weight), c.p_us[c.fixed], c.p_ss[c.fixed])
    fixed_correct = int(np.sum((p_fixed >= threshold) == is_pos[c.fixed]))
  correct = correct_counts(c.ext)[:, None] + correct_counts(c.mid)[None, :] + fixed_correct
  return correct / c.labels.shape[0]


def _auc_at(c: _Groups, grid: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
  """AUCs of the ensembles (grid[ii], grid[jj]), in chunks to bound memory."""
  n = c.labels.shape[0]
  out = np.empty(ii.size)
  chunk = max(1, 2_000_000 // max(n, 1))
  for s in range(0, ii.size, chunk):
    w = np.empty((min(chunk, ii.size - s), n))
    w[:] = grid[jj[s:s + chunk], None]
    w[:, c.ext] = grid[ii[s:s + chunk], None]
    if c.fixed.any():
      w[:, c.fixed] = float(c.nan_weight)
    out[s:s + chunk] = _batched_auc(c.labels, _mix(w, c.p_us[None], c.p_ss[None]))
  return out


def _comparable(x: np.ndarray) -> np.ndarray:
  """Scores rounded to 12 decimals (float noise does not decide ties), NaN lowest."""
  return np.where(np.isnan(x), -np.inf, np.round(x, 12))
