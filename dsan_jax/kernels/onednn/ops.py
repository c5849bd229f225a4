"""3D convolutions on oneDNN through XLA's FFI (the CPU fast path, ``conv_impl="onednn"``).

XLA:CPU (jaxlib 0.10) has no fast 3D convolution: its generic code runs DSAN's layers at
1-100 GFLOP/s, and even folded into 2D convolutions (``conv_impl="folded"``) they stay 1.6-2.4x
slower per layer than oneDNN's conv3d, which PyTorch uses (benchmarks/README.md). This module
calls oneDNN itself: ``onednn_conv3d.cc`` defines three XLA FFI handlers (forward, input
gradient, kernel gradient); ``conv3d`` calls them with ``jax.ffi.ffi_call`` inside a
``jax.custom_vjp``, so they run inside the jitted XLA program like any other op, and XLA still
fuses everything around them (BatchNorm, ReLU, the optimizer).

``load()`` builds the handlers (``builder.py``, cached) and registers them, once per process; it
is the explicit start-up step (``dsan_jax.runtime`` calls it when it chooses "onednn"). Tracing a
oneDNN convolution before ``load()`` raises ``OnednnUnavailableError``: nothing compiles while
tracing. If oneDNN or a compiler is missing, ``available()`` is False and
``unavailable_reason()`` says why; the runtime then chooses XLA's ``"folded"`` convolutions (one
notice line), and the ``dsan-onednn-check`` command prints the reason. Limits: float32 only
(this CPU has no bf16 instructions, and XLA:CPU computes bf16 convolutions in fp32 anyway);
reverse-mode autodiff only (``custom_vjp``: no ``jax.jvp``).

Several devices (the library's data parallelism: batch sharded over a ``('data',)`` mesh): XLA
cannot look into a custom call and would gather its operands onto every device, so with more
than one device each call is wrapped in ``custom_partitioning`` as batch-parallel: every device
convolves its own slice of the batch, and the kernel gradient is summed over the batch axes
(one all-reduce, like XLA's own convolutions). Only the batch may be sharded; ``vmap`` is then
not supported (``custom_partitioning`` has no batching rule; on one device it is).
``conv_impl="auto"`` still picks ``"folded"`` with several devices (``dsan_jax.runtime``): ask
for ``"onednn"`` explicitly there.

Numerics: forward and both gradients are checked against a float64 reference for every
geometry of the network, within the same tolerances as XLA's own convolution (tests/test_conv.py),
and the whole network against ``conv_impl="xla"`` (tests/test_onednn.py).

Threads: one oneDNN call runs at a time, on OpenMP threads (``OMP_NUM_THREADS``, default: every
core), while XLA's own thread pool runs the rest of the program.

Memory: each distinct convolution keeps the buffers oneDNN needs (its reordered kernel and a
scratchpad) after its first call, outside XLA's memory analysis (``workspace_bytes()``).
"""

import ctypes
import functools
import threading
from typing import Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from dsan_jax.kernels.onednn.builder import OnednnUnavailableError, build

_TARGETS = {  # FFI target name -> symbol in the compiled library.
    "dsan_onednn_conv3d_fwd": "DsanConv3dForward",
    "dsan_onednn_conv3d_bwd_data": "DsanConv3dBackwardData",
    "dsan_onednn_conv3d_bwd_weights": "DsanConv3dBackwardWeights",
}

_lock = threading.Lock()
_state: dict = {}  # "lib" (ctypes.CDLL) or "error" (str), set once per process.


def load() -> ctypes.CDLL:
  """Builds (if needed, cached), loads and registers the handlers, once per process.

  Returns:
    The loaded library.

  Raises:
    OnednnUnavailableError: oneDNN, a compiler or a CPU backend is missing (the reason is kept:
      later calls raise the same error without trying again).
  """
  with _lock:
    if "lib" in _state:
      return _state["lib"]
    if "error" in _state:
      raise OnednnUnavailableError(_state["error"])
    try:
      if jax.config.jax_platforms and "cpu" not in jax.config.jax_platforms:
        raise OnednnUnavailableError(f"JAX_PLATFORMS={jax.config.jax_platforms} has no CPU")
      lib = ctypes.CDLL(str(build()))
      lib.DsanOnednnWorkspaceBytes.restype = ctypes.c_int64
      for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    except (OnednnUnavailableError, OSError) as e:
      _state["error"] = str(e)
      raise OnednnUnavailableError(str(e)) from e
    _state["lib"] = lib
    return lib


