"""Patient-level, label-stratified cross-validation folds and the independent test split.

Fold assignment uses scikit-learn's ``StratifiedGroupKFold(shuffle=True, random_state=seed)``
with the patient id as the group: all scans of one patient land in the same fold, and each
fold's COVID/CAP proportion is kept close to the whole set's. The result depends only on the
inputs and the seed (and the scikit-learn version).

Cases whose manifest ``split`` is ``"test"`` form an independent test set; they get fold -1 and
are never used for training or validation (the paper's TV set / test set split, Section IV-A).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

TEST_FOLD = -1
# Manifest `split` values that mean "training-validation set"; empty = not given.
TV_SPLITS = ("", "train", "trainval", "tv", "val", "train_val")
TEST_SPLITS = ("test",)


def patient_folds(patient_ids: Sequence[str], labels: Sequence[int] | np.ndarray,
                  num_folds: int = 5, seed: int = 0) -> np.ndarray:
  """Assigns each case to one of ``num_folds`` folds, patient-disjoint and label-stratified.

  Args:
    patient_ids: [N] patient identifier of each case (scans of one patient share it).
    labels: [N] 1 = COVID, 0 = CAP.
    num_folds: number of folds (>= 2).
    seed: shuffling seed.

  Returns:
    int32 [N] fold of each case in [0, num_folds).

  Raises:
    ValueError: fewer patients than folds, or mismatched lengths.
  """
  patient_ids = np.asarray([str(p) for p in patient_ids])
  labels = np.asarray(labels).astype(np.int64)
  if patient_ids.shape != labels.shape or labels.ndim != 1:
    raise ValueError(f"patient_ids {patient_ids.shape} and labels {labels.shape} differ")
  if num_folds < 2:
    raise ValueError(f"num_folds must be >= 2, got {num_folds}")
  num_patients = np.unique(patient_ids).size
  if num_patients < num_folds:
    raise ValueError(f"{num_patients} patient(s) cannot fill {num_folds} folds")
  # Group ids numbered in sorted patient-id order: independent of row order and string hashing.
  _, group = np.unique(patient_ids, return_inverse=True)
  folds = np.full(labels.shape, -1, np.int32)
  splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, group)):
    folds[val] = k
  assert (folds >= 0).all()
  return folds


def assign_splits(splits: Sequence[str], patient_ids: Sequence[str],
                  labels: Sequence[int] | np.ndarray, num_folds: int = 5,
                  seed: int = 0) -> np.ndarray:
  """Folds for the training-validation cases and -1 for the manifest's test cases.

  Args:
    splits: [N] the manifest ``split`` column: "test" or one of ``TV_SPLITS`` (case-insensitive,
      empty = training-validation).
    patient_ids: [N] patient ids.
    labels: [N] 1 = COVID, 0 = CAP.
    num_folds: folds of the training-validation cases.
    seed: shuffling seed.

  Returns:
    int32 [N]: fold in [0, num_folds) for training-validation cases, ``TEST_FOLD`` (-1) for test.

  Raises:
    ValueError: unknown split value, or a patient with scans in both sets (leakage).
  """
  splits = np.asarray([str(s).strip().lower() for s in splits])
  patient_ids = np.asarray([str(p) for p in patient_ids])
  labels = np.asarray(labels)
  if not splits.shape == patient_ids.shape == labels.shape:
    raise ValueError("splits, patient_ids and labels must have the same length")
  unknown = sorted(set(splits.tolist()) - set(TV_SPLITS) - set(TEST_SPLITS))
  if unknown:
    raise ValueError(f"unknown split value(s) {unknown}; use 'test' or one of {TV_SPLITS}")
  is_test = np.isin(splits, TEST_SPLITS)
  leaked = sorted(set(patient_ids[is_test].tolist()) & set(patient_ids[~is_test].tolist()))
  if leaked:
    raise ValueError(f"patient(s) in both the test and training-validation sets: {leaked[:10]}")
  folds = np.full(labels.shape, TEST_FOLD, np.int32)
  tv = np.flatnonzero(~is_test)
  if tv.size:
    folds[tv] = patient_folds(patient_ids[tv], labels[tv], num_folds, seed)
  return folds


def split_indices(folds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Training and validation case indices of fold ``k``.

  Args:
    folds: [N] from ``patient_folds`` or ``assign_splits`` (-1 = test, never returned).
    k: validation fold.

  Returns:
    (train_idx, val_idx): int64 sorted dataset indices.
  """
  folds = np.asarray(folds)
  if not 0 <= k <= int(folds.max(initial=-1)):
    raise ValueError(f"fold {k} out of range [0, {int(folds.max(initial=-1))}]")
  train = np.flatnonzero((folds >= 0) & (folds != k))
  val = np.flatnonzero(folds == k)
  return train, val


def heldout_test_indices(folds: np.ndarray) -> np.ndarray:
  """Indices of the independent test set (fold -1), int64 sorted."""
  return np.flatnonzero(np.asarray(folds) == TEST_FOLD)
