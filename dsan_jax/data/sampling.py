"""Index samplers: uniform (US) and the paper's size-balanced sampling (SS), Section III-C.

Both samplers are pure functions of ``(seed, epoch, position)``: the record drawn at global
position ``g`` of the stream is ``sampler.record_key(g)``, with ``epoch = g // epoch_length``.
Nothing depends on how many records were read before, so resuming from a step is exact and
sharding over hosts is a slicing of the same global stream (see ``dsan_jax.data.pipeline``).

An epoch's order is computed in one vectorised NumPy call and cached (two epochs), so the
per-record cost is an array lookup.

Size-balanced groups (paper, Section III-C), with r the infection/lung volume ratio:

  group 0  COVID, small infection:  r <  covid_small (0.030)
  group 1  COVID, large infection:  r >= covid_small
  group 2  CAP,   small infection:  r <= cap_small   (0.001)
  group 3  CAP,   large infection:  r >  cap_small

Group weights are ``[N1 / N0, 1, 1, N2 / N3]`` and a draw picks group g with probability
``w_g / sum(w)``, then a case of that group uniformly.

Fallbacks (documented here and in docs/synthetic.md):
  * Empty group: its weight is 0, so it is never drawn and the other probabilities still
    sum to 1.
  * The reference group of an up-weighted group is empty (e.g. COVID cases exist but all are
    small, N1 = 0 < N0): the formula would give weight 0 to a non-empty group and never train
    on it, so that group's weight falls back to 1 (uniform within the class).
  * Unknown ratio (NaN): the case joins the *majority* group of its class (COVID -> group 1,
    CAP -> group 2). These groups are the ones the paper does not up-weight, so a case of
    unknown size is trained at the base rate, never over-sampled; it counts in N1 or N2.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

COVID_SMALL, COVID_LARGE, CAP_SMALL, CAP_LARGE = 0, 1, 2, 3
GROUP_NAMES = ("covid_small", "covid_large", "cap_small", "cap_large")

# Stream tags keep the uniform and size-balanced random streams independent for one seed.
_UNIFORM_TAG = 0x5553  # "US"
_SIZE_BALANCED_TAG = 0x5353  # "SS"


def size_groups(labels: Sequence[int] | np.ndarray,
                ratios: Sequence[float] | np.ndarray,
                covid_small: float = 0.030,
                cap_small: float = 0.001) -> np.ndarray:
  """Assigns every case to one of the four size-balanced groups.

  Args:
    labels: [N] 1 = COVID, 0 = CAP.
    ratios: [N] infection/lung volume ratio; NaN = unknown (see module docstring).
    covid_small: COVID cases with r < covid_small are "small".
    cap_small: CAP cases with r <= cap_small are "small".

  Returns:
    groups: int32 [N] in {0, 1, 2, 3}.
  """
  labels = np.asarray(labels)
  ratios = np.asarray(ratios, dtype=np.float64)
  if labels.ndim != 1 or labels.shape != ratios.shape:
    raise ValueError(f"labels {labels.shape} and ratios {ratios.shape} must be equal 1-D shapes")
  bad = ~np.isin(labels, (0, 1))
  if bad.any():
    raise ValueError(f"labels must be 0 (CAP) or 1 (COVID); got {np.unique(labels[bad])}")
  unknown = np.isnan(ratios)
  # NaN comparisons are False, so unknown COVID -> large (1) and unknown CAP -> small (2).
  covid_group = np.where(ratios < covid_small, COVID_SMALL, COVID_LARGE)
  cap_group = np.where(ratios > cap_small, CAP_LARGE, CAP_SMALL)
  groups = np.where(labels == 1, covid_group, cap_group)
  groups[unknown & (labels == 1)] = COVID_LARGE
  groups[unknown & (labels == 0)] = CAP_SMALL
  return groups.astype(np.int32)


def group_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
  """The paper's group weights ``[N1/N0, 1, 1, N2/N3]`` with the empty-group fallbacks.

  Args:
    counts: [4] number of cases per group.

  Returns:
    float64 [4] unnormalised weights; 0 for empty groups.
  """
  n = np.asarray(counts, dtype=np.float64)
  if n.shape != (4,) or (n < 0).any():
    raise ValueError(f"counts must be 4 non-negative numbers, got {counts!r}")
  w = np.zeros(4, np.float64)
  w[COVID_LARGE] = 1.0 if n[COVID_LARGE] > 0 else 0.0
  w[CAP_SMALL] = 1.0 if n[CAP_SMALL] > 0 else 0.0
  if n[COVID_SMALL] > 0:
    w[COVID_SMALL] = n[COVID_LARGE] / n[COVID_SMALL] if n[COVID_LARGE] > 0 else 1.0
  if n[CAP_LARGE] > 0:
    w[CAP_LARGE] = n[CAP_SMALL] / n[CAP_LARGE] if n[CAP_SMALL] > 0 else 1.0
  return w


def size_balanced_probabilities(labels: Sequence[int] | np.ndarray,
                                ratios: Sequence[float] | np.ndarray,
                                covid_small: float = 0.030,
                                cap_small: float = 0.001) -> tuple[np.ndarray, np.ndarray]:
  """Groups and group-draw probabilities of the size-balanced sampler (Section III-C).

  Args:
    labels: [N] 1 = COVID, 0 = CAP (the training fold's cases).
    ratios: [N] infection/lung volume ratios (NaN = unknown).
    covid_small: threshold of the small-infection COVID group (r < covid_small).
    cap_small: threshold of the small-infection CAP group (r <= cap_small).

  Returns:
    groups: int32 [N] group of each case (0 covid small, 1 covid large, 2 cap small,
      3 cap large).
    probs: float64 [4] probability of drawing each group; 0 for empty groups; sums to 1.

  Raises:
    ValueError: no cases at all.
  """
  groups = size_groups(labels, ratios, covid_small, cap_small)
  if groups.size == 0:
    raise ValueError("size_balanced_probabilities needs at least one case")
  w = group_weights(np.bincount(groups, minlength=4))
  return groups, w / w.sum()


class _EpochSampler:
  """Shared machinery: a stream of dataset indices, ``epoch_length`` records per epoch."""

  def __init__(self, indices: Sequence[int] | np.ndarray, seed: int,
               num_epochs: int | None = None):
    self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if self.indices.size == 0:
      raise ValueError(f"{type(self).__name__} needs at least one training index")
    self.seed = int(seed)
    self.num_epochs = num_epochs
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain may read from several threads.

  @property
  def epoch_length(self) -> int:
    """Records per epoch: the number of training cases."""
    return int(self.indices.size)

  def _compute_epoch(self, epoch: int) -> np.ndarray:
    raise NotImplementedError

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """Dataset indices of one epoch in draw order, int64 [epoch_length]."""
    epoch = int(epoch)
    if epoch < 0:
      raise ValueError(f"epoch must be >= 0, got {epoch}")
    with self._lock:
      out = self._cache.get(epoch)
      if out is None:
        out = self._compute_epoch(epoch)
        out.setflags(write=False)
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = out
    return out

  def record_key(self, position: int) -> int:
    """Dataset index drawn at global stream position ``position``."""
    epoch, k = divmod(int(position), self.epoch_length)
    return int(self.epoch_indices(epoch)[k])

  def __len__(self) -> int:
    if self.num_epochs is None:
      raise TypeError(f"{type(self).__name__} with num_epochs=None is infinite")
    return self.num_epochs * self.epoch_length

  def __getitem__(self, position: int):
    """grain ``Sampler`` protocol: ``RecordMetadata`` for a global position."""
    import grain.python as gp  # Deferred: only the grain DataLoader path needs it.

    if position < 0 or (self.num_epochs is not None and position >= len(self)):
      raise IndexError(position)
    return gp.RecordMetadata(index=int(position), record_key=self.record_key(position))

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_cache"] = {}  # Worker processes recompute; keeps pickles small.
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class UniformSampler(_EpochSampler):
  """Uniform sampling (US): every training case exactly once per epoch, reshuffled each epoch.

  The order of epoch e is ``indices[permutation(PCG64(seed, e))]``.

  Args:
    indices: [N] dataset indices of the training cases.
    seed: sampler seed.
    num_epochs: for the grain ``Sampler`` protocol (``__len__``/``IndexError``); None = infinite.
  """

  def _compute_epoch(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch, _UNIFORM_TAG])
    return self.indices[rng.permutation(self.indices.size)]


class SizeBalancedSampler(_EpochSampler):
  """Size-balanced sampling (SS, Section III-C): group by probability, then a case uniformly.

  An epoch is ``len(indices)`` independent draws (with replacement). Group statistics come from
  the training cases only.

  Args:
    indices: [N] dataset indices of the training cases.
    labels: labels of the *whole dataset* (indexed by ``indices``), 1 = COVID, 0 = CAP.
    ratios: infection ratios of the whole dataset (NaN = unknown).
    seed: sampler seed.
    covid_small: see ``size_balanced_probabilities``.
    cap_small: see ``size_balanced_probabilities``.
    num_epochs: see ``UniformSampler``.
  """

  def __init__(self, indices, labels, ratios, seed: int, covid_small: float = 0.030,
               cap_small: float = 0.001, num_epochs: int | None = None):
    super().__init__(indices, seed, num_epochs)
    labels = np.asarray(labels)[self.indices]
    ratios = np.asarray(ratios, dtype=np.float64)[self.indices]
    self.groups, self.probs = size_balanced_probabilities(labels, ratios, covid_small, cap_small)
    self.counts = np.bincount(self.groups, minlength=4)
    # Members of each group laid out contiguously: group g is order[offsets[g]:offsets[g+1]].
    self._order = np.argsort(self.groups, kind="stable")
    self._offsets = np.concatenate([[0], np.cumsum(self.counts)])

  def _compute_epoch(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch, _SIZE_BALANCED_TAG])
    n = self.epoch_length
    g = rng.choice(4, size=n, p=self.probs)
    # floor(u * count) is uniform over the group's members; a zero-probability (empty) group is
    # never chosen, so count > 0 wherever it is used.
    within = np.minimum((rng.random(n) * self.counts[g]).astype(np.int64), self.counts[g] - 1)
    return self.indices[self._order[self._offsets[g] + within]]
