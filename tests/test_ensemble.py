"""Tests of the dual-sampling ensemble (Eq. 5) and its weight search."""

import itertools

import numpy as np
import pytest
from sklearn import metrics as skm

from configs import default
from dsan_jax.evaluation import ensemble
from dsan_jax.evaluation import metrics

PAPER = ensemble.config_weights(default.get_config().ensemble)  # The one source: the config.
EDGES = dict(low=PAPER["low"], high=PAPER["high"])
SEARCH = dict(EDGES, reference=(PAPER["w_extreme"], PAPER["w_middle"]))


def test_defaults_match_config_and_paper():
  cfg = default.get_config().ensemble
  assert PAPER == dict(w_extreme=0.35, w_middle=0.96, low=0.001, high=0.030)
  assert (cfg.w_extreme, cfg.w_middle, cfg.low_ratio, cfg.high_ratio) == (0.35, 0.96, 0.001, 0.030)
  assert cfg.search_objective in ("accuracy", "auc")
  assert round(1 / cfg.search_grid_step) * cfg.search_grid_step == pytest.approx(1.0)


def test_ensemble_weight_edges_and_nan():
  r = [0.0, 0.000999, 0.001, 0.01, 0.030, 0.030001, 0.9, np.nan]
  np.testing.assert_array_equal(
      ensemble.ensemble_weight(r, **PAPER), [0.35, 0.35, 0.96, 0.96, 0.96, 0.35, 0.35, 0.96])
  np.testing.assert_array_equal(
      ensemble.ensemble_weight(r, w_extreme=0.1, w_middle=0.7, low=0.01, high=0.02,
                               nan_weight=0.5),
      [0.1, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1, 0.5])
  with pytest.raises(ValueError):
    ensemble.ensemble_weight(r, **dict(PAPER, w_extreme=1.5))


def test_combine_hand_values():
  p_us = np.array([0.8, 0.8, 0.2])
  p_ss = np.array([0.4, 0.4, 0.6])
  ratios = np.array([0.0005, 0.01, np.nan])
  np.testing.assert_allclose(
      ensemble.combine(p_us, p_ss, ratios, **PAPER),
      [0.35 * 0.8 + 0.65 * 0.4, 0.96 * 0.8 + 0.04 * 0.4, 0.96 * 0.2 + 0.04 * 0.6], atol=1e-15)
  np.testing.assert_allclose(ensemble.combine(p_us, p_ss, ratios, 1.0, 1.0, **EDGES),
                             p_us, atol=0)
  np.testing.assert_allclose(ensemble.combine(p_us, p_ss, ratios, 0.0, 0.0, **EDGES),
                             p_ss, atol=0)
  with pytest.raises(ValueError):
    ensemble.combine(p_us, p_ss[:2], ratios, **PAPER)


def _planted_cases():
  """Predictions for which accuracy 1 is reached only at (w_extreme, w_middle) = (0.62, 0.17)."""
  rows = [
      # Extreme ratios. COVID, P = 0.81301 w >= 0.5 iff w >= 0.61500...
      (1, 0.5 / 0.615 + 1e-6, 0.0, 0.0005),
      # CAP, P = 0.8 w < 0.5 iff w < 0.625.
      (0, 0.8, 0.0, 0.2),
      # Middle ratios. COVID, P = (1 - w) S >= 0.5 iff w <= 0.175.
      (1, 0.0, 0.5 / 0.825, 0.01),
      # CAP, P = (1 - w) S' < 0.5 iff w > 0.165.
      (0, 0.0, 0.5 / 0.835, 0.02),
      # Correct for every weight.
      (1, 0.9, 0.95, 0.0001), (0, 0.05, 0.1, 0.5), (1, 0.7, 0.9, 0.004), (0, 0.2, 0.1, 0.025),
      # Wrong for every weight.
      (0, 0.9, 0.8, 0.01),
  ]
  labels, p_us, p_ss, ratios = (np.array(c) for c in zip(*rows))
  return labels.astype(int), p_us, p_ss, ratios


@pytest.mark.parametrize("reference", [(0.35, 0.96), (0.0, 0.0), (1.0, 1.0)])
def test_search_recovers_planted_weights(reference):
  labels, p_us, p_ss, ratios = _planted_cases()
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.01, reference=reference,
                                **EDGES)
  assert (res.w_extreme, res.w_middle) == (0.62, 0.17)
  assert res.score == 8 / 9
  p = ensemble.combine(p_us, p_ss, ratios, res.w_extreme, res.w_middle, **EDGES)
  assert metrics.binary_metrics(labels, p)["accuracy"] == res.score
  # The neighbours on the grid are worse: the optimum is a single point.
  for de, dm in [(-0.01, 0), (0.01, 0), (0, -0.01), (0, 0.01)]:
    p = ensemble.combine(p_us, p_ss, ratios, 0.62 + de, 0.17 + dm, **EDGES)
    assert metrics.binary_metrics(labels, p)["accuracy"] < res.score


