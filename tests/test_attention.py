"""The online attention module: T(A) against NumPy, and the stop-gradient semantics of Eq. 1."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dsan_jax.training import losses
from dsan_jax.models import DSAN, dsan


def _np_linear_resize_axis(a, axis, out):
  """Half-voxel-aligned linear interpolation along one axis (align_corners=False), edge-clamped."""
  n = a.shape[axis]
  src = (np.arange(out) + 0.5) * n / out - 0.5
  src = np.clip(src, 0, n - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  frac = src - lo
  shape = [1] * a.ndim
  shape[axis] = out
  frac = frac.reshape(shape)
  return np.take(a, lo, axis=axis) * (1 - frac) + np.take(a, hi, axis=axis) * frac


def np_attention(cam, shape, alpha=100.0, beta=0.4):
  up = cam.astype(np.float64)
  for axis, out in zip((1, 2, 3), shape):
    up = _np_linear_resize_axis(up, axis, out)
  lo = up.min(axis=(1, 2, 3), keepdims=True)
  hi = up.max(axis=(1, 2, 3), keepdims=True)
  norm = np.where(hi - lo > 1e-8, (up - lo) / np.where(hi - lo > 1e-8, hi - lo, 1), 0.0)
  return 1.0 / (1.0 + np.exp(-alpha * (norm - beta)))


class AttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention_matches_numpy(self):
    rng = np.random.default_rng(0)
    cam = np.maximum(rng.normal(size=(2, 3, 4, 5)), 0).astype(np.float32)
    shape = (35, 64, 77)
    got = self.variant(lambda c: dsan.attention_from_cam(c, shape, 100.0, 0.4))(cam)
    want = np_attention(cam, shape)
    chex.assert_shape(got, (2, *shape))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)

  def test_constant_map_gives_zeros_and_finite_grads(self):
    cam = jnp.zeros((2, 2, 2, 2))
    att = dsan.attention_from_cam(cam, (8, 8, 8), 100.0, 0.4)
    np.testing.assert_allclose(att, 1 / (1 + np.exp(40.0)), rtol=1e-6)
    g = jax.grad(lambda c: jnp.sum(dsan.attention_from_cam(c, (8, 8, 8), 100.0, 0.4)))(cam)
    chex.assert_tree_all_finite(g)

  def test_minmax_range(self):
    a = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))
    n = dsan.minmax_normalize(a)
    np.testing.assert_allclose(n.min(axis=(1, 2, 3)), 0.0, atol=1e-7)
    np.testing.assert_allclose(n.max(axis=(1, 2, 3)), 1.0, atol=1e-6)


def _grads(loss_kind):
  model = DSAN(width=4, stage_sizes=(1, 1, 1, 1))
  x = jax.random.uniform(jax.random.key(3), (2, 16, 32, 32, 1))
  mask = (jax.random.uniform(jax.random.key(4), (2, 16, 32, 32)) > 0.7).astype(jnp.float32)
  variables = model.init(jax.random.key(0), x)
  # Make the classifier weights non-trivial so the map is not constant.
  labels = jnp.array([1, 1])

  def loss_fn(params):
    (logits, aux), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, train=True, return_attention=True, mutable=["batch_stats"])
    if loss_kind == "attention":
      return jnp.mean(losses.attention_loss(aux["attention"], mask))
    return jnp.mean(losses.classification_loss(logits, labels))

  return jax.jit(jax.grad(loss_fn))(variables["params"])  # Eager would be op by op (slow).


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


def test_attention_loss_never_reaches_the_classifier():
  g = _grads("attention")
  assert _norm(g["classifier"]) == 0.0  # Exactly zero: the weights go through stop_gradient.
  assert _norm(g["backbone"]) > 0.0
  assert _norm(g["backbone"]["stem"]) > 0.0


def test_classification_loss_updates_the_classifier():
  g = _grads("classification")
  assert _norm(g["classifier"]["kernel"]) > 0.0
  assert _norm(g["classifier"]["bias"]) > 0.0
  assert _norm(g["backbone"]) > 0.0


def test_cam_uses_the_classifier_weights():
  """A equals ReLU(f . w) computed by hand from the features and the Dense kernel."""
  model = DSAN(width=4, stage_sizes=(1, 1, 1, 1))
  x = jax.random.uniform(jax.random.key(3), (2, 16, 32, 32, 1))
  v = model.init(jax.random.key(0), x)
  # Features from the backbone alone, with the same parameters.
  from dsan_jax.models import resnet3d
  backbone = resnet3d.ResNet3D(stage_sizes=(1, 1, 1, 1), width=4)
  feats = backbone.apply({"params": v["params"]["backbone"],
                          "batch_stats": v["batch_stats"]["backbone"]}, x)
  w = v["params"]["classifier"]["kernel"][:, 0]
  b = v["params"]["classifier"]["bias"][0]
  logits, aux = model.apply(v, x)
  np.testing.assert_allclose(aux["cam"], np.maximum(np.einsum("bdhwc,c->bdhw", feats, w), 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, feats.mean(axis=(1, 2, 3)) @ w + b, rtol=1e-5, atol=1e-6)
  _, aux_b = DSAN(width=4, stage_sizes=(1, 1, 1, 1), cam_use_bias=True).apply(v, x)
  np.testing.assert_allclose(aux_b["cam"],
                             np.maximum(np.einsum("bdhwc,c->bdhw", feats, w) + b, 0),
                             rtol=1e-5, atol=1e-6)
