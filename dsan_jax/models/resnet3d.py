"""3D ResNets (Hara et al., CVPR 2018) in ``flax.linen``, channels last ``[B, D, H, W, C]``.

DSAN (Section III-A) uses ResNet34 with the last stage's stride set to 1, so the features before
global average pooling are 1/16 of the input on every axis (ceil for odd sizes):
stem conv 7x7x7 stride 2 (1/2), max-pool 3x3x3 stride 2 (1/4), stages with strides (1, 2, 2, 1)
(1/4, 1/8, 1/16, 1/16).

Parameter names are explicit so that converters (e.g. ``benchmarks/torch_dsan.py``) can rely on them:
``stem/{conv_init,bn_init}``, ``stage{i}_block{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,proj_conv,proj_bn]}``.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dsan_jax.models.conv import Conv3D

ModuleDef = Any

REMAT_OPTIONS = ("", "stem", "blocks", "all")

# The stem's max-pool implementations (``ResNet3D.stem_pool``): "slices" (``max_pool_3x3x3_s2``)
# or "reduce_window" (``nn.max_pool``). Both give identical values and gradients
# (tests/test_maxpool.py); "slices" is faster on XLA:CPU, whose select-and-scatter backward of
# ``reduce_window`` is slow (docs/benchmarks.md).
STEM_POOL_OPTIONS = ("slices", "reduce_window")


def _pad_axis(x: jax.Array, axis: int) -> jax.Array:
  pad = [(0, 0, 0)] * x.ndim
  pad[axis] = (1, 1, 0)
  return lax.pad(x, jnp.array(-jnp.inf, x.dtype), pad)


def _taps(x: jax.Array, axis: int) -> list[jax.Array]:
  """The 3 stride-2 taps along ``axis`` of a window-3 padding-1 pool: tap t of output o is x[2o + t - 1].

  Args:
    x: [..., n, ...] input (unpadded along ``axis``).
    axis: the pooled axis.

  Returns:
    Three [..., ceil(n / 2), ...] arrays (-inf where a tap falls in the padding).
  """
  n_out = (x.shape[axis] - 1) // 2 + 1
  xp = _pad_axis(x, axis)
  return [lax.slice_in_dim(xp, t, t + 2 * n_out - 1, stride=2, axis=axis) for t in range(3)]


def _max_1d(x: jax.Array, axis: int) -> jax.Array:
  t0, t1, t2 = _taps(x, axis)
  return jnp.maximum(jnp.maximum(t0, t1), t2)


def _pool_forward(x: jax.Array) -> list[jax.Array]:
  """[x, max over w, max over (h, w), max over (d, h, w)]: the separable pool's stages."""
  stages = [x]
  for axis in (3, 2, 1):
    stages.append(_max_1d(stages[-1], axis))
  return stages


def _untap(c0: jax.Array, c1: jax.Array, c2: jax.Array, axis: int, n: int) -> jax.Array:
  """Adjoint of ``_taps``: the gradients of the three taps -> the gradient of the input.

  Input 2m is tap 1 of output m; input 2m + 1 is tap 2 of output m and tap 0 of output m + 1.

  Args:
    c0, c1, c2: [..., n_out, ...] gradients of taps 0, 1, 2.
    axis: the pooled axis.
    n: input size along ``axis`` (2 n_out - 1 or 2 n_out).

  Returns:
    [..., n, ...] gradient w.r.t. the input.
  """
  zero = jnp.zeros_like(lax.slice_in_dim(c0, 0, 1, axis=axis))
  odd = c2 + jnp.concatenate([lax.slice_in_dim(c0, 1, c0.shape[axis], axis=axis), zero], axis)
  both = jnp.stack([c1, odd], axis=axis + 1)  # [..., n_out, 2, ...] -> [..., 2 n_out, ...]
  shape = list(c1.shape)
  shape[axis] *= 2
  return lax.slice_in_dim(both.reshape(shape), 0, n, axis=axis)


