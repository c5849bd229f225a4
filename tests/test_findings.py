"""The paper's findings (dsan_jax/evaluation/findings.py), McNemar's test and the reference classifiers."""

import math

import numpy as np
import pytest
from scipy import stats as sp_stats

from dsan_jax.evaluation import findings
from dsan_jax.evaluation import reference
from dsan_jax.evaluation import report
from dsan_jax.evaluation import stats


def test_mcnemar_exact_values():
  a = np.array([1, 1, 1, 1, 1, 0, 1], bool)
  b = np.array([0, 0, 0, 0, 0, 0, 1], bool)
  r = stats.mcnemar_test(a, b)
  assert (r.n, r.only_a, r.only_b) == (7, 5, 0)
  assert r.p == pytest.approx(2 * 0.5 ** 5, rel=1e-12)  # Exact binomial, two-sided.
  assert stats.mcnemar_test(b, a).p == pytest.approx(r.p, rel=1e-12)
  assert stats.mcnemar_test(a, a).p == 1.0
  # 8 vs 2 discordant: P(X <= 2 or X >= 8), X ~ Bin(10, 1/2) = 2 * 56 / 1024.
  a = np.r_[np.ones(8, bool), np.zeros(2, bool)]
  assert stats.mcnemar_test(a, ~a).p == pytest.approx(112 / 1024, rel=1e-12)
  with pytest.raises(ValueError):
    stats.mcnemar_test(np.ones(3, bool), np.ones(4, bool))


@pytest.mark.parametrize("val_e, val_p, test_e, test_p, kind, expected", [
    (0.05, 0.01, 0.02, 0.3, "better", findings.REPRODUCES),
    (0.05, 0.01, -0.01, 0.8, "better", findings.INCONCLUSIVE),  # Test disagrees in sign.
    (0.05, 0.20, 0.05, 0.01, "better", findings.INCONCLUSIVE),  # Validation not significant.
    (-0.05, 0.01, 0.05, 0.5, "better", findings.NOT_REPRODUCED),  # Significantly opposite.
    (0.01, 0.50, -0.05, 0.01, "better", findings.NOT_REPRODUCED),
    (-0.01, 0.60, -0.01, 0.70, "better", findings.NOT_REPRODUCED),  # Opposite on both.
    (float("nan"), float("nan"), 0.1, 0.01, "better", findings.INCONCLUSIVE),
    (-0.01, 0.60, -0.02, 0.40, "not_worse", findings.REPRODUCES),
    (-0.05, 0.01, 0.0, 1.0, "not_worse", findings.NOT_REPRODUCED),
])
def test_verdict_rule(val_e, val_p, test_e, test_p, kind, expected):
  assert findings.verdict(val_e, val_p, test_e, test_p, kind) == expected


def test_combine():
  r, n, i = findings.REPRODUCES, findings.NOT_REPRODUCED, findings.INCONCLUSIVE
  assert findings.combine([r, r]) == r
  assert findings.combine([r, i]) == i
  assert findings.combine([r, i, n]) == n
  assert findings.combine([]) == i


def _table(n_val_per_fold=60, n_test=80, folds=5, seed=0):
  """Predictions where A separates the classes and B is random (all cases in the large group)."""
  rng = np.random.default_rng(seed)
  rows = []

  def add(model, fold, split, cid, label, good):
    prob = (0.9 if label else 0.1) if good else rng.uniform()
    rows.append(dict(model=model, fold=fold, split=split, case_id=cid, label=label,
                     ratio=0.05, prob=prob))

  for f in range(folds):
    for j in range(n_val_per_fold):
      label = j % 2
      for model, good in (("att_rn34_us", True), ("rn34_us", False)):
        add(model, f, "val", f"v{f}_{j}", label, good)
    for j in range(n_test):
      for model, good in (("att_rn34_us", True), ("rn34_us", False)):
        add(model, f, "test", f"t{j}", j % 2, good)
  return rows


def test_finding_a_on_a_clear_effect_and_its_reverse():
  rows = _table()
  res = findings.paper_findings(rows)
  (eff,) = res["effects"]  # Only (a)'s models are present.
  assert eff["val_a"] == 1.0 and eff["val_n"] == 300 and eff["test_n"] == 80
  assert eff["val_p"] < 1e-6 and eff["ttest_p"] < 1e-3 and eff["folds"] == 5
  assert res["findings"] == [dict(finding="a", claim=findings.FINDINGS["a"],
                                  verdict=findings.REPRODUCES)]
  swapped = [dict(r, model={"att_rn34_us": "rn34_us", "rn34_us": "att_rn34_us"}[r["model"]])
             for r in rows]
  assert findings.paper_findings(swapped)["findings"][0]["verdict"] == findings.NOT_REPRODUCED
  # Identical models: no effect, not significant -> inconclusive (never "reproduces").
  same = [r for r in rows if r["model"] == "att_rn34_us"]
  same += [dict(r, model="rn34_us") for r in same]
  assert findings.paper_findings(same)["findings"][0]["verdict"] == findings.INCONCLUSIVE
  assert "| (a) |" in findings.markdown(res)


