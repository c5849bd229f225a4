"""The Dual-Sampling Attention Network's classifier with its online attention module.

Section III-A/B of the paper. The network is a 3D ResNet whose features ``f`` ([B, d, h, w, C],
1/16 of the input) go through global average pooling and one Dense unit (the logit). The online
attention module reuses that Dense layer's kernel ``w`` as a 1x1x1 convolution (Eq. 1):

    A = ReLU(conv(f, stop_gradient(w)))                      [B, d, h, w]
    T(A) = sigmoid(alpha * (minmax(upsample(A)) - beta))     [B, D, H, W]   (Eq. 2)

``stop_gradient`` makes the 1x1x1 convolution a copy of the classifier that "is only updated by the
BCE loss": the attention loss reaches the backbone but never the classifier's parameters.

The bias: Eq. 1 names only the weight matrix ``w`` and the paper says the kernel weights of the
1x1x1 convolution are taken from the fully connected layer, so by default the Dense bias is NOT
added (``cam_use_bias=False``). Because GAP and the 1x1x1 convolution commute, ``mean(conv(f, w)) + b``
is exactly the logit; with ``cam_use_bias=True`` the map before ReLU is the per-voxel logit instead.
The bias shifts where ReLU clips, so the two choices give different maps; both are provided.
"""

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsan_jax.models import resnet3d

_EPS = 1e-8