def _max_1d_bwd(x: jax.Array, y: jax.Array, g: jax.Array, axis: int) -> jax.Array:
  """Gradient of ``_max_1d`` routing each output's gradient to its FIRST maximal tap."""
  t0, t1, t2 = _taps(x, axis)
  zero = jnp.zeros_like(g)
  h0 = t0 == y
  h1 = (t1 == y) & ~h0
  h2 = ~(h0 | h1)  # t2 == y: y is the maximum of the three taps.
  c0, c1, c2 = (jnp.where(h, g, zero) for h in (h0, h1, h2))
  return _untap(c0, c1, c2, axis, x.shape[axis])


@jax.custom_vjp
def max_pool_3x3x3_s2(x: jax.Array) -> jax.Array:
  """3x3x3 max-pool, stride 2, padding 1, equal to ``nn.max_pool`` in value and gradient.

  ``nn.max_pool``'s gradient is a select-and-scatter, which XLA:CPU runs slowly (issue 5
  measured about 17 % of the train step at 64x128x128). Here the pool is separable: three 1D
  window-3 stride-2 maxima (over w, then h, then d), each 3 strided slices, and the backward
  pass is three 1D backward passes of elementwise work plus an interleave. The intermediate
  maxima are recomputed in the backward pass rather than stored (the stem is the memory peak).

  Values are identical (max is exact). Ties: like select-and-scatter, the whole gradient of an
  output goes to the first maximal element of its window in (d, h, w) order. The separable
  backward picks the first d whose (h, w) plane holds the maximum, in it the first h whose
  row holds it, in it the first w: the same element. Gradients that reach an input from
  several overlapping windows are summed in a different order than select-and-scatter's, so
  they agree to float rounding (~1 ulp), not bit for bit.

  Args:
    x: [B, D, H, W, C].

  Returns:
    [B, ceil(D / 2), ceil(H / 2), ceil(W / 2), C].
  """
  return _pool_forward(x)[-1]


def _max_pool_fwd(x):
  y = _pool_forward(x)[-1]
  return y, (x, y)


def _max_pool_bwd(res, g):
  x, y = res
  stages = _pool_forward(x)[:-1] + [y]  # Recomputed: x, max_w, max_hw, y.
  for (axis, i) in ((1, 2), (2, 1), (3, 0)):
    g = _max_1d_bwd(stages[i], stages[i + 1], g, axis)
  return (g,)


max_pool_3x3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def stem_max_pool(x: jax.Array, impl: str = "slices") -> jax.Array:
  """The stem's 3x3x3 stride-2 padding-1 max-pool with the selected implementation.

  Args:
    x: [B, D, H, W, C].
    impl: one of ``STEM_POOL_OPTIONS``.

  Returns:
    [B, ceil(D / 2), ceil(H / 2), ceil(W / 2), C].
  """
  if impl == "slices":
    return max_pool_3x3x3_s2(x)
  if impl == "reduce_window":
    return nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)
  raise ValueError(f"Unknown stem pool {impl!r}; expected 'slices' or 'reduce_window'.")


class _ResidualBlock(nn.Module):
  """The fields of a residual block.

  Attributes:
    features: output channels before the block's expansion.
    strides: strides of the block's strided convolution (and of its projection shortcut).
    conv, norm: the convolution and normalisation factories of the network.
  """
  features: int
  strides: Sequence[int]
  conv: ModuleDef
  norm: ModuleDef


class BasicBlock(_ResidualBlock):
  """Two 3x3x3 convolutions with a residual connection (ResNet18/34)."""
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3, 3), self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3, 3), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if x.shape != y.shape:
      # Hara et al.'s shortcut type "B": a strided 1x1x1 projection when the shape changes.
      x = self.conv(self.features, (1, 1, 1), self.strides, name="proj_conv")(x)
      x = self.norm(name="proj_bn")(x)
    return nn.relu(x + y)


class Bottleneck(_ResidualBlock):
  """1x1x1 -> 3x3x3 -> 1x1x1 bottleneck with 4x expansion (ResNet50 and deeper)."""
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (1, 1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3, 3), self.strides, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.features * 4, (1, 1, 1), name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if x.shape != y.shape:
      x = self.conv(self.features * 4, (1, 1, 1), self.strides, name="proj_conv")(x)
      x = self.norm(name="proj_bn")(x)
    return nn.relu(x + y)


