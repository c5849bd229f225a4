"""Tests of dsan_jax.evaluation.metrics against scikit-learn and hand-computed values."""

import numpy as np
import pytest
from sklearn import metrics as skm

from dsan_jax.evaluation import metrics


def _random_case(seed, n=97, ties=False):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  probs = rng.random(n)
  if ties:  # Coarse scores: many ties, some exactly at the threshold 0.5.
    probs = np.round(probs * 10) / 10
  return labels, probs


def test_average_ranks_hand_values():
  np.testing.assert_array_equal(metrics.average_ranks([3.0, 1.0, 3.0]), [2.5, 1.0, 2.5])
  np.testing.assert_array_equal(
      metrics.average_ranks([[0.2, 0.2, 0.2, 0.1], [4.0, 3.0, 2.0, 1.0]]),
      [[3.0, 3.0, 3.0, 1.0], [4.0, 3.0, 2.0, 1.0]])


@pytest.mark.parametrize("seed", range(5))
def test_average_ranks_equal_scipy(seed):
  from scipy.stats import rankdata
  x = np.random.default_rng(seed).integers(0, 6, size=(3, 40)).astype(float)
  np.testing.assert_array_equal(metrics.average_ranks(x), rankdata(x, axis=1))


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_binary_metrics_equal_sklearn(seed, ties):
  labels, probs = _random_case(seed, ties=ties)
  m = metrics.binary_metrics(labels, probs, threshold=0.5)
  pred = (probs >= 0.5).astype(int)
  np.testing.assert_allclose(m["auc"], skm.roc_auc_score(labels, probs), rtol=0, atol=1e-12)
  assert m["accuracy"] == skm.accuracy_score(labels, pred)
  assert m["sensitivity"] == skm.recall_score(labels, pred, pos_label=1)
  assert m["specificity"] == skm.recall_score(labels, pred, pos_label=0)
  np.testing.assert_allclose(m["f1"], skm.f1_score(labels, pred), rtol=0, atol=1e-12)
  assert (m["n"], m["n_pos"], m["n_neg"]) == (97, labels.sum(), 97 - labels.sum())
  tn, fp, fn, tp = skm.confusion_matrix(labels, pred).ravel()
  assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)


def test_threshold_is_inclusive():
  m = metrics.binary_metrics([1, 0], [0.5, 0.4999])
  assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
  m = metrics.binary_metrics([1, 0], [0.5, 0.5])
  assert m["sensitivity"] == 1.0 and m["specificity"] == 0.0
  m = metrics.binary_metrics([1, 0], [0.7, 0.2], threshold=0.8)
  assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0


def test_hand_example():
  # Labels 1,1,1,0,0 with scores 0.9,0.6,0.3,0.7,0.1: TP=2 FN=1 FP=1 TN=1.
  # AUC: positive-negative pairs (3 x 2): 0.9>0.7,0.9>0.1,0.6<0.7,0.6>0.1,0.3<0.7,0.3>0.1 -> 4/6.
  m = metrics.binary_metrics([1, 1, 1, 0, 0], [0.9, 0.6, 0.3, 0.7, 0.1])
  assert m["auc"] == pytest.approx(4 / 6, abs=1e-15)
  assert m["accuracy"] == pytest.approx(3 / 5, abs=1e-15)
  assert m["sensitivity"] == pytest.approx(2 / 3, abs=1e-15)
  assert m["specificity"] == pytest.approx(1 / 2, abs=1e-15)
  assert m["f1"] == pytest.approx(4 / 6, abs=1e-15)  # 2TP / (2TP + FP + FN) = 4 / 6.
  # A tie between a positive and a negative counts 1/2.
  assert metrics.auc_score([1, 0], [0.3, 0.3]) == 0.5


def test_one_class_gives_nan():
  m = metrics.binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
  assert np.isnan(m["auc"]) and np.isnan(m["specificity"])
  assert m["sensitivity"] == pytest.approx(2 / 3)
  assert m["n_neg"] == 0
  m = metrics.binary_metrics([0, 0], [0.1, 0.2])
  assert np.isnan(m["auc"]) and np.isnan(m["sensitivity"]) and np.isnan(m["f1"])
  assert m["specificity"] == 1.0
  m = metrics.binary_metrics(np.zeros(0, int), np.zeros(0))
  assert m["n"] == 0 and np.isnan(m["accuracy"])


