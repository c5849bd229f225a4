"""Significance tests for paired model comparisons (Section IV-D, and DeLong beyond the paper).

* ``paired_ttest``: the paper's "paired t-tests" between models, here over the fold models
  (one metric value per fold for each model, paired by fold).
* ``delong_test``: DeLong, DeLong & Clarke-Pearson (Biometrics 1988) test for the difference of
  two correlated AUCs measured on the same cases, in the fast O(N log N) form of Sun & Xu (IEEE
  SPL 2014) with midranks; ``delong_ci`` gives the matching confidence interval of one AUC.
* ``mcnemar_test``: McNemar's exact test for two models' decisions (correct / wrong at the
  threshold) on the same cases: accuracy, or sensitivity / specificity within one class.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats as sp_stats

from dsan_jax.evaluation import metrics


class TTestResult(NamedTuple):
  t: float
  p: float


class DeLongResult(NamedTuple):
  auc_a: float
  auc_b: float
  z: float
  p: float


class McNemarResult(NamedTuple):
  n: int  # Cases compared.
  only_a: int  # Cases that A gets right and B wrong.
  only_b: int  # Cases that B gets right and A wrong.
  p: float


class AucInterval(NamedTuple):
  auc: float
  low: float
  high: float
  se: float


def paired_ttest(metric_a_per_fold, metric_b_per_fold) -> TTestResult:
  """Two-sided paired t-test (``scipy.stats.ttest_rel``) of two models' per-fold metrics.

  Args:
    metric_a_per_fold: [K] metric of model A on each fold (K >= 2).
    metric_b_per_fold: [K] metric of model B on the same folds, same order.

  Returns:
    ``(t, p)``; t > 0 when A is larger on average. When every difference is exactly zero scipy
    returns NaN (0 / 0); this returns (0.0, 1.0) then, the models being indistinguishable. NaN
    inputs give NaN.
  """
  a = np.asarray(metric_a_per_fold, dtype=np.float64)
  b = np.asarray(metric_b_per_fold, dtype=np.float64)
  if a.ndim != 1 or a.shape != b.shape or a.size < 2:
    raise ValueError(f"need two [K] arrays with K >= 2, got {a.shape} and {b.shape}")
  if np.any(np.isnan(a)) or np.any(np.isnan(b)):
    return TTestResult(float("nan"), float("nan"))
  if np.all(a == b):
    return TTestResult(0.0, 1.0)
  res = sp_stats.ttest_rel(a, b)
  return TTestResult(float(res.statistic), float(res.pvalue))


def _delong_components(labels, probs_k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """AUCs and DeLong structural components of K predictors on the same cases.

  Args:
    labels: [N] 0/1.
    probs_k: [K, N] scores.

  Returns:
    ``(aucs [K], v10 [K, m], v01 [K, n])`` with m positives and n negatives: v10[k, i] is the
    fraction of negatives ranked below positive i (ties 1/2), v01[k, j] the fraction of
    positives ranked above negative j.
  """
  labels = np.asarray(labels)
  pos = labels == 1
  m, n = int(pos.sum()), int((~pos).sum())
  if m == 0 or n == 0:
    raise ValueError("DeLong needs both classes present")
  x, y = probs_k[:, pos], probs_k[:, ~pos]
  tx = metrics.average_ranks(x)  # Ranks among positives.
  ty = metrics.average_ranks(y)  # Ranks among negatives.
  tz = metrics.average_ranks(np.concatenate([x, y], axis=1))  # Ranks among all.
  # Sun & Xu: the midrank of a positive among all minus its midrank among positives counts the
  # negatives below it (ties 1/2).
  v10 = (tz[:, :m] - tx) / n
  v01 = 1.0 - (tz[:, m:] - ty) / m
  aucs = v10.mean(axis=1)
  return aucs, v10, v01


def delong_covariance(labels, probs_k) -> tuple[np.ndarray, np.ndarray]:
  """AUCs [K] and their DeLong covariance matrix [K, K] (S10 / m + S01 / n, ddof = 1).

  Args:
    labels: [N] 0/1 (1 = positive).
    probs_k: [K, N] scores of K predictors on the same cases.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"labels must be [N] with values 0/1, got shape {labels.shape}")
  probs_k = np.atleast_2d(np.asarray(probs_k, dtype=np.float64))
  if probs_k.ndim != 2 or probs_k.shape[1] != labels.shape[0]:
    raise ValueError(f"probs shape {probs_k.shape} does not match labels {labels.shape}")
  if not np.all(np.isfinite(probs_k)):
    raise ValueError("probs contain NaN or inf")
  aucs, v10, v01 = _delong_components(labels, probs_k)
  m, n = v10.shape[1], v01.shape[1]
  s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((len(aucs),) * 2)
  s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((len(aucs),) * 2)
  return aucs, s10 / m + s01 / n


