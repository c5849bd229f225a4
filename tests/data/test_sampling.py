"""Size-balanced and uniform samplers (paper Section III-C)."""

import numpy as np
import pytest
from scipy import stats

from dsan_jax.data import sampling


def _fixture_with_counts(n_cs, n_cl, n_ps, n_pl, seed=0):
  """Labels/ratios with exactly the given group counts, in a shuffled order."""
  rng = np.random.default_rng(seed)
  labels = [1] * (n_cs + n_cl) + [0] * (n_ps + n_pl)
  ratios = ([0.0, 0.029, 0.001][i % 3] for i in range(n_cs))
  ratios = (list(ratios) + [[0.030, 0.2][i % 2] for i in range(n_cl)]
            + [[0.0, 0.001][i % 2] for i in range(n_ps)]
            + [[0.0011, 0.3][i % 2] for i in range(n_pl)])
  perm = rng.permutation(len(labels))
  return np.asarray(labels)[perm], np.asarray(ratios)[perm]


def test_groups_use_the_papers_thresholds_and_edges():
  labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
  ratios = np.array([0.0299, 0.030, 0.5, 0.001, 0.0010001, 0.0, np.nan, np.nan])
  groups = sampling.size_groups(labels, ratios)
  # r < 0.030 small COVID; r >= 0.030 large; r <= 0.001 small CAP; NaN -> majority group.
  np.testing.assert_array_equal(groups, [0, 1, 1, 2, 3, 2, 1, 2])
  assert groups.dtype == np.int32


def test_weights_equal_the_formula_on_known_counts():
  n = (6, 9, 12, 8)  # covid small, covid large, cap small, cap large
  labels, ratios = _fixture_with_counts(*n)
  groups, probs = sampling.size_balanced_probabilities(labels, ratios)
  np.testing.assert_array_equal(np.bincount(groups, minlength=4), n)
  w = np.array([9 / 6, 1.0, 1.0, 12 / 8])  # [N_cl/N_cs, 1, 1, N_ps/N_pl]
  np.testing.assert_allclose(probs, w / w.sum(), rtol=0, atol=1e-15)
  assert probs.dtype == np.float64


@pytest.mark.parametrize("counts, expected_w", [
    ((0, 5, 4, 2), [0, 1, 1, 2.0]),  # no small COVID: weight 0, never drawn
    ((3, 0, 4, 2), [1, 0, 1, 2.0]),  # no large COVID: small COVID falls back to 1
    ((3, 6, 0, 2), [2, 1, 0, 1.0]),  # no small CAP: large CAP falls back to 1
    ((3, 6, 4, 0), [2, 1, 1, 0.0]),  # no large CAP
    ((0, 0, 4, 0), [0, 0, 1, 0.0]),  # one group only
])
def test_empty_groups_do_not_crash(counts, expected_w):
  labels, ratios = _fixture_with_counts(*counts)
  groups, probs = sampling.size_balanced_probabilities(labels, ratios)
  np.testing.assert_allclose(sampling.group_weights(np.bincount(groups, minlength=4)),
                             expected_w)
  assert abs(probs.sum() - 1.0) < 1e-12
  assert (probs[np.asarray(counts) == 0] == 0).all()
  sampler = sampling.SizeBalancedSampler(np.arange(len(labels)), labels, ratios, seed=0)
  drawn_groups = groups[sampler.epoch_indices(0)]
  assert set(drawn_groups.tolist()) <= set(np.flatnonzero(probs > 0).tolist())


def test_no_cases_raises():
  with pytest.raises(ValueError):
    sampling.size_balanced_probabilities(np.zeros(0, int), np.zeros(0))


