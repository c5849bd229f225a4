"""3D convolution with a selectable implementation.

Every implementation computes the same function from the same parameter (``kernel:
[kd, kh, kw, C, O]``), so checkpoints are interchangeable between them:

* ``"xla"``: ``lax.conv_general_dilated`` on the 3D kernel. On GPU/TPU this is cuDNN's (or
  the TPU's) native 3D convolution, the fastest there is. On XLA:CPU (jaxlib 0.10) 3D
  convolutions run through slow generic code: 50-100 GFLOP/s forward and about 9 GFLOP/s for
  the backward of strided convolutions on 2 cores (issue 5, benchmarks/README.md).
* ``"folded"``: the depth taps are folded into channels and the result is one 2D
  convolution, which XLA:CPU sends to its fast library path. For a kernel
  ``[kd, kh, kw, C, O]`` and depth stride ``sd`` the ``kd`` depth-shifted slices
  ``x[:, i::sd][:D']`` are stacked on the channel axis, giving ``[B * D', H, W, kd * C]``,
  which is convolved with the kernel reshaped to ``[kh, kw, kd * C, O]``. The folded input
  is ``kd / sd`` times the size of ``x`` (and is kept for the backward pass). 1x1x1
  convolutions (the projection shortcuts) are a strided slice and a matmul
  (``dot_general``), which needs no copy at all. Layers whose output planes are tiny
  (H' * W' <= 16, deep layers of small inputs) fold all taps instead (im2col + one matmul),
  because the library's 2D convolution is very slow there.

* ``"onednn"``: the convolution and both its gradients run on oneDNN, the library PyTorch
  uses on CPU, through XLA's FFI (the optional ``dsan_jax.kernels.onednn``, loaded by
  ``dsan_jax.runtime``): XLA:CPU has no 3D convolution of that speed. CPU and float32 only.

The layers take a concrete name: "auto" (the config default) is resolved once per process by
``dsan_jax.runtime`` (per backend, dtype and device count), before anything is traced.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dsan_jax.kernels import onednn

CONV_IMPLS = ("xla", "folded", "onednn")

# Output planes (H' * W') up to this size use a full im2col matmul instead of the 2D convolution:
# XLA:CPU's 2D convolution is pathologically slow on tiny planes with many channels (2x2 planes,
# 1536 -> 512 channels: 89 ms against 1.5 ms for the matmul; equal at 4x4; the convolution wins
# from 8x8 on). Deep layers of small inputs (e.g. 32x64x64 -> 2x4x4 features) hit this. The
# patches are kd * kh * kw times the input, which is small at such sizes.
_IM2COL_MAX_PLANE = 16

_DIMS_3D = ("NDHWC", "DHWIO", "NDHWC")
_DIMS_2D = ("NHWC", "HWIO", "NHWC")


def _out_size(size: int, k: int, s: int, lo: int, hi: int) -> int:
  return (size + lo + hi - k) // s + 1


def _conv3d_xla(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=tuple(padding),
      dimension_numbers=_DIMS_3D)


def _conv3d_pointwise(x, kernel, strides, padding):
  """1x1x1 convolution as a strided slice plus a matmul over channels."""
  if any(lo or hi for lo, hi in padding):
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  sd, sh, sw = strides
  if (sd, sh, sw) != (1, 1, 1):
    x = x[:, ::sd, ::sh, ::sw]
  w = kernel.reshape(kernel.shape[-2:])
  # [B, D', H', W', C] x [C, O] -> [B, D', H', W', O]
  return lax.dot_general(x, w, (((4,), (0,)), ((), ())))


def _stack_taps(x, axis, k, s, n_out):
  """[..., N, ..., C'] -> [..., n_out, ..., k * C']: the k shifted slices of ``axis`` on channels."""
  span = s * (n_out - 1) + 1
  taps = [lax.slice_in_dim(x, i, i + span, stride=s, axis=axis) for i in range(k)]
  return jnp.concatenate(taps, axis=-1)  # Channel index = tap * C' + c'.


def _conv3d_im2col(x, kernel, strides, padding):
  """3D convolution as one matmul over all kd * kh * kw taps stacked on channels."""
  kd, kh, kw, c, o = kernel.shape
  out = [_out_size(n, k, s, lo, hi)
         for n, k, s, (lo, hi) in zip(x.shape[1:4], (kd, kh, kw), strides, padding)]
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  # One axis at a time: kd + kh + kw slices instead of kd * kh * kw (compile time). Stacking W
  # first, then H, then D orders the channels (d tap, h tap, w tap, C), the kernel's own
  # order, so the kernel reshape below is free (no transposed copy: 28 MB per 512 -> 512
  # layer, in the forward and again for its gradient).
  for axis, k, s, n in reversed(tuple(zip((1, 2, 3), (kd, kh, kw), strides, out))):
    x = _stack_taps(x, axis, k, s, n)
  w = kernel.reshape(-1, o)  # [kd * kh * kw * C, O]
  return lax.dot_general(x, w, (((4,), (0,)), ((), ())))  # [B, D', H', W', O]


def _conv3d_folded(x, kernel, strides, padding):
  """3D convolution as a 2D convolution over depth taps stacked on channels."""
  kd, kh, kw, c, o = kernel.shape
  if (kd, kh, kw) == (1, 1, 1):
    return _conv3d_pointwise(x, kernel, strides, padding)
  b, d, h, w, _ = x.shape
  sd, sh, sw = strides
  (pd_lo, pd_hi), pad_h, pad_w = padding
  d_out = _out_size(d, kd, sd, pd_lo, pd_hi)
  h_out = _out_size(h, kh, sh, *pad_h)
  w_out = _out_size(w, kw, sw, *pad_w)
  if h_out * w_out <= _IM2COL_MAX_PLANE:
    return _conv3d_im2col(x, kernel, strides, padding)
  if pd_lo or pd_hi:
    x = jnp.pad(x, ((0, 0), (pd_lo, pd_hi), (0, 0), (0, 0), (0, 0)))
  # Tap i of output depth j reads padded depth j * sd + i.
  span = sd * (d_out - 1) + 1
  taps = [lax.slice_in_dim(x, i, i + span, stride=sd, axis=1) for i in range(kd)]
  # [B, D', H, W, kd, C] -> [B * D', H, W, kd * C]; channel index = i * C + c.
  folded = jnp.stack(taps, axis=4).reshape(b * d_out, h, w, kd * c)
  # [kd, kh, kw, C, O] -> [kh, kw, kd, C, O] -> [kh, kw, kd * C, O], matching the order above.
  kernel2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, o)
  y = lax.conv_general_dilated(
      folded, kernel2d, window_strides=(sh, sw), padding=(tuple(pad_h), tuple(pad_w)),
      dimension_numbers=_DIMS_2D)
  return y.reshape(b, d_out, *y.shape[1:])


_IMPL_FNS = {"xla": _conv3d_xla, "folded": _conv3d_folded}


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
           padding: Sequence[tuple[int, int]], impl: str = "xla",
           partitioned: bool = False) -> jax.Array:
  """3D convolution, channels last.

  Args:
    x: [B, D, H, W, C] input.
    kernel: [kd, kh, kw, C, O] kernel.
    strides: (sd, sh, sw).
    padding: ((lo, hi),) * 3 explicit zero padding on (D, H, W).
    impl: one of ``CONV_IMPLS`` (see the module docstring; "auto" is resolved by
      ``dsan_jax.runtime`` before tracing).
    partitioned: "onednn" only: batch-partitioned calls (several devices; the runtime's device
      count decides, see ``models.dsan.model_from_config``).

  Returns:
    [B, D', H', W', O] output, D' = (D + lo + hi - kd) // sd + 1 (likewise H', W').

  Raises:
    ValueError: an unknown or unresolved ("auto") ``impl``, or mismatched shapes.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {impl!r}; expected one of {CONV_IMPLS} (\"auto\" is "
                     "resolved at the entry point: dsan_jax.runtime.resolve_config)")
  if x.ndim != 5 or kernel.ndim != 5 or x.shape[-1] != kernel.shape[3]:
    raise ValueError(f"conv3d expects x [B, D, H, W, C] and kernel [kd, kh, kw, C, O]; got "
                     f"{x.shape} and {kernel.shape}.")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if impl == "onednn":
    return onednn.conv3d(x, kernel, strides, padding, partitioned)
  return _IMPL_FNS[impl](x, kernel, strides, padding)


class Conv3D(nn.Module):
  """Bias-free-by-default 3D convolution with 'SAME'-style symmetric padding k // 2.

  Parameters are named and shaped as ``flax.linen.Conv``'s (``kernel: [kd, kh, kw, C, O]``),
  identically for every ``impl``.

  Attributes:
    features: output channels O.
    kernel_size: (kd, kh, kw).
    strides: (sd, sh, sw).
    use_bias: add a bias of shape [O].
    impl: one of ``CONV_IMPLS``.
    partitioned: see ``conv3d``.
    dtype: compute dtype (None -> the input's).
    param_dtype: parameter dtype.
    kernel_init: kernel initializer.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  strides: Sequence[int] = (1, 1, 1)
  use_bias: bool = False
  impl: str = "xla"
  partitioned: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.kaiming_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      x: [B, D, H, W, C] input.

    Returns:
      [B, D', H', W', features] output.
    """
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, in_features, self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    padding = [(k // 2, k // 2) for k in self.kernel_size]
    y = conv3d(x, kernel, self.strides, padding, self.impl, self.partitioned)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y
