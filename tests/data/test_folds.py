"""Patient-level, label-stratified folds and the independent test split."""

import numpy as np
import pytest

from dsan_jax.data import folds as folds_lib


def _cohort(num_patients=120, seed=0):
  """Patients with 1-3 scans each, ~40 % COVID (by patient)."""
  rng = np.random.default_rng(seed)
  pids, labels = [], []
  for p in range(num_patients):
    label = int(rng.random() < 0.4)
    for _ in range(int(rng.integers(1, 4))):
      pids.append(f"pat{p:03d}")
      labels.append(label)
  perm = rng.permutation(len(pids))  # scans of one patient are not adjacent
  return np.asarray(pids)[perm], np.asarray(labels)[perm]


def test_folds_patient_disjoint_cover_all_and_balanced():
  pids, labels = _cohort()
  folds = folds_lib.patient_folds(pids, labels, num_folds=5, seed=0)
  assert folds.dtype == np.int32 and folds.shape == labels.shape
  assert set(folds.tolist()) == {0, 1, 2, 3, 4}
  for p in np.unique(pids):  # every patient in exactly one fold
    assert np.unique(folds[pids == p]).size == 1
  overall = labels.mean()
  for k in range(5):
    train, val = folds_lib.split_indices(folds, k)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(pids)))
    assert not set(pids[train]) & set(pids[val])
    assert abs(labels[val].mean() - overall) < 0.08, (k, labels[val].mean(), overall)
    assert 0.12 < val.size / len(pids) < 0.28


def test_folds_deterministic_and_seed_dependent():
  pids, labels = _cohort()
  a = folds_lib.patient_folds(pids, labels, 5, seed=3)
  np.testing.assert_array_equal(a, folds_lib.patient_folds(pids, labels, 5, seed=3))
  assert not np.array_equal(a, folds_lib.patient_folds(pids, labels, 5, seed=4))


def test_too_few_patients_raises():
  with pytest.raises(ValueError, match="patient"):
    folds_lib.patient_folds(["a", "a", "b"], [1, 1, 0], num_folds=5)


def test_assign_splits_keeps_test_out_of_folds():
  pids, labels = _cohort()
  test_patients = set(np.unique(pids)[::7].tolist())
  splits = np.where(np.isin(pids, list(test_patients)), "test", "train")
  splits[np.flatnonzero(splits == "train")[:3]] = ""  # empty split = training-validation
  folds = folds_lib.assign_splits(splits, pids, labels, num_folds=5, seed=0)
  test = folds_lib.heldout_test_indices(folds)
  np.testing.assert_array_equal(test, np.flatnonzero(splits == "test"))
  for k in range(5):
    train, val = folds_lib.split_indices(folds, k)
    assert np.intersect1d(np.concatenate([train, val]), test).size == 0
  tv = folds >= 0
  # The training-validation part is exactly what patient_folds gives on it alone.
  np.testing.assert_array_equal(
      folds[tv], folds_lib.patient_folds(pids[tv], labels[tv], num_folds=5, seed=0))


def test_assign_splits_rejects_leak_and_unknown_values():
  with pytest.raises(ValueError, match="both"):
    folds_lib.assign_splits(["test", "train"] + ["train"] * 10, ["a", "a"] + list("bcdefghijk"),
                            [1] * 12)
  with pytest.raises(ValueError, match="unknown split"):
    folds_lib.assign_splits(["holdout"] * 6, list("abcdef"), [1, 0] * 3)