def test_group_frequencies_match_probabilities_chi_square():
  labels, ratios = _fixture_with_counts(5, 15, 30, 6)
  idx = np.arange(len(labels))
  sampler = sampling.SizeBalancedSampler(idx, labels, ratios, seed=1234)
  draws = np.concatenate([sampler.epoch_indices(e) for e in range(200)])  # 11200 draws
  groups, probs = sampling.size_balanced_probabilities(labels, ratios)
  observed = np.bincount(groups[draws], minlength=4)
  _, p = stats.chisquare(observed, probs * draws.size)
  assert p > 0.01, (observed, probs * draws.size)
  # Within a group the case is uniform: chi-square over the members of the largest group.
  members = np.flatnonzero(groups == 2)
  per_case = np.bincount(draws, minlength=len(labels))[members]
  _, p_within = stats.chisquare(per_case)
  assert p_within > 0.01
  # Over-sampling really happens: a small-COVID case is drawn more than a large-COVID one.
  counts = np.bincount(draws, minlength=len(labels))
  assert counts[groups == 0].mean() > 2 * counts[groups == 1].mean()


def test_size_balanced_uses_only_training_indices():
  labels, ratios = _fixture_with_counts(4, 4, 4, 4)
  train = np.array([0, 2, 3, 5, 7, 11, 13])
  sampler = sampling.SizeBalancedSampler(train, labels, ratios, seed=0)
  drawn = np.concatenate([sampler.epoch_indices(e) for e in range(20)])
  assert set(drawn.tolist()) <= set(train.tolist())
  assert sampler.epoch_indices(0).size == train.size
  np.testing.assert_array_equal(sampler.counts,
                                np.bincount(sampling.size_groups(labels[train], ratios[train]),
                                            minlength=4))


def test_uniform_each_case_once_per_epoch_and_reshuffled():
  idx = np.array([3, 8, 9, 14, 20, 21, 40, 41, 42, 50])
  sampler = sampling.UniformSampler(idx, seed=7)
  orders = [sampler.epoch_indices(e) for e in range(4)]
  for o in orders:
    np.testing.assert_array_equal(np.sort(o), idx)
  assert len({tuple(o) for o in orders}) == 4  # order changes between epochs
  # Global positions map onto (epoch, position) exactly.
  stream = [sampler.record_key(g) for g in range(4 * idx.size)]
  np.testing.assert_array_equal(stream, np.concatenate(orders))


@pytest.mark.parametrize("make", [
    lambda seed: sampling.UniformSampler(np.arange(30), seed),
    lambda seed: sampling.SizeBalancedSampler(np.arange(30), np.arange(30) % 2,
                                              np.linspace(0, 0.06, 30), seed),
])
def test_deterministic_from_seed(make):
  a, b, c = make(3), make(3), make(4)
  for e in (0, 5):
    np.testing.assert_array_equal(a.epoch_indices(e), b.epoch_indices(e))
  assert not np.array_equal(a.epoch_indices(0), c.epoch_indices(0))
  # Pure function of position: reading out of order gives the same records.
  keys = [a.record_key(g) for g in (95, 3, 61, 3, 0)]
  fresh = make(3)
  assert keys == [fresh.record_key(g) for g in (95, 3, 61, 3, 0)]


def test_grain_sampler_protocol():
  s = sampling.UniformSampler(np.arange(5) + 10, seed=0, num_epochs=2)
  assert len(s) == 10
  md = s[7]
  assert md.index == 7 and md.record_key == s.record_key(7)
  with pytest.raises(IndexError):
    s[10]


def test_works_as_a_grain_dataloader_sampler():
  gp = pytest.importorskip("grain.python")
  source = list(range(100, 106))  # record_key -> value
  s = sampling.UniformSampler(np.arange(6), seed=0, num_epochs=2)
  shards = [[int(r) for r in gp.DataLoader(data_source=source, sampler=s, worker_count=0,
                                           shard_options=gp.ShardOptions(p, 2))]
            for p in range(2)]
  stream = np.concatenate([s.epoch_indices(0), s.epoch_indices(1)]) + 100
  # grain's DataLoader gives shard p the positions p, p + 2, ...
  np.testing.assert_array_equal(shards[0], stream[0::2])
  np.testing.assert_array_equal(shards[1], stream[1::2])
