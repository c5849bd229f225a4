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
  uses on CPU, through XLA's FFI (``dsan_jax/models/onednn.py``): XLA:CPU has no 3D
  convolution of that speed. CPU and float32 only.

``"auto"`` (the config default) resolves per backend with ``resolve_conv_impl``: on CPU
``"onednn"`` when it is available (``onednn.available()``), the computation is float32 and there
is one device, else ``"folded"``; ``"folded"`` on GPU (measured faster: docs/benchmarks.md);
``"xla"`` elsewhere (TPU: not measured). On GPU folding trades memory for speed:
``conv_impl="xla"`` with the stem still folded (``stem_conv_impl``) is the middle ground.

XLA:CPU also has a flag that changes the speed *and* precision of 2D convolutions;
``recommended_cpu_xla_flags`` returns it when this jaxlib supports it. It must be in
``XLA_FLAGS`` before JAX initialises its backend: see ``apply_recommended_cpu_xla_flags``.
"""

import functools
import logging
import os
import subprocess
import sys
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dsan_jax.models import onednn

CONV_IMPLS = ("xla", "folded", "onednn")

# Removes individual convolutions from XLA:CPU's YNNPACK rewriting, so 2D convolutions use
# Eigen's kernels: on this jaxlib that is both faster for this network and keeps fp32
# gradients of the folded path at float32 accuracy (about 5e-6 relative to float64 instead
# of about 5e-3 with YNNPACK's convolutions). See benchmarks/README.md for the measurements.
YNN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

# Output planes (H' * W') up to this size use a full im2col matmul instead of the 2D convolution:
# XLA:CPU's 2D convolution is pathologically slow on tiny planes with many channels (2x2 planes,
# 1536 -> 512 channels: 89 ms against 1.5 ms for the matmul; equal at 4x4; the convolution wins
# from 8x8 on). Deep layers of small inputs (e.g. 32x64x64 -> 2x4x4 features) hit this. The
# patches are kd * kh * kw times the input, which is small at such sizes.
_IM2COL_MAX_PLANE = 16

_DIMS_3D = ("NDHWC", "DHWIO", "NDHWC")
_DIMS_2D = ("NHWC", "HWIO", "NHWC")


# Backends on which folding was measured faster than the native 3D convolution.
# CPU (XLA:CPU, 2 cores): the 2D library path beats XLA's generic 3D code (benchmarks/README.md).
# GPU (H200, cuDNN, bf16, batch 20 at 138x256x256): train step 129 ms folded against 240 ms
# native in one run, the native stem conv (1 input channel) alone ~125 ms on a generic cuDNN
# kernel (docs/benchmarks.md, GPU). Folding costs memory (28.3 against 17.3 GB compiled there).
# "gpu" is also what JAX reports for ROCm, where this was not measured. TPU: not measured, native.
_FOLDED_BACKENDS = ("cpu", "gpu", "cuda")


def available_conv_impls() -> tuple[str, ...]:
  """``CONV_IMPLS`` that work in this process ("onednn" needs oneDNN and a C++ compiler)."""
  return tuple(i for i in CONV_IMPLS if i != "onednn" or onednn.available())


@functools.lru_cache(maxsize=None)
def _warn_no_onednn(reason: str) -> None:
  logging.getLogger(__name__).warning(
      "dsan_jax: oneDNN convolutions unavailable (%s); conv_impl='auto' uses XLA's 'folded' "
      "convolutions, 1.4-1.6x slower than PyTorch's on CPU (benchmarks/README.md).", reason)


def _default_impl_for_backend(backend: str, dtype: Any = None) -> str:
  if backend == "cpu" and (dtype is None or jnp.dtype(dtype) == jnp.float32):
    # With several devices the oneDNN calls are batch-partitioned (onednn.py) and agree with
    # XLA's convolutions, but "auto" keeps "folded" there until the multi-process comparison
    # (tests/test_multihost.py) holds at its tolerance with them; see benchmarks/README.md.
    if jax.device_count() == 1:
      if onednn.available():
        return "onednn"
      _warn_no_onednn(onednn.unavailable_reason() or "unknown reason")
  return "folded" if backend in _FOLDED_BACKENDS else "xla"


def resolve_conv_impl(impl: str, backend: str | None = None, dtype: Any = None) -> str:
  """Maps "auto" to the implementation chosen for a backend and validates names.

  Args:
    impl: "auto" or one of ``CONV_IMPLS``.
    backend: platform name ("cpu", "gpu", "tpu"); None -> ``jax.default_backend()``.
    dtype: the compute dtype, when known ("onednn" is float32 only).

  Returns:
    One of ``CONV_IMPLS``.

  Raises:
    ValueError: for an unknown name.
  """
  if impl == "auto":
    return _default_impl_for_backend(backend or jax.default_backend(), dtype)
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {impl!r}; expected 'auto' or one of {CONV_IMPLS}.")
  return impl


def resolve_stem_conv_impl(impl: str, backend: str | None = None, dtype: Any = None) -> str:
  """Maps "auto" to the implementation of the stem's convolution (one input channel).

  "auto" is what ``resolve_conv_impl`` picks on CPU ("onednn" where available, else "folded")
  and "folded" on GPU, whatever ``conv_impl`` the rest of the network uses. On GPU
  (H200, cuDNN, bf16) the native 7x7x7 convolution with a single input channel ran on a generic
  ``implicit_convolveNd_sgemm`` kernel: 73 ms forward and 51 ms kernel gradient of a 240 ms
  batch-20 train step at 138x256x256; folded, its depth taps become 7 channels of a 2D
  convolution on a tensor-core kernel (11 + 7 ms; step 146 ms; docs/benchmarks.md, GPU).

  Args:
    impl: "auto" or one of ``CONV_IMPLS``.
    backend: platform name; None -> ``jax.default_backend()``.
    dtype: the compute dtype, when known.

  Returns:
    One of ``CONV_IMPLS``.
  """
  # The same rule as the other layers' today; a separate switch because the stem's best choice
  # has differed from theirs (on GPU before every layer was folded).
  return resolve_conv_impl(impl, backend, dtype)


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


_IMPL_FNS = {"xla": _conv3d_xla, "folded": _conv3d_folded, "onednn": onednn.conv3d}


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
           padding: Sequence[tuple[int, int]], impl: str = "xla") -> jax.Array:
  """3D convolution, channels last.

  Args:
    x: [B, D, H, W, C] input.
    kernel: [kd, kh, kw, C, O] kernel.
    strides: (sd, sh, sw).
    padding: ((lo, hi),) * 3 explicit zero padding on (D, H, W).
    impl: "auto" or one of ``CONV_IMPLS`` (see the module docstring).

  Returns:
    [B, D', H', W', O] output, D' = (D + lo + hi - kd) // sd + 1 (likewise H', W').
  """
  impl = resolve_conv_impl(impl, dtype=x.dtype)
  if x.ndim != 5 or kernel.ndim != 5 or x.shape[-1] != kernel.shape[3]:
    raise ValueError(f"conv3d expects x [B, D, H, W, C] and kernel [kd, kh, kw, C, O]; got "
                     f"{x.shape} and {kernel.shape}.")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
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
    impl: "auto" or one of ``CONV_IMPLS``.
    dtype: compute dtype (None -> the input's).
    param_dtype: parameter dtype.
    kernel_init: kernel initializer.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  strides: Sequence[int] = (1, 1, 1)
  use_bias: bool = False
  impl: str = "xla"
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
    y = conv3d(x, kernel, self.strides, padding, self.impl)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


# ------------------------------------------------------------------------ XLA:CPU flags.


@functools.lru_cache(maxsize=None)
def xla_flag_supported(flag: str) -> bool:
  """Whether this jaxlib accepts ``flag`` in XLA_FLAGS.

  XLA aborts the process on an unknown flag, so the check runs a throw-away Python
  subprocess (about 1 s, cached per process) that initialises the CPU backend with the flag.

  Args:
    flag: one XLA flag, e.g. ``YNN_CONV_FLAG``.

  Returns:
    True when the subprocess ran a computation and exited cleanly.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = flag
  env["JAX_PLATFORMS"] = "cpu"
  code = "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready()"
  try:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          timeout=120, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return proc.returncode == 0


def recommended_cpu_xla_flags() -> str:
  """XLA flags that make this library's CPU path faster and more precise, if supported.

  Returns:
    ``YNN_CONV_FLAG`` when this jaxlib accepts it, else "" (older/newer jaxlibs without
    YNNPACK fusion types). The flag only affects XLA:CPU; it is harmless on GPU/TPU.
  """
  return YNN_CONV_FLAG if xla_flag_supported(YNN_CONV_FLAG) else ""


def apply_recommended_cpu_xla_flags() -> str:
  """Appends ``recommended_cpu_xla_flags()`` to ``os.environ["XLA_FLAGS"]``.

  Call it at the top of an entry point, before the first JAX computation (XLA reads
  XLA_FLAGS once, when the backend starts). It keeps the user's own flags and does nothing
  when the user already set ``--xla_cpu_experimental_ynn_fusion_type``, when the
  environment variable ``DSAN_NO_XLA_FLAGS`` is set, or when the flag is unsupported.

  Returns:
    The flags that were added ("" when none). When the JAX backend is already initialised the
    flag could no longer take effect: it warns (``RuntimeWarning``), changes nothing and returns
    "" rather than stopping a run over a speed setting.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("DSAN_NO_XLA_FLAGS") or "xla_cpu_experimental_ynn_fusion_type" in current:
    return ""
  try:  # Private API; if it moves, skip the check rather than fail.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    warnings.warn("apply_recommended_cpu_xla_flags() ran after the first JAX computation; "
                  "XLA_FLAGS is read when the backend starts, so it was not applied.",
                  RuntimeWarning, stacklevel=2)
    return ""
  flags = recommended_cpu_xla_flags()
  if flags:
    os.environ["XLA_FLAGS"] = f"{current} {flags}".strip()
  return flags
