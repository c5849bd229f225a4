"""Eq. 3 and Eq. 4 against NumPy, and their guards."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dsan_jax.training import losses


def np_attention_loss(t, m):
  t, m = t.astype(np.float64), m.astype(np.float64)
  num = ((t - m) ** 2).sum(axis=(1, 2, 3))
  den = t.sum(axis=(1, 2, 3)) + m.sum(axis=(1, 2, 3))
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def np_bce(logits, labels):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


class LossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention_loss_matches_numpy(self):
    rng = np.random.default_rng(0)
    t = rng.random((4, 5, 6, 7)).astype(np.float32)
    m = (rng.random((4, 5, 6, 7)) > 0.6).astype(np.uint8)
    got = self.variant(losses.attention_loss)(t, m)
    np.testing.assert_allclose(got, np_attention_loss(t, m), rtol=1e-5)

  def test_empty_inputs_are_safe(self):
    z = jnp.zeros((2, 3, 3, 3))
    np.testing.assert_array_equal(losses.attention_loss(z, z), [0.0, 0.0])
    g = jax.grad(lambda t: jnp.sum(losses.attention_loss(t, z)))(z)
    chex.assert_tree_all_finite(g)
    # Empty mask, non-empty map: sum(T^2)/sum(T).
    t = jnp.full((1, 2, 2, 2), 0.5)
    np.testing.assert_allclose(losses.attention_loss(t, jnp.zeros_like(t)), [0.5])

  def test_classification_loss_matches_numpy(self):
    logits = np.array([-3.0, -0.5, 0.0, 2.0, 8.0], np.float32)
    labels = np.array([0, 1, 1, 0, 1])
    np.testing.assert_allclose(losses.classification_loss(logits, labels),
                               np_bce(logits, labels), rtol=1e-5)

  def test_total_loss_reduction_and_eligibility(self):
    rng = np.random.default_rng(1)
    b = 6
    logits = rng.normal(size=b).astype(np.float32)
    att = rng.random((b, 4, 4, 4)).astype(np.float32)
    mask = (rng.random((b, 4, 4, 4)) > 0.5).astype(np.uint8)
    labels = np.array([1, 1, 0, 0, 1, 1], np.int32)  # COVID, COVID, CAP, CAP, COVID, COVID
    has_mask = np.array([1, 0, 1, 0, 1, 1], bool)  # case 1: COVID without mask
    weight = np.array([1, 1, 1, 1, 1, 0], np.float32)  # case 5 is padding
    lam = 0.5
    loss, terms = losses.dsan_loss(logits, att, labels, mask, has_mask, weight, lam)
    lc = np_bce(logits, labels)
    lex = np_attention_loss(att, mask)
    eligible = np.array([1, 0, 0, 0, 1, 0], bool)
    want = ((lc + lam * np.where(eligible, lex, 0)) * weight).sum() / weight.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(terms["att_cases"], 2)
    np.testing.assert_allclose(terms["att_loss"], lex[eligible].mean(), rtol=1e-5)

  def test_cap_and_maskless_cases_add_no_attention_loss(self):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=3).astype(np.float32)
    att = rng.random((3, 4, 4, 4)).astype(np.float32)
    mask = (rng.random((3, 4, 4, 4)) > 0.5).astype(np.uint8)
    labels = np.array([0, 1, 0], np.int32)
    has_mask = np.array([1, 0, 0], bool)
    ones = np.ones(3, np.float32)
    with_att, _ = losses.dsan_loss(logits, att, labels, mask, has_mask, ones, 0.5)
    without, _ = losses.dsan_loss(logits, None, labels, None, has_mask, ones, 0.5)
    np.testing.assert_allclose(with_att, without, rtol=1e-6)
    np.testing.assert_allclose(without, np_bce(logits, labels).mean(), rtol=1e-5)