def test_bad_inputs_raise():
  with pytest.raises(ValueError):
    metrics.binary_metrics([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError):
    metrics.binary_metrics([0, 1], [0.1])
  with pytest.raises(ValueError):
    metrics.binary_metrics([0, 1], [0.1, np.nan])


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_equals_sklearn(ties):
  labels, probs = _random_case(7, n=60, ties=ties)
  fpr, tpr, thr = metrics.roc_curve_points(labels, probs)
  s_fpr, s_tpr, s_thr = skm.roc_curve(labels, probs, drop_intermediate=False)
  np.testing.assert_allclose(fpr, s_fpr, atol=1e-15)
  np.testing.assert_allclose(tpr, s_tpr, atol=1e-15)
  np.testing.assert_array_equal(thr[1:], s_thr[1:])
  assert thr[0] == np.inf
  # Trapezoidal area under the curve equals the rank AUC.
  np.testing.assert_allclose(np.trapezoid(tpr, fpr), metrics.auc_score(labels, probs), atol=1e-12)


def test_group_of_ratio_edges():
  r = [0.0, 0.0049, 0.005, 0.01, 0.030, 0.0301, 0.5, np.nan]
  np.testing.assert_array_equal(metrics.group_of_ratio(r), [0, 0, 1, 1, 1, 2, 2, -1])
  np.testing.assert_array_equal(metrics.group_of_ratio([0.1, 0.2, 0.3], edges=(0.2, 0.2)),
                                [0, 1, 2])


def test_metrics_by_group_counts_and_values():
  labels = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1])
  probs = np.array([0.9, 0.2, 0.6, 0.4, 0.8, 0.7, 0.55, 0.1, 0.3])
  ratios = np.array([0.001, 0.002, 0.004, 0.01, 0.02, 0.03, 0.2, 0.5, np.nan])
  rows = metrics.metrics_by_group(labels, probs, ratios)
  assert [r["group"] for r in rows] == [0, 1, 2, -1]
  assert [r["name"] for r in rows] == ["< 0.005", "0.005 - 0.030", "> 0.030", "unknown"]
  assert [(r["n_covid"], r["n_cap"]) for r in rows] == [(1, 2), (2, 1), (1, 1), (1, 0)]
  # Group 0: labels 1,0,0 probs .9,.2,.6 -> TP=1 FP=1 TN=1; AUC = 1 (0.9 above both CAPs).
  assert rows[0]["accuracy"] == pytest.approx(2 / 3) and rows[0]["auc"] == 1.0
  assert rows[0]["specificity"] == 0.5
  # Group 1: labels 1,1,0 probs .4,.8,.7 -> TP=1 FN=1 FP=1; AUC = 1/2.
  assert rows[1]["sensitivity"] == 0.5 and rows[1]["auc"] == 0.5 and rows[1]["f1"] == 0.5
  for row in rows:
    sel = metrics.group_of_ratio(ratios) == row["group"]
    ref = metrics.binary_metrics(labels[sel], probs[sel])
    for k in metrics.METRIC_NAMES:
      np.testing.assert_equal(row[k], ref[k])
  # Without NaN ratios there is no "unknown" row, and empty groups are still listed.
  rows = metrics.metrics_by_group([1, 0], [0.6, 0.4], [0.001, 0.002])
  assert [(r["n_covid"], r["n_cap"]) for r in rows] == [(1, 1), (0, 0), (0, 0)]
  assert np.isnan(rows[1]["accuracy"])


def test_attention_mass_inside_and_soft_dice_hand_values():
  mask = np.zeros((2, 2, 2), np.uint8)
  mask[0, 0, :] = 1  # 2 voxels.
  amap = np.zeros((2, 2, 2))
  amap[0, 0, 0] = 3.0  # inside
  amap[1, 1, 1] = 1.0  # outside
  assert metrics.attention_mass_inside(amap, mask) == 0.75
  # soft Dice = 2 * 3 / (4 + 2) = 1.
  assert metrics.soft_dice(amap, mask) == 1.0
  half = np.full((2, 2, 2), 0.5)
  assert metrics.attention_mass_inside(half, mask) == 0.25
  assert metrics.soft_dice(half, mask) == pytest.approx(2 * 1.0 / (4.0 + 2.0))
  assert metrics.soft_dice(mask.astype(float), mask) == 1.0
  # Scale: the mass fraction is scale-free, soft Dice is not (hence normalize_map).
  np.testing.assert_allclose(metrics.normalize_map(amap).max(), 1.0)
  assert metrics.attention_mass_inside(10 * amap, mask) == 0.75


def test_attention_numbers_empty_and_invalid():
  mask = np.zeros((2, 3, 3), np.uint8)
  zero = np.zeros((2, 3, 3))
  some = np.ones((2, 3, 3))
  assert np.isnan(metrics.attention_mass_inside(zero, mask + 1))
  assert np.isnan(metrics.attention_mass_inside(some, mask))
  assert np.isnan(metrics.soft_dice(zero, mask))
  assert metrics.soft_dice(some, mask) == 0.0
  assert metrics.soft_dice(zero, mask + 1) == 0.0
  np.testing.assert_array_equal(metrics.normalize_map(zero), zero)
  with pytest.raises(ValueError):
    metrics.soft_dice(-some, mask)
  with pytest.raises(ValueError):
    metrics.attention_mass_inside(some[:1], mask)
  with pytest.raises(ValueError):
    metrics.soft_dice(some, mask + 2)


def test_attention_quality_combines_both_numbers():
  mask = np.zeros((1, 2, 2), np.uint8)
  mask[0, 0, 0] = 1
  amap = np.array([[[4.0, 2.0], [0.0, 2.0]]])
  q = metrics.attention_quality(amap, mask)
  assert q["mass_inside"] == 0.5  # 4 / 8.
  # Normalised map [[1, .5], [0, .5]]: 2 * 1 / (2 + 1).
  assert q["soft_dice"] == pytest.approx(2 / 3, abs=1e-15)