def delong_test(labels, probs_a, probs_b) -> DeLongResult:
  """DeLong's two-sided test of AUC(a) == AUC(b) on the same cases.

  Args:
    labels: [N] 0/1 (1 = COVID).
    probs_a: [N] scores of model A.
    probs_b: [N] scores of model B, same cases in the same order.

  Returns:
    ``(auc_a, auc_b, z, p)`` with z = (auc_a - auc_b) / sd(auc_a - auc_b). When the two AUCs
    are equal and the variance of the difference is zero (e.g. identical predictors) z = 0 and
    p = 1; a nonzero difference with zero variance gives z = +-inf and p = 0.
  """
  probs = np.stack([np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)])
  aucs, cov = delong_covariance(labels, probs)
  diff = aucs[0] - aucs[1]
  var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
  # Float noise can leave a tiny negative variance for (near-)identical predictors.
  var = max(var, 0.0)
  if var <= 1e-300:
    if abs(diff) < 1e-15:
      return DeLongResult(float(aucs[0]), float(aucs[1]), 0.0, 1.0)
    return DeLongResult(float(aucs[0]), float(aucs[1]), float(np.sign(diff) * np.inf), 0.0)
  z = diff / np.sqrt(var)
  p = 2.0 * sp_stats.norm.sf(abs(z))
  return DeLongResult(float(aucs[0]), float(aucs[1]), float(z), float(p))


def delong_ci(labels, probs, alpha: float = 0.95) -> AucInterval:
  """Normal-approximation confidence interval of one AUC with DeLong's standard error.

  Args:
    labels: [N] 0/1.
    probs: [N] scores.
    alpha: coverage of the interval (0.95 -> 95 % CI).

  Returns:
    ``(auc, low, high, se)``, the bounds clipped to [0, 1].
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  aucs, cov = delong_covariance(labels, np.asarray(probs, np.float64)[None])
  se = float(np.sqrt(max(cov[0, 0], 0.0)))
  half = sp_stats.norm.ppf(0.5 + alpha / 2.0) * se
  auc = float(aucs[0])
  return AucInterval(auc, max(0.0, auc - half), min(1.0, auc + half), se)


def mcnemar_test(correct_a, correct_b) -> McNemarResult:
  """McNemar's exact two-sided test that two models are right equally often on the same cases.

  Only the discordant cases count: under the null hypothesis each of the ``only_a + only_b``
  cases is A's with probability 1/2, so p is the two-sided exact binomial p-value
  (``scipy.stats.binomtest``), valid for any number of discordant cases (the chi-squared
  approximation is not, for the few cases of one infection-size group).

  Args:
    correct_a: [N] bool, whether model A decides case i correctly.
    correct_b: [N] bool, the same cases in the same order for model B.

  Returns:
    ``(n, only_a, only_b, p)``; p = 1 when no case is discordant.
  """
  a = np.asarray(correct_a, bool)
  b = np.asarray(correct_b, bool)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"need two [N] arrays of the same shape, got {a.shape} and {b.shape}")
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  if only_a + only_b == 0:
    return McNemarResult(int(a.size), 0, 0, 1.0)
  p = sp_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
  return McNemarResult(int(a.size), only_a, only_b, float(min(p, 1.0)))
