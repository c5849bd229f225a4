"""Maps that explain a prediction: Grad-CAM of any DSAN network and the attention T(A).

The paper (Fig. 5) shows, for the baseline "RN34 + US" (no attention module), Grad-CAM
(Selvaraju et al.) computed after training, and for the attention models the online attention map
``T(A)`` of Eq. 2. This module computes both from the same forward pass:

* ``grad_cam``: the gradient of the COVID logit with respect to the last feature map ``f``
  [B, d, h, w, C], averaged over space to one weight per channel, then ``ReLU(sum_c weight_c f_c)``.
  For DSAN's head (global average pooling + one Dense unit) the gradient is ``w / (d h w)`` at
  every voxel, so Grad-CAM equals the CAM ``A = ReLU(f . w)`` divided by ``d h w``: the two
  differ only by a positive factor, which ``tests/test_explanation.py`` checks exactly.
  The gradient is taken through the network's own head (``params['classifier']``) by
  differentiation, not by that identity, so the check is independent.
* ``attention_maps``: for one preprocessed volume, the CAM, Grad-CAM and ``T(A)`` (computed by
  the model itself), plus the maps at input resolution for display and for the attention-quality
  numbers (``upsample`` + per-volume min-max, as ``dsan.attention_from_cam`` does before Eq. 2).

Grad-CAM is taken for the COVID class (the positive logit) for every case, the class whose
evidence the attention module is trained to localise, so that the maps of all models answer
the same question. ``sign=-1`` gives the CAP map.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dsan_jax.models import dsan as dsan_lib


def _features_filter(module, method_name: str) -> bool:
  # The backbone's output is the last feature map f; nothing else is captured.
  return method_name == "__call__" and module.name == "backbone"


def _head_logit(classifier_params: dict, f: jax.Array, dtype=jnp.float32) -> jax.Array:
  """DSAN's head on features f [B, d, h, w, C]: GAP then Dense(1). Returns [B] logits."""
  pooled = jnp.mean(f.astype(dtype), axis=(1, 2, 3))
  return (pooled @ classifier_params["kernel"].astype(dtype)
          + classifier_params["bias"].astype(dtype))[:, 0]


def forward_with_maps(model: dsan_lib.DSAN, variables: dict, x: jax.Array,
                      sign: float = 1.0) -> dict[str, jax.Array]:
  """One forward pass returning the logits, the CAM, T(A), Grad-CAM and the features.

  Args:
    model: a ``DSAN`` (with or without the attention module).
    variables: {"params": ..., "batch_stats": ...}.
    x: [B, D, H, W, 1] preprocessed input.
    sign: +1 for the COVID class (the logit), -1 for CAP.

  Returns:
    dict with ``logits`` [B], ``prob`` [B] (sigmoid), ``cam`` [B, d, h, w] (A, Eq. 1),
    ``attention`` [B, D, H, W] (T(A), Eq. 2, computed by the model for every variant),
    ``grad_cam`` [B, d, h, w], ``head_logits`` [B] (the head re-applied to the captured
    features; equals ``logits``).
  """
  chex.assert_rank(x, 5)
  (logits, aux), state = model.apply(variables, x, train=False, return_attention=True,
                                     capture_intermediates=_features_filter,
                                     mutable=["intermediates"])
  # The head runs in at least float32, as in DSAN, whatever the backbone's compute dtype.
  head_dtype = jnp.promote_types(model.dtype, jnp.float32)
  f = state["intermediates"]["backbone"]["__call__"][0].astype(head_dtype)  # [B, d, h, w, C]
  head = functools.partial(_head_logit, variables["params"]["classifier"], dtype=head_dtype)
  # Each logit depends only on its own case's features, so the gradient of the sum gives every
  # case's gradient at once.
  grads = jax.grad(lambda feats: sign * jnp.sum(head(feats)))(f)
  channel_weights = jnp.mean(grads, axis=(1, 2, 3))  # [B, C]
  gcam = jax.nn.relu(jnp.einsum("bdhwc,bc->bdhw", f, channel_weights))
  return dict(logits=logits, prob=jax.nn.sigmoid(logits), cam=aux["cam"],
              attention=aux["attention"], grad_cam=gcam, head_logits=head(f))


