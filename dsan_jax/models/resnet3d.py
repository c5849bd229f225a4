"""3D ResNets (Hara et al., CVPR 2018) in ``flax.linen``, channels last ``[B, D, H, W, C]``.

DSAN (Section III-A) uses ResNet34 with the last stage's stride set to 1, so the features before
global average pooling are 1/16 of the input on every axis (ceil for odd sizes):
stem conv 7x7x7 stride 2 (1/2), max-pool 3x3x3 stride 2 (1/4), stages with strides (1, 2, 2, 1)
(1/4, 1/8, 1/16, 1/16).

Parameter names are explicit so that converters (e.g. ``benchmarks/torch_dsan.py``) can rely on them:
``stem/{conv_init,bn_init}``, ``stage{i}_block{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,proj_conv,proj_bn]}``.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsan_jax.models.conv import Conv3D

ModuleDef = Any

REMAT_OPTIONS = ("", "stem", "blocks", "all")


class BasicBlock(nn.Module):
  """Two 3x3x3 convolutions with a residual connection (ResNet18/34)."""
  features: int
  strides: Sequence[int]
  conv: ModuleDef
  norm: ModuleDef
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


class Bottleneck(nn.Module):
  """1x1x1 -> 3x3x3 -> 1x1x1 bottleneck with 4x expansion (ResNet50 and deeper)."""
  features: int
  strides: Sequence[int]
  conv: ModuleDef
  norm: ModuleDef
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.features, (7, 7, 7), (2, 2, 2), name="conv_init")(x)
    x = nn.relu(self.norm(name="bn_init")(x))
    return nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=((1, 1),) * 3)


class ResNet3D(nn.Module):
  """3D ResNet backbone: returns the last stage's feature map.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet34.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    width: channels of the first stage (doubled at every stage).
    stage_strides: stride of each stage's first block (same on all three axes).
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters stay ``param_dtype``.
    conv_impl: convolution implementation (see ``dsan_jax.models.conv``).
    remat: "" (none), "stem", "blocks" or "all": recompute these activations in the backward pass.
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
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x: [B, D, H, W, C_in]. Returns: features [B, ceil(D/16), ceil(H/16), ceil(W/16), C]."""
    if self.remat not in REMAT_OPTIONS:
      raise ValueError(f"remat must be one of {REMAT_OPTIONS}, got {self.remat!r}")
    if len(self.stage_sizes) != len(self.stage_strides):
      raise ValueError("stage_sizes and stage_strides must have the same length")
    conv = functools.partial(Conv3D, impl=self.conv_impl, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    stem_cls = nn.remat(Stem) if self.remat in ("stem", "all") else Stem
    block_cls = nn.remat(self.block_cls) if self.remat in ("blocks", "all") else self.block_cls
    x = stem_cls(self.width, conv=conv, norm=norm, name="stem")(x.astype(self.dtype))
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