def upsample_trilinear(cam: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Trilinear up-sampling with half-voxel alignment (PyTorch's ``align_corners=False``).

  Args:
    cam: [B, d, h, w] map at feature resolution.
    shape: (D, H, W) target size.

  Returns:
    [B, D, H, W] map.
  """
  chex.assert_rank(cam, 4)
  return jax.image.resize(cam, (cam.shape[0], *shape), method="trilinear", antialias=False)


def minmax_normalize(a: jax.Array) -> jax.Array:
  """Per-volume min-max normalisation to [0, 1].

  A constant map (max - min < 1e-8) has no location information and is mapped to zeros (so
  ``T(A)`` is ~0 everywhere) without dividing by zero; its gradient is then zero.

  Args:
    a: [B, ...] maps.

  Returns:
    [B, ...] maps in [0, 1].
  """
  axes = tuple(range(1, a.ndim))
  lo = jnp.min(a, axis=axes, keepdims=True)
  hi = jnp.max(a, axis=axes, keepdims=True)
  span = hi - lo
  ok = span > _EPS
  return jnp.where(ok, (a - lo) / jnp.where(ok, span, 1.0), 0.0)


def soft_mask(a: jax.Array, alpha: float, beta: float) -> jax.Array:
  """Eq. 2: ``T(A) = 1 / (1 + exp(-alpha (A - beta)))`` on a normalised map."""
  return jax.nn.sigmoid(alpha * (a - beta))


def attention_from_cam(cam: jax.Array, shape: Sequence[int], alpha: float,
                       beta: float) -> jax.Array:
  """``T(A)`` at input resolution from ``A`` at feature resolution.

  Args:
    cam: [B, d, h, w] ``A`` (non-negative).
    shape: (D, H, W) input size.
    alpha, beta: Eq. 2's constants.

  Returns:
    [B, D, H, W] attention in (0, 1), float32 (float64 for a float64 ``cam``).
  """
  up = upsample_trilinear(cam.astype(jnp.promote_types(cam.dtype, jnp.float32)), shape)
  return soft_mask(minmax_normalize(up), alpha, beta)


class DSAN(nn.Module):
  """3D ResNet classifier with the online attention module.

  ``DSAN()`` is the paper's network (ResNet34, last stage stride 1, attention on).
  ``DSAN(attention=False)`` is the baseline "RN34": the same network, whose maps are only used for
  explanation (for a GAP + Dense network Grad-CAM equals the CAM up to a positive factor).

  Call: ``logits, aux = model.apply(variables, x, train=..., return_attention=...)``, with
  ``x: [B, D, H, W, 1]``; ``logits: [B]`` (float32); ``aux['cam']: [B, d, h, w]`` is ``A``;
  with ``return_attention=True``, ``aux['attention']: [B, D, H, W]`` is ``T(A)``.
  """
  depth: int = 34
  width: int = 64
  stage_strides: Sequence[int] = (1, 2, 2, 1)
  stage_sizes: Sequence[int] | None = None  # Overrides ``depth``'s stage sizes (tiny presets).
  attention: bool = True
  attention_alpha: float = 100.0
  attention_beta: float = 0.4
  cam_use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "xla"
  remat: str = ""
  stem_pool: str = "slices"
  stem_conv_impl: str = "xla"
  conv_partitioned: bool = False  # oneDNN calls batch-partitioned (several devices: conv.py).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               return_attention: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    chex.assert_rank(x, 5)
    if self.depth not in resnet3d.STAGE_SIZES:
      raise ValueError(f"depth must be one of {sorted(resnet3d.STAGE_SIZES)}, got {self.depth}")
    backbone = resnet3d.ResNet3D(
        stage_sizes=self.stage_sizes or resnet3d.STAGE_SIZES[self.depth],
        block_cls=resnet3d.BLOCKS[self.depth], width=self.width,
        stage_strides=self.stage_strides, dtype=self.dtype, param_dtype=self.param_dtype,
        conv_impl=self.conv_impl, remat=self.remat, stem_pool=self.stem_pool,
        stem_conv_impl=self.stem_conv_impl, conv_partitioned=self.conv_partitioned,
        name="backbone")
    # The head (GAP, logit, CAM) runs in at least float32 whatever the backbone's dtype.
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    f = backbone(x, train=train).astype(head_dtype)  # [B, d, h, w, C]
    classifier = nn.Dense(1, dtype=head_dtype, param_dtype=self.param_dtype, name="classifier")
    logits = classifier(jnp.mean(f, axis=(1, 2, 3)))[:, 0]  # GAP -> Dense(1): [B]

    # Eq. 1 with the classifier's own parameters, frozen for the attention branch.
    w = jax.lax.stop_gradient(classifier.variables["params"]["kernel"])  # [C, 1]
    cam = jnp.einsum("bdhwc,c->bdhw", f, w[:, 0])
    if self.cam_use_bias:
      cam = cam + jax.lax.stop_gradient(classifier.variables["params"]["bias"])[0]
    cam = nn.relu(cam)
    aux = {"cam": cam}
    if return_attention:
      aux["attention"] = attention_from_cam(cam, x.shape[1:4], self.attention_alpha,
                                            self.attention_beta)
    return logits, aux


def model_from_config(model_config, device_count: int = 1) -> DSAN:
  """Builds ``DSAN`` from a ``config.model`` ConfigDict (see ``configs/default.py``) whose
  implementations ``dsan_jax.runtime.resolve_config`` has made concrete.

  Args:
    model_config: the resolved ``config.model``.
    device_count: the devices the runtime resolved (``config.runtime.device_count``); more than
      one makes the oneDNN convolutions batch-partitioned calls (nothing reads the device count
      while tracing).

  Raises:
    ValueError: ``conv_impl`` or ``stem_conv_impl`` is still "auto".
  """
  if "auto" in (model_config.conv_impl, model_config.get("stem_conv_impl")):
    raise ValueError("model.conv_impl/stem_conv_impl 'auto' must be resolved first: "
                     "dsan_jax.runtime.resolve_config(config)")
  dtype = jnp.dtype(model_config.dtype)
  stage_sizes = model_config.get("stage_sizes", None)
  return DSAN(
      depth=model_config.depth, width=model_config.width,
      stage_strides=tuple(model_config.stage_strides),
      stage_sizes=tuple(stage_sizes) if stage_sizes else None,
      attention=model_config.attention, attention_alpha=model_config.attention_alpha,
      attention_beta=model_config.attention_beta, cam_use_bias=model_config.cam_use_bias,
      dtype=dtype, conv_impl=model_config.conv_impl, remat=model_config.remat,
      stem_pool=model_config.get("stem_pool", "slices"),
      stem_conv_impl=model_config.get("stem_conv_impl", model_config.conv_impl),
      conv_partitioned=int(device_count) > 1)