def grad_cam(model: dsan_lib.DSAN, variables: dict, x: jax.Array,
             sign: float = 1.0) -> jax.Array:
  """Grad-CAM of the COVID logit (``sign=-1``: of CAP) at feature resolution.

  Args:
    model: a ``DSAN``.
    variables: {"params": ..., "batch_stats": ...}.
    x: [B, D, H, W, 1] preprocessed input.
    sign: +1 (COVID) or -1 (CAP).

  Returns:
    [B, d, h, w] float32, non-negative: ``ReLU(sum_c mean_xyz(d logit / d f_c) f_c)``.
  """
  return forward_with_maps(model, variables, x, sign)["grad_cam"]


def upsample_normalized(maps: jax.Array, shape) -> jax.Array:
  """[B, d, h, w] -> [B, D, H, W]: trilinear up-sampling, then per-volume min-max to [0, 1].

  The same operations as ``dsan.attention_from_cam`` before the sigmoid of Eq. 2, so that a
  baseline's Grad-CAM and an attention model's CAM are displayed on the same footing.
  """
  return dsan_lib.minmax_normalize(dsan_lib.upsample_trilinear(maps.astype(jnp.float32), shape))


@functools.lru_cache(maxsize=16)
def _jitted_maps(model: dsan_lib.DSAN):
  def fn(variables, x):
    out = forward_with_maps(model, variables, x)
    shape = x.shape[1:4]
    out["cam_up"] = upsample_normalized(out["cam"], shape)
    out["grad_cam_up"] = upsample_normalized(out["grad_cam"], shape)
    del out["head_logits"]
    return out
  return jax.jit(fn)


def batch_maps(model: dsan_lib.DSAN, variables: dict, images: np.ndarray) -> dict[str, np.ndarray]:
  """Maps of a batch of preprocessed volumes, on the host.

  Args:
    model: a ``DSAN``.
    variables: {"params": ..., "batch_stats": ...}.
    images: [B, D, H, W] float32 preprocessed volumes (windowed, lung-masked, padded).

  Returns:
    dict of NumPy arrays: ``prob`` [B], ``logits`` [B], ``cam`` and ``grad_cam`` [B, d, h, w],
    ``attention`` (T(A)), ``cam_up`` and ``grad_cam_up`` (up-sampled, min-max) [B, D, H, W].
  """
  images = np.asarray(images, np.float32)
  chex.assert_rank(images, 4)
  out = _jitted_maps(model)(variables, images[..., None])
  return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def display_map(maps: dict[str, np.ndarray], attention_model: bool) -> np.ndarray:
  """The map shown for a model (Fig. 5): T(A) for attention models, else up-sampled Grad-CAM.

  Args:
    maps: one case's entry of ``batch_maps`` (arrays without the batch axis).
    attention_model: whether the network was trained with the attention module.

  Returns:
    [D, H, W] float32 map in [0, 1].
  """
  return np.asarray(maps["attention"] if attention_model else maps["grad_cam_up"], np.float32)


def variables_of(state: Any) -> dict:
  """{"params", "batch_stats"} of a train state."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def attention_maps(trained: Any, image: np.ndarray) -> dict[str, Any]:
  """All maps of one preprocessed volume under one trained model.

  Args:
    trained: ``runs.TrainedModel`` (config, model, state).
    image: [D, H, W] preprocessed volume (``load_and_preprocess(...).image``).

  Returns:
    dict with ``prob`` (float), ``cam`` and ``grad_cam`` [d, h, w], ``attention`` [D, H, W]
    (T(A); for the baseline it is what T would give on its CAM, the model never trained it),
    ``cam_up`` / ``grad_cam_up`` [D, H, W] (up-sampled, min-max normalised) and ``display``
    [D, H, W] (``display_map``).
  """
  image = np.asarray(image, np.float32)
  chex.assert_rank(image, 3)
  out = batch_maps(trained.model, variables_of(trained.state), image[None])
  one = {k: v[0] for k, v in out.items()}
  one["prob"] = float(one["prob"])
  one["logits"] = float(one["logits"])
  one["display"] = display_map(one, bool(trained.model.attention))
  return one