def available() -> bool:
  """Whether the oneDNN handlers can be built and loaded in this process (cached)."""
  try:
    load()
  except OnednnUnavailableError:
    return False
  return True


def unavailable_reason() -> str | None:
  """Why ``available()`` is False (None when it is True)."""
  return None if available() else _state.get("error")


def version() -> str:
  """The version of the oneDNN library the handlers run on, e.g. "3.2.0"."""
  v = load().DsanOnednnVersion()
  return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def workspace_bytes() -> int:
  """Bytes of oneDNN workspace held in this process (reordered kernels and scratchpads).

  Each distinct convolution (shape, stride, direction) keeps one workspace after its first call,
  so that later calls do not allocate. XLA's memory analysis does not include it.
  """
  return int(load().DsanOnednnWorkspaceBytes())


def _attrs(strides, padding) -> dict:
  return dict(strides=np.asarray(strides, np.int64),
              pad_lo=np.asarray([lo for lo, _ in padding], np.int64),
              pad_hi=np.asarray([hi for _, hi in padding], np.int64))


def _target(kind: str) -> str:
  """FFI target of a call kind ("fwd", "bwd_data", "bwd_weights"), a key of ``_TARGETS``."""
  return f"dsan_onednn_conv3d_{kind}"


def _loaded() -> None:
  """Raises unless ``load()`` has run: tracing must not build or probe anything."""
  if "lib" not in _state:
    raise OnednnUnavailableError(
        _state.get("error") or "the oneDNN handlers are not loaded: call "
        "dsan_jax.kernels.onednn.load() at start-up (dsan_jax.runtime.resolve does) before "
        "tracing a conv_impl='onednn' convolution")


def _call(target, out_shape, *args, strides, padding):
  _loaded()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(*args, **_attrs(strides, padding))


# ------------------------------------------------------------- batch-parallel partitioning.
# XLA cannot look into a custom call, so by itself it would gather a batch-sharded operand onto
# every device. Each call below tells the partitioner that it is batch-parallel: every device
# runs the call on its own slice of the batch (the kernel gradient is then summed over the batch
# axes with psum); nothing else may be sharded (spatial and channel dimensions are replicated).

_SHARDING_RULES = {  # Per call kind; only the leading batch factor "b" may be sharded.
    "fwd": "b d h w c, k l m c o -> b e f g o",
    "bwd_data": "b e f g o, k l m c o -> b d h w c",
    "bwd_weights": "b d h w c, b e f g o -> k l m c o",
}


def _replicated_factors(rule: str) -> tuple[str, ...]:
  """Every factor but "b", in order of first appearance (Shardy wants them sorted so)."""
  names = rule.replace(",", " ").replace("->", " ").split()
  return tuple(n for n in dict.fromkeys(names) if n != "b")