def test_search_nan_ratio_follows_middle_unless_fixed():
  labels, p_us, p_ss, ratios = _planted_cases()
  ratios = ratios.copy()
  ratios[2] = np.nan  # The middle COVID case loses its ratio.
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.01, **SEARCH)
  assert (res.w_extreme, res.w_middle) == (0.62, 0.17)  # Default: NaN -> w_middle.
  # With a fixed weight 0.5 the case is always wrong ((1 - 0.5) * 0.606 < 0.5), and w_middle
  # is constrained only by the CAP case (w > 0.165): ties resolved towards the reference 0.96.
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.01, nan_weight=0.5,
                                **SEARCH)
  assert (res.w_extreme, res.w_middle, res.score) == (0.62, 0.96, 7 / 9)


def test_search_ties_go_to_reference_then_smaller_weights():
  labels = np.array([1, 0, 1, 0])
  p_us = np.array([0.9, 0.1, 0.8, 0.2])
  p_ss = np.array([0.7, 0.3, 0.9, 0.05])
  ratios = np.array([0.0001, 0.0002, 0.01, 0.02])
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.01, **SEARCH)
  assert (res.w_extreme, res.w_middle, res.score) == (0.35, 0.96, 1.0)
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.01, reference=(0.3, 0.2),
                                **EDGES)
  assert (res.w_extreme, res.w_middle) == (0.3, 0.2)
  # Step 0.1: 0.3 and 0.4 are equally far from 0.35 -> the smaller one.
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.1, **SEARCH)
  assert (res.w_extreme, res.w_middle) == (0.3, 1.0)


@pytest.mark.parametrize("objective", ["accuracy", "auc"])
def test_search_matches_brute_force_with_sklearn(objective):
  rng = np.random.default_rng(3)
  n = 60
  labels = rng.integers(0, 2, n)
  p_us = np.clip(0.5 * labels + 0.6 * rng.random(n) - 0.05, 0, 1)
  p_ss = np.clip(0.4 * labels + 0.6 * rng.random(n), 0, 1)
  ratios = rng.choice([0.0005, 0.01, 0.1, np.nan], n)
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.1, objective=objective,
                                **SEARCH)
  grid = np.linspace(0, 1, 11)
  best = -1.0
  for we, wm in itertools.product(grid, grid):
    w = np.where((ratios < 0.001) | (ratios > 0.03), we, wm)
    p = w * p_us + (1 - w) * p_ss
    if objective == "auc":
      score = skm.roc_auc_score(labels, p)
    else:
      score = skm.accuracy_score(labels, p >= 0.5)
    best = max(best, score)
  np.testing.assert_allclose(res.score, best, atol=1e-12)
  p = ensemble.combine(p_us, p_ss, ratios, res.w_extreme, res.w_middle, **EDGES)
  ref = skm.roc_auc_score(labels, p) if objective == "auc" else skm.accuracy_score(labels, p >= .5)
  np.testing.assert_allclose(res.score, ref, atol=1e-12)


def test_search_rejects_bad_arguments():
  labels, p_us, p_ss, ratios = _planted_cases()
  with pytest.raises(ValueError):
    ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.03, **SEARCH)
  with pytest.raises(ValueError):
    ensemble.search_weights(labels, p_us, p_ss, ratios, objective="f2", **SEARCH)


def test_search_tie_break_order_accuracy_then_auc_then_distance():
  """Brute-force reimplementation of the documented order on a coarse grid, with sklearn."""
  rng = np.random.default_rng(0)
  n = 40
  labels = rng.integers(0, 2, n)
  p_us = np.clip(0.25 * labels + 0.75 * rng.random(n), 0, 1)
  p_ss = np.clip(0.25 * labels + 0.75 * rng.random(n), 0, 1)
  ratios = rng.choice([0.0005, 0.01, 0.1], n)
  grid = np.linspace(0, 1, 11)
  ref_point = (0.35, 0.96)
  cands = []
  for we, wm in itertools.product(grid, grid):
    p = ensemble.combine(p_us, p_ss, ratios, we, wm, **EDGES)
    cands.append((round(skm.accuracy_score(labels, p >= 0.5), 12),
                  round(skm.roc_auc_score(labels, p), 12),
                  -round(np.hypot(we - ref_point[0], wm - ref_point[1]), 12), -we, -wm))
  best = max(cands)
  res = ensemble.search_weights(labels, p_us, p_ss, ratios, grid_step=0.1, **SEARCH)
  np.testing.assert_allclose((res.w_extreme, res.w_middle), (-best[3], -best[4]), atol=1e-12)
  assert res.score == best[0]
  # The data are such that the AUC tie-break matters: the accuracy-best point nearest to the
  # reference has a lower AUC than the chosen one.
  acc_best = [c for c in cands if c[0] == best[0]]
  nearest = max(acc_best, key=lambda c: c[2])
  assert nearest[1] < best[1]
