"""The stem's separable max-pool (``resnet3d.max_pool_3x3x3_s2``) against NumPy and nn.max_pool."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsan_jax.models import resnet3d
from dsan_jax.models.dsan import DSAN


def _numpy_pool(x: np.ndarray, g: np.ndarray):
  """Loop reference: 3x3x3 stride 2 padding 1; gradient to the first max in (d, h, w) order."""
  b, d, h, w, c = x.shape
  out = [(n - 1) // 2 + 1 for n in (d, h, w)]
  y = np.full((b, *out, c), -np.inf, np.float64)
  dx = np.zeros(x.shape, np.float64)
  for n, od, oh, ow, ch in itertools.product(range(b), *map(range, out), range(c)):
    best, where = -np.inf, None
    for i, j, k in itertools.product(range(3), repeat=3):
      zd, zh, zw = 2 * od + i - 1, 2 * oh + j - 1, 2 * ow + k - 1
      if 0 <= zd < d and 0 <= zh < h and 0 <= zw < w and x[n, zd, zh, zw, ch] > best:
        best, where = x[n, zd, zh, zw, ch], (n, zd, zh, zw, ch)
    y[n, od, oh, ow, ch] = best
    dx[where] += g[n, od, oh, ow, ch]
  return y, dx


def _reference_flax(x):
  return nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)


def _grad(fn, x, g):
  return np.asarray(jax.grad(lambda v: jnp.sum(fn(v) * g))(x))


@pytest.mark.parametrize("shape", [(2, 7, 8, 9, 3), (1, 6, 5, 4, 2), (1, 1, 2, 3, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_numpy_reference(shape, ties):
  rng = np.random.default_rng(sum(shape) + ties)
  # Ties: small integers, and many zeros as after the stem's ReLU.
  x = (np.maximum(rng.integers(-2, 3, shape), 0) if ties
       else rng.standard_normal(shape)).astype(np.float32)
  g = rng.standard_normal([shape[0], *[(n - 1) // 2 + 1 for n in shape[1:4]], shape[4]])
  g = g.astype(np.float32)
  y_ref, dx_ref = _numpy_pool(x, g)
  y = np.asarray(resnet3d.max_pool_3x3x3_s2(x))
  np.testing.assert_array_equal(y, y_ref.astype(np.float32))
  dx = _grad(resnet3d.max_pool_3x3x3_s2, x, g)
  np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_equals_flax_max_pool_jitted(ties):
  rng = np.random.default_rng(3)
  shape = (2, 9, 10, 11, 4)
  x = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
  fast, ref = jax.jit(resnet3d.max_pool_3x3x3_s2), jax.jit(_reference_flax)
  np.testing.assert_array_equal(np.asarray(fast(x)), np.asarray(ref(x)))
  g = rng.standard_normal(ref(x).shape).astype(np.float32)
  # Ties go to the same element (an O(1) difference otherwise); sums of several windows'
  # gradients may round differently.
  np.testing.assert_allclose(_grad(fast, x, g), _grad(ref, x, g), rtol=0, atol=1e-6)


def test_stem_pool_switch():
  x = np.random.default_rng(0).standard_normal((1, 4, 4, 4, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(resnet3d.stem_max_pool(x, "slices")),
                                np.asarray(resnet3d.stem_max_pool(x, "reduce_window")))
  with pytest.raises(ValueError, match="Unknown stem pool"):
    resnet3d.stem_max_pool(x, "avg")


def test_stem_pool_is_a_model_attribute():
  """``DSAN(stem_pool=...)`` picks the implementation: same logits, bad names refused."""
  x = np.random.default_rng(1).standard_normal((1, 8, 16, 16, 1)).astype(np.float32)
  kw = dict(depth=10, width=4)
  variables = DSAN(**kw).init(jax.random.key(0), x)
  a, _ = DSAN(**kw, stem_pool="slices").apply(variables, x)
  b, _ = DSAN(**kw, stem_pool="reduce_window").apply(variables, x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="stem_pool must be one of"):
    DSAN(**kw, stem_pool="avg").init(jax.random.key(0), x)