def _batch_axes(sharding):
  """Mesh axes the leading dimension is split over (None: not split)."""
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _partitioned(kind: str):
  """``(a, b, out_shape, strides, padding) -> result`` of one call, partitioned over the batch."""
  target = _target(kind)

  @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
  def call(a, b, out_shape, strides, padding):
    return _call(target, out_shape, a, b, strides=strides, padding=padding)

  def partition(out_shape, strides, padding, mesh, arg_shapes, result_shape):
    del result_shape
    batch = _batch_axes(arg_shapes[0].sharding)
    split = NamedSharding(mesh, P(batch, None, None, None, None))
    whole = NamedSharding(mesh, P())
    if kind == "bwd_weights":  # (x, dy) -> dkernel: a sum over the batch.

      def lower(x, dy):
        dw = _call(target, out_shape, x, dy, strides=strides, padding=padding)
        return jax.lax.psum(dw, batch) if batch is not None else dw

      return mesh, lower, whole, (split, split)

    def lower(a, kernel):  # (x or dy, kernel) -> y or dx, for the local batch.
      return _call(target, (a.shape[0], *out_shape[1:]), a, kernel, strides=strides,
                   padding=padding)

    return mesh, lower, split, (split, whole)

  def infer_sharding(out_shape, strides, padding, mesh, arg_shapes, result_shape):
    del out_shape, strides, padding, result_shape
    if kind == "bwd_weights":
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding), None, None, None, None))

  extra = {"reduction_factors": ("b",)} if kind == "bwd_weights" else {}
  call.def_partition(partition, infer_sharding_from_operands=infer_sharding,
                     sharding_rule=_SHARDING_RULES[kind],
                     need_replication_factors=_replicated_factors(_SHARDING_RULES[kind]),
                     **extra)
  return call


_PARTITIONED = {kind: _partitioned(kind) for kind in _SHARDING_RULES}


def _out_shape(x_shape, k_shape, strides, padding):
  spatial = [(n + lo + hi - k) // s + 1
             for n, k, s, (lo, hi) in zip(x_shape[1:4], k_shape[:3], strides, padding)]
  return (x_shape[0], *spatial, k_shape[4])


def _conv_call(kind, a, b, out_shape, strides, padding, partitioned):
  """One call; ``partitioned`` (several devices), as a batch-partitioned op
  (``custom_partitioning``, which has no ``vmap`` rule: the plain call keeps ``vmap`` working on
  one device)."""
  if partitioned:
    return _PARTITIONED[kind](a, b, tuple(out_shape), strides, padding)
  return _call(_target(kind), out_shape, a, b, strides=strides, padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv3d(x, kernel, strides, padding, partitioned):
  return _conv_call("fwd", x, kernel, _out_shape(x.shape, kernel.shape, strides, padding),
                    strides, padding, partitioned)


def _conv3d_fwd(x, kernel, strides, padding, partitioned):
  return _conv3d(x, kernel, strides, padding, partitioned), (x, kernel)


def _conv3d_bwd(strides, padding, partitioned, residuals, dy):
  x, kernel = residuals
  # Each gradient is its own custom call, so XLA drops the input gradient where nothing uses
  # it (the stem's input is data).
  dx = _conv_call("bwd_data", dy, kernel, x.shape, strides, padding, partitioned)
  dw = _conv_call("bwd_weights", x, dy, kernel.shape, strides, padding, partitioned)
  return dx, dw


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
           padding: Sequence[tuple[int, int]], partitioned: bool = False) -> jax.Array:
  """3D convolution, channels last, on oneDNN (CPU, float32).

  Args:
    x: [B, D, H, W, C] float32 input.
    kernel: [kd, kh, kw, C, O] float32 kernel.
    strides: (sd, sh, sw).
    padding: ((lo, hi),) * 3 explicit zero padding on (D, H, W).
    partitioned: each call as a batch-partitioned op (a batch sharded over several devices
      stays sharded); decided at start-up from the device count (``dsan_jax.runtime``), never
      probed while tracing.

  Returns:
    [B, D', H', W', O] float32 output, as ``lax.conv_general_dilated`` would give.

  Raises:
    OnednnUnavailableError: oneDNN cannot be built or loaded here (the reason is in the message).
    ValueError: a non-float32 input.
  """
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(f"conv_impl='onednn' computes in float32 only; got {x.dtype} and "
                     f"{kernel.dtype} (use conv_impl='folded' or 'auto' for other dtypes)")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv3d(x, kernel, strides, padding, bool(partitioned))


def main() -> int:
  """``dsan-onednn-check`` (installed with the package): builds the handlers if needed, reports."""
  if not available():
    print(f"oneDNN convolutions unavailable: {unavailable_reason()}")
    return 1
  print(f"oneDNN {version()} convolutions ready: {build()}")
  return 0
