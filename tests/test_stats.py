"""Tests of the paired t-test and DeLong's test against independent references."""

import numpy as np
import pytest
from scipy import stats as sp_stats
from sklearn import metrics as skm

from dsan_jax.evaluation import stats


def _psi(x, y):
  return (x > y) + 0.5 * (x == y)


def _delong_direct(labels, probs_k):
  """O(N^2) DeLong (1988): structural components from the pairwise kernel psi."""
  labels = np.asarray(labels)
  pos, neg = labels == 1, labels == 0
  m, n = pos.sum(), neg.sum()
  v10, v01, aucs = [], [], []
  for p in probs_k:
    k = _psi(p[pos][:, None], p[neg][None, :])  # [m, n]
    aucs.append(k.mean())
    v10.append(k.mean(axis=1))
    v01.append(k.mean(axis=0))
  v10, v01 = np.array(v10), np.array(v01)
  cov = np.zeros((len(probs_k),) * 2)
  for a in range(len(probs_k)):
    for b in range(len(probs_k)):
      s10 = np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1)
      s01 = np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1)
      cov[a, b] = s10 / m + s01 / n
  return np.array(aucs), cov


def _correlated_scores(seed, n=80, ties=False):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  common = rng.normal(size=n) + 1.0 * labels
  a = common + 0.7 * rng.normal(size=n)
  b = common + 1.2 * rng.normal(size=n) + 0.3 * labels
  if ties:
    a, b = np.round(a), np.round(b)
  return labels, a, b


def test_paired_ttest_equals_scipy_and_hand_value():
  a = np.array([0.95, 0.96, 0.94, 0.97, 0.95])
  b = np.array([0.93, 0.95, 0.94, 0.94, 0.92])
  t, p = stats.paired_ttest(a, b)
  ref = sp_stats.ttest_rel(a, b)
  assert (t, p) == (ref.statistic, ref.pvalue)
  d = a - b  # Hand formula: mean(d) / (sd(d) / sqrt(K)), two-sided t with K - 1 dof.
  t_hand = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
  np.testing.assert_allclose(t, t_hand, rtol=1e-12)
  np.testing.assert_allclose(p, 2 * sp_stats.t.sf(abs(t_hand), d.size - 1), rtol=1e-10)
  assert t > 0
  assert stats.paired_ttest(a, a) == (0.0, 1.0)
  assert all(np.isnan(stats.paired_ttest([0.1, np.nan], [0.2, 0.3])))
  with pytest.raises(ValueError):
    stats.paired_ttest([0.1], [0.2])


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True)])
def test_delong_matches_direct_implementation_and_sklearn(seed, ties):
  labels, a, b = _correlated_scores(seed, ties=ties)
  aucs, cov = stats.delong_covariance(labels, np.stack([a, b]))
  ref_aucs, ref_cov = _delong_direct(labels, [a, b])
  np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
  np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)
  res = stats.delong_test(labels, a, b)
  np.testing.assert_allclose(res.auc_a, skm.roc_auc_score(labels, a), atol=1e-12)
  np.testing.assert_allclose(res.auc_b, skm.roc_auc_score(labels, b), atol=1e-12)
  var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
  z = (ref_aucs[0] - ref_aucs[1]) / np.sqrt(var)
  np.testing.assert_allclose(res.z, z, rtol=1e-9)
  np.testing.assert_allclose(res.p, 2 * sp_stats.norm.sf(abs(z)), rtol=1e-9)


def test_delong_variance_close_to_bootstrap():
  labels, a, _ = _correlated_scores(5, n=300)
  _, cov = stats.delong_covariance(labels, a[None])
  rng = np.random.default_rng(0)
  pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
  # Stratified bootstrap (keeps m and n fixed, as DeLong's variance does); AUC by pair counting.
  bp = a[rng.choice(pos, (2000, pos.size))]
  bn = a[rng.choice(neg, (2000, neg.size))]
  boots = [_psi(x[:, None], y[None, :]).mean() for x, y in zip(bp, bn)]
  ratio = cov[0, 0] / np.var(boots, ddof=1)
  # The bootstrap variance estimate from 2000 draws has a relative s.e. of about 3 %.
  assert 0.85 < ratio < 1.15, ratio


def test_delong_identical_predictors_and_ci():
  labels, a, _ = _correlated_scores(3)
  res = stats.delong_test(labels, a, a.copy())
  assert res.z == 0.0 and res.p == 1.0 and res.auc_a == res.auc_b
  # A monotone transform keeps the ranks, hence the same AUC and zero variance of the difference.
  res = stats.delong_test(labels, a, 3 * a + 1)
  assert res.z == 0.0 and res.p == 1.0
  ci = stats.delong_ci(labels, a, alpha=0.95)
  _, cov = _delong_direct(labels, [a])
  se = np.sqrt(cov[0, 0])
  np.testing.assert_allclose(ci.se, se, rtol=1e-10)
  np.testing.assert_allclose([ci.low, ci.high], [ci.auc - 1.959963984540054 * se,
                                                 min(1.0, ci.auc + 1.959963984540054 * se)],
                             rtol=1e-10)
  assert ci.low < ci.auc < ci.high
  with pytest.raises(ValueError):
    stats.delong_test(np.ones(5, int), a[:5], a[:5])


def test_delong_detects_a_clear_difference():
  labels, a, _ = _correlated_scores(4, n=200)
  noise = np.random.default_rng(9).normal(size=labels.size) * 5
  res = stats.delong_test(labels, a, a + noise)
  assert res.auc_a > res.auc_b and res.z > 0 and res.p < 0.01