def test_group_rates_use_the_groups_cases_and_mcnemar():
  """(b): sensitivity of small-infection COVID-19 cases only; test split by fold-mean prob."""
  rows = []
  for f in range(5):
    for j in range(40):
      label, ratio = j % 2, (0.001 if j < 20 else 0.05)  # 20 small, 20 large cases per fold.
      for model in ("att_rn34_ss", "att_rn34_us"):
        # SS finds every small COVID case, US misses them all; otherwise both are right.
        right = not (model == "att_rn34_us" and label == 1 and ratio < 0.005)
        prob = float(label) if right else 1.0 - label
        rows.append(dict(model=model, fold=f, split="val", case_id=f"v{f}_{j}", label=label,
                         ratio=ratio, prob=0.25 + 0.5 * prob))
  res = findings.paper_findings(rows)
  sens = next(e for e in res["effects"] if e["name"].startswith("sensitivity"))
  assert (sens["val_a"], sens["val_b"], sens["val_n"]) == (1.0, 0.0, 50)
  assert sens["val_p"] == pytest.approx(2 * 0.5 ** 50, rel=1e-9)
  spec = next(e for e in res["effects"] if e["name"].startswith("specificity"))
  assert (spec["val_a"], spec["val_b"], spec["val_p"]) == (1.0, 1.0, 1.0)
  assert spec["test_n"] == 0 and math.isnan(spec["test_a"])  # No test rows.
  assert spec["verdict"] == findings.INCONCLUSIVE
  assert res["findings"][0]["verdict"] == findings.INCONCLUSIVE  # One effect unmeasured.


class _FakeDataset:
  """Images whose bright volume grows with the ratio (like an infection), 8x8x8."""

  def __init__(self, n=120, seed=0):
    rng = np.random.default_rng(seed)
    self.labels = np.arange(n) % 2
    self.ratios = np.where(self.labels == 1, rng.uniform(0.01, 0.2, n),
                           rng.uniform(1e-4, 0.02, n))
    self.case_ids = [f"c{i}" for i in range(n)]
    self._images = []
    for r in self.ratios:
      img = np.full((8, 8, 8), 0.35, np.float32)  # About -825 HU: aerated lung.
      img.reshape(-1)[: max(1, int(r * 512))] = 0.6  # About -450 HU: ground glass.
      self._images.append(img)

  def __getitem__(self, i):
    return dict(image=self._images[i])


def test_reference_rows_layout_and_fit():
  ds = _FakeDataset()
  folds = np.r_[np.arange(100) % 5, -np.ones(20, np.int64)]
  rows = reference.reference_rows(ds, folds, (-1350.0, 150.0))
  cols = report.as_columns(rows)  # Valid prediction table (no duplicated rows).
  for model in reference.REFERENCE_MODELS:
    val = report._select(cols, model=model, split="val")  # pylint: disable=protected-access
    assert sorted(val["case_id"]) == sorted(ds.case_ids[:100])  # Each TV case once.
    test = report._select(cols, model=model, split="test")  # pylint: disable=protected-access
    assert test["case_id"].size == 5 * 20
  size = report._select(cols, model="size_only", split="val")  # pylint: disable=protected-access
  for f in range(5):  # A logistic regression on log(ratio) is monotone in the ratio.
    s = size["fold"] == f
    order = np.argsort(size["ratio"][s])
    assert np.all(np.diff(size["prob"][s][order]) >= -1e-12)
  auc = sp_stats.mannwhitneyu(size["prob"][size["label"] == 1],
                              size["prob"][size["label"] == 0]).statistic / (50 * 50)
  assert auc > 0.8  # The fake ratios separate the classes well (AUC ~0.9).


def test_reference_rows_only_for_the_evaluated_folds():
  ds = _FakeDataset(60)
  folds = np.r_[np.arange(50) % 5, -np.ones(10, np.int64)]
  rows = reference.reference_rows(ds, folds, (-1350.0, 150.0), ("size_only",), eval_folds=[2])
  assert {r["fold"] for r in rows} == {2}
  assert sorted(r["case_id"] for r in rows if r["split"] == "val") == sorted(
      ds.case_ids[i] for i in range(50) if i % 5 == 2)


def test_cross_fitted_fits_on_the_other_folds_only():
  rng = np.random.default_rng(0)
  labels = np.arange(40) % 2
  x = {"f": labels[:, None] + rng.normal(0, 1, (40, 1))}
  folds = np.r_[np.arange(30) % 3, -np.ones(10, np.int64)]
  out = list(reference.cross_fitted(x, labels, folds, splits=("val",)))
  assert [(name, fold, split) for name, fold, split, _, _ in out] == [
      ("f", k, "val") for k in range(3)]
  for _, fold, _, idx, prob in out:
    np.testing.assert_array_equal(idx, np.flatnonzero(folds == fold))
    train = (folds >= 0) & (folds != fold)  # Neither the fold itself nor the test split.
    expected = reference.fit_logistic(x["f"][train], labels[train]).predict_proba(x["f"][idx])
    np.testing.assert_array_equal(prob, expected[:, 1])
  one_class = np.where(folds == 0, 0, 1)  # Fold 0's training cases are all class 1: skipped.
  assert {f for _, f, _, _, _ in reference.cross_fitted(x, one_class, folds)} == {1, 2}


def test_density_features_of_an_empty_lung_are_zero():
  assert np.all(reference.density_features(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool),
                                           (-1350.0, 150.0)) == 0)
