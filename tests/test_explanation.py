"""Grad-CAM and attention maps (dsan_jax.evaluation.explanation)."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsan_jax.evaluation import explanation
from dsan_jax.models import dsan as dsan_lib
from dsan_jax.models import resnet3d

SHAPE = (32, 32, 32)  # Features 2 x 2 x 2: enough voxels for a map with structure.


@functools.lru_cache(maxsize=None)
def _init():
  # One initialisation shared by every test: the parameters do not depend on the attention
  # flag or on cam_use_bias (both only change how the CAM is used).
  model = dsan_lib.DSAN(width=4, stage_sizes=(1, 1, 1, 1))
  x = jax.random.uniform(jax.random.key(10), (2, *SHAPE, 1))
  v = model.init(jax.random.key(0), x)
  # A non-zero classifier bias, so that a mistaken use of the bias would show.
  v["params"]["classifier"]["bias"] = jnp.array([0.3], jnp.float32)
  return v, x


def _model_and_vars(attention: bool, cam_use_bias: bool = False):
  v, x = _init()
  model = dsan_lib.DSAN(width=4, stage_sizes=(1, 1, 1, 1), attention=attention,
                        cam_use_bias=cam_use_bias)
  return model, v, x


def _features(v, x):
  backbone = resnet3d.ResNet3D(stage_sizes=(1, 1, 1, 1), width=4)
  return np.asarray(backbone.apply({"params": v["params"]["backbone"],
                                    "batch_stats": v["batch_stats"]["backbone"]}, x))


@pytest.mark.parametrize("attention", [True, False])
def test_grad_cam_is_the_cam_divided_by_the_number_of_voxels(attention):
  """GAP + Dense: d logit / d f = w / (d h w) everywhere, so Grad-CAM = CAM / (d h w) exactly."""
  model, v, x = _model_and_vars(attention)
  _, aux = model.apply(v, x)
  gcam = np.asarray(explanation.grad_cam(model, v, x))
  cam = np.asarray(aux["cam"])
  assert gcam.shape == cam.shape == (2, 2, 2, 2)
  assert cam.max() > 0 and np.any(cam == 0)  # Structure: ReLU clips some voxels, not all.
  n = np.prod(cam.shape[1:])
  np.testing.assert_allclose(gcam * n, cam, rtol=1e-5, atol=1e-6)
  # And against the hand-computed ReLU(f . w) / N from the backbone features.
  f = _features(v, x)
  w = np.asarray(v["params"]["classifier"]["kernel"])[:, 0]
  np.testing.assert_allclose(gcam, np.maximum(np.einsum("bdhwc,c->bdhw", f, w), 0) / n,
                             rtol=1e-5, atol=1e-7)


def test_grad_cam_of_cap_is_the_negative_part():
  model, v, x = _model_and_vars(True)
  f = _features(v, x)
  w = np.asarray(v["params"]["classifier"]["kernel"])[:, 0]
  n = np.prod(f.shape[1:4])
  gcam = np.asarray(explanation.grad_cam(model, v, x, sign=-1.0))
  np.testing.assert_allclose(gcam, np.maximum(-np.einsum("bdhwc,c->bdhw", f, w), 0) / n,
                             rtol=1e-5, atol=1e-7)


def test_grad_cam_ignores_the_bias_unlike_the_biased_cam():
  """With cam_use_bias the CAM shifts by b; Grad-CAM (a gradient) does not."""
  model, v, x = _model_and_vars(True, cam_use_bias=True)
  f = _features(v, x)
  w = np.asarray(v["params"]["classifier"]["kernel"])[:, 0]
  n = np.prod(f.shape[1:4])
  np.testing.assert_allclose(np.asarray(explanation.grad_cam(model, v, x)),
                             np.maximum(np.einsum("bdhwc,c->bdhw", f, w), 0) / n,
                             rtol=1e-5, atol=1e-7)


def test_forward_logits_match_the_head_on_captured_features():
  model, v, x = _model_and_vars(True)
  out = explanation.forward_with_maps(model, v, x)
  logits, _ = model.apply(v, x)
  np.testing.assert_allclose(out["head_logits"], logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["prob"], 1 / (1 + np.exp(-np.asarray(logits))), rtol=1e-5)


def test_upsample_normalized_then_eq2_is_the_models_attention():
  model, v, x = _model_and_vars(True)
  _, aux = model.apply(v, x, return_attention=True)
  t = dsan_lib.soft_mask(explanation.upsample_normalized(aux["cam"], SHAPE),
                         model.attention_alpha, model.attention_beta)
  np.testing.assert_allclose(t, aux["attention"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention", [True, False])
def test_attention_maps_of_one_volume(attention):
  model, v, x = _model_and_vars(attention)
  trained = types.SimpleNamespace(
      model=model, state=types.SimpleNamespace(params=v["params"],
                                               batch_stats=v["batch_stats"]))
  m = explanation.attention_maps(trained, np.asarray(x[0, ..., 0]))
  assert m["cam"].shape == m["grad_cam"].shape == (2, 2, 2)
  for k in ("attention", "cam_up", "grad_cam_up", "display"):
    assert m[k].shape == SHAPE
    assert np.all(np.isfinite(m[k])) and m[k].min() >= 0 and m[k].max() <= 1
  # min-max of an up-sampled non-constant map spans [0, 1] exactly.
  assert m["grad_cam_up"].min() == 0 and m["grad_cam_up"].max() == pytest.approx(1.0)
  # Grad-CAM and CAM differ by a positive factor, so their min-max maps agree.
  np.testing.assert_allclose(m["grad_cam_up"], m["cam_up"], atol=1e-5)
  logits, aux = model.apply(v, x[:1], return_attention=True)
  assert m["prob"] == pytest.approx(float(jax.nn.sigmoid(logits[0])), rel=1e-5)
  expected = aux["attention"][0] if attention else m["grad_cam_up"]
  np.testing.assert_allclose(m["display"], expected, rtol=1e-5, atol=1e-6)