class Stem(nn.Module):
  """conv 7x7x7 stride 2 -> BN -> ReLU -> max-pool 3x3x3 stride 2 (padding 1)."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  pool: str = "slices"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.features, (7, 7, 7), (2, 2, 2), name="conv_init")(x)
    x = nn.relu(self.norm(name="bn_init")(x))
    return stem_max_pool(x, self.pool)


class ResNet3D(nn.Module):
  """3D ResNet backbone: returns the last stage's feature map.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet34.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    width: channels of the first stage (doubled at every stage).
    stage_strides: stride of each stage's first block (same on all three axes).
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay ``param_dtype``.
    conv_impl: convolution implementation, one of ``conv.CONV_IMPLS`` (``dsan_jax.models.conv``;
      a config's "auto" is resolved by ``dsan_jax.runtime`` before the model is built).
    remat: "" (none), "stem", "blocks" or "all": recompute these activations in the backward pass.
    stem_pool: the stem max-pool implementation, one of ``STEM_POOL_OPTIONS`` (same values).
    stem_conv_impl: implementation of the stem's 7x7x7 convolution (one input channel), one of
      ``conv.CONV_IMPLS``; its own switch because its best choice can differ (on GPU cuDNN runs
      it on a slow generic kernel: ``dsan_jax.runtime``, docs/benchmarks.md).
    conv_partitioned: oneDNN convolutions as batch-partitioned calls (``conv.conv3d``).
    bn_momentum: running-average decay (0.9 == PyTorch's momentum 0.1).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef = BasicBlock
  width: int = 64
  stage_strides: Sequence[int] = (1, 2, 2, 1)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "xla"
  remat: str = ""
  stem_pool: str = "slices"
  stem_conv_impl: str = "xla"
  conv_partitioned: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x: [B, D, H, W, C_in]. Returns: features [B, ceil(D/16), ceil(H/16), ceil(W/16), C]."""
    if self.remat not in REMAT_OPTIONS:
      raise ValueError(f"remat must be one of {REMAT_OPTIONS}, got {self.remat!r}")
    if self.stem_pool not in STEM_POOL_OPTIONS:
      raise ValueError(f"stem_pool must be one of {STEM_POOL_OPTIONS}, got {self.stem_pool!r}")
    if len(self.stage_sizes) != len(self.stage_strides):
      raise ValueError("stage_sizes and stage_strides must have the same length")
    conv = functools.partial(Conv3D, impl=self.conv_impl, partitioned=self.conv_partitioned,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    stem_cls = nn.remat(Stem) if self.remat in ("stem", "all") else Stem
    block_cls = nn.remat(self.block_cls) if self.remat in ("blocks", "all") else self.block_cls
    stem_conv = functools.partial(
        Conv3D, impl=self.stem_conv_impl, partitioned=self.conv_partitioned,
        dtype=self.dtype, param_dtype=self.param_dtype)
    x = stem_cls(self.width, conv=stem_conv, norm=norm, pool=self.stem_pool,
                 name="stem")(x.astype(self.dtype))
    for i, (size, stride) in enumerate(zip(self.stage_sizes, self.stage_strides)):
      for j in range(size):
        strides = (stride,) * 3 if j == 0 else (1, 1, 1)
        x = block_cls(self.width * 2**i, strides=strides, conv=conv, norm=norm,
                      name=f"stage{i + 1}_block{j + 1}")(x)
    return x


STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
BLOCKS = {10: BasicBlock, 18: BasicBlock, 34: BasicBlock, 50: Bottleneck}

ResNet3D10 = functools.partial(ResNet3D, stage_sizes=STAGE_SIZES[10], block_cls=BasicBlock)
ResNet3D18 = functools.partial(ResNet3D, stage_sizes=STAGE_SIZES[18], block_cls=BasicBlock)
ResNet3D34 = functools.partial(ResNet3D, stage_sizes=STAGE_SIZES[34], block_cls=BasicBlock)
ResNet3D50 = functools.partial(ResNet3D, stage_sizes=STAGE_SIZES[50], block_cls=Bottleneck)
# For tests only: one block per stage, 4 channels.
ResNet3DTiny = functools.partial(ResNet3D, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, width=4)
