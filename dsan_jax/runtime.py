"""How this process computes: decided once, at the entry point, logged in one line and recorded.

Two steps, both before the first trace:

1. ``configure_xla_flags()``, before JAX starts its backend (XLA reads ``XLA_FLAGS`` once): adds
   the XLA:CPU flag that makes this library's CPU path faster and more precise, when this jaxlib
   supports it (``recommended_cpu_xla_flags``). ``dsan_jax.cli.setup`` calls it.
2. ``resolve_config(config)``, at the start of training, evaluation and prediction: resolves
   ``config.model.conv_impl`` and ``stem_conv_impl`` ("auto" or a name of
   ``dsan_jax.models.conv.CONV_IMPLS``) for this backend, dtype and device count; builds and
   loads the optional oneDNN kernels (``dsan_jax.kernels.onednn``) when it chooses them; logs one
   line; and returns a config whose ``model`` section names the concrete implementations and
   whose ``runtime`` section records backend, devices, XLA flags and the oneDNN version. That is
   what a run's ``config.json`` (and ``prediction.json``) keep, never "auto".

The layers (``dsan_jax.models.conv.Conv3D``) receive a concrete implementation and never probe,
compile or read the device count while tracing.

The "auto" rule (measurements: benchmarks/README.md, docs/benchmarks.md):
* CPU, float32 compute, one device: ``"onednn"`` when oneDNN is installed (the ``cpu`` extra) and
  its handlers build; otherwise ``"folded"``, with one notice line. With several devices the
  oneDNN calls are batch-partitioned and agree with XLA's convolutions, but "auto" keeps
  ``"folded"`` there until the multi-process comparison (tests/test_multihost.py) holds at its
  tolerance with them.
* CPU with another dtype, and GPU: ``"folded"`` (GPU, H200, cuDNN, bf16, batch 20 at
  138x256x256: train step 129 ms folded against 240 ms native; folding costs memory, 28.3
  against 17.3 GB; ``conv_impl="xla"`` with the stem still folded is the middle ground). "gpu" is
  also what JAX reports for ROCm, where this was not measured.
* Elsewhere (TPU: not measured): ``"xla"``, the native 3D convolution.
The stem's convolution (one input channel) has its own switch with the same rule today: on GPU
its native 7x7x7 convolution ran on a generic cuDNN kernel (73 ms forward and 51 ms kernel
gradient of a 240 ms step; folded 11 + 7 ms), so it stays folded when ``conv_impl="xla"``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dsan_jax.errors import ConfigError
from dsan_jax.kernels import onednn
from dsan_jax.models.conv import CONV_IMPLS

log = logging.getLogger("dsan_jax")

# Removes individual convolutions from XLA:CPU's YNNPACK rewriting, so 2D convolutions use
# Eigen's kernels: on this jaxlib that is both faster for this network and keeps fp32
# gradients of the folded path at float32 accuracy (about 5e-6 relative to float64 instead
# of about 5e-3 with YNNPACK's convolutions). See benchmarks/README.md for the measurements.
YNN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

# Backends on which folding was measured faster than the native 3D convolution (module doc).
_FOLDED_BACKENDS = ("cpu", "gpu", "cuda")

# ---------------------------------------------------------------------------- XLA flags.


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


def _backend_started() -> bool:
  try:  # Private API; if it moves, skip the check rather than fail.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def configure_xla_flags() -> str:
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
  if _backend_started():
    warnings.warn("configure_xla_flags() ran after the first JAX computation; "
                  "XLA_FLAGS is read when the backend starts, so it was not applied.",
                  RuntimeWarning, stacklevel=2)
    return ""
  flags = recommended_cpu_xla_flags()
  if flags:
    os.environ["XLA_FLAGS"] = f"{current} {flags}".strip()
  return flags


# ------------------------------------------------------------------ convolution choices.


def available_conv_impls() -> tuple[str, ...]:
  """``CONV_IMPLS`` that work in this process ("onednn" needs oneDNN and a C++ compiler; asking
  builds and loads its handlers, once)."""
  return tuple(i for i in CONV_IMPLS if i != "onednn" or onednn.available())


@functools.lru_cache(maxsize=None)
def _notice_no_onednn(reason: str) -> None:
  log.warning("dsan_jax: oneDNN convolutions unavailable (%s); conv_impl='auto' uses XLA's "
              "'folded' convolutions, 1.4-1.6x slower than PyTorch's on CPU "
              "(benchmarks/README.md).", reason)


def _auto_impl(backend: str, dtype: Any, device_count: int) -> str:
  if backend == "cpu" and (dtype is None or jnp.dtype(dtype) == jnp.float32):
    if device_count == 1:  # Several devices: "folded" (module doc).
      if onednn.available():
        return "onednn"
      _notice_no_onednn(onednn.unavailable_reason() or "unknown reason")
  return "folded" if backend in _FOLDED_BACKENDS else "xla"


def resolve_conv_impl(impl: str, backend: str | None = None, dtype: Any = None,
                      device_count: int | None = None) -> str:
  """Maps "auto" to the implementation chosen for a backend (module doc) and validates names.

  Choosing "onednn" builds and loads its handlers (once per process).

  Args:
    impl: "auto" or one of ``CONV_IMPLS``.
    backend: platform name ("cpu", "gpu", "tpu"); None -> ``jax.default_backend()``.
    dtype: the compute dtype, when known ("onednn" is float32 only).
    device_count: None -> ``jax.device_count()``.

  Returns:
    One of ``CONV_IMPLS``.

  Raises:
    ValueError: for an unknown name.
  """
  if impl == "auto":
    return _auto_impl(backend or jax.default_backend(), dtype,
                      jax.device_count() if device_count is None else device_count)
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl {impl!r}; expected 'auto' or one of {CONV_IMPLS}.")
  return impl


def resolve_stem_conv_impl(impl: str, backend: str | None = None, dtype: Any = None,
                           device_count: int | None = None) -> str:
  """Maps "auto" to the implementation of the stem's convolution (one input channel).

  The same rule as ``resolve_conv_impl`` today, whatever ``conv_impl`` the rest of the network
  uses; a separate switch because the stem's best choice has differed (module doc).

  Args and Returns: as ``resolve_conv_impl``.
  """
  return resolve_conv_impl(impl, backend, dtype, device_count)


# ------------------------------------------------------------------------- the decision.


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How this process computes one model config.

  Attributes:
    backend: JAX platform ("cpu", "gpu", "tpu").
    device_kind: e.g. "cpu" or "NVIDIA H200".
    device_count: devices over all processes.
    process_count: processes.
    xla_flags: ``XLA_FLAGS`` as this process started its backend with them.
    conv_impl: the network's convolutions, one of ``CONV_IMPLS``.
    stem_conv_impl: the stem's convolution, one of ``CONV_IMPLS``.
    onednn: the oneDNN version the kernels run on ("" when they are not used).
  """
  backend: str
  device_kind: str
  device_count: int
  process_count: int
  xla_flags: str
  conv_impl: str
  stem_conv_impl: str
  onednn: str

  def line(self) -> str:
    """One line for the log."""
    lib = f" (oneDNN {self.onednn})" if self.onednn else ""
    return (f"runtime: {self.backend} ({self.device_kind}), {self.device_count} device(s) in "
            f"{self.process_count} process(es); conv {self.conv_impl}, stem conv "
            f"{self.stem_conv_impl}{lib}; XLA_FLAGS={self.xla_flags or '(none)'}")


def _usable(impl: str, backend: str, dtype: Any) -> bool:
  """Whether a concrete implementation recorded by a run can compute here."""
  if impl != "onednn":
    return impl in CONV_IMPLS
  return backend == "cpu" and jnp.dtype(dtype) == jnp.float32 and onednn.available()


def _choose(impl: str, what: str, backend: str, dtype: Any, recorded: bool) -> str:
  if recorded and impl != "auto" and not _usable(impl, backend, dtype):
    log.warning("dsan_jax: this run was computed with %s=%r, which cannot run here (%s); "
                "using 'auto'.", what, impl, backend)
    impl = "auto"
  chosen = resolve_conv_impl(impl, backend, dtype)
  if chosen == "onednn":
    try:
      onednn.load()  # The explicit build-and-register step (cached on disk and per process).
    except onednn.OnednnUnavailableError as e:
      raise ConfigError(f"model.{what}='onednn': {e}") from None
    if jnp.dtype(dtype) != jnp.float32:
      raise ConfigError(f"model.{what}='onednn' computes in float32 only; model.dtype is "
                        f"{jnp.dtype(dtype).name} (use 'folded' or 'auto')")
  return chosen


@functools.lru_cache(maxsize=None)
def _resolve(conv_impl: str, stem_conv_impl: str, dtype: str, recorded: bool) -> Runtime:
  backend = jax.default_backend()
  conv = _choose(conv_impl, "conv_impl", backend, dtype, recorded)
  stem = _choose(stem_conv_impl, "stem_conv_impl", backend, dtype, recorded)
  rt = Runtime(backend=backend, device_kind=jax.devices()[0].device_kind,
               device_count=jax.device_count(), process_count=jax.process_count(),
               xla_flags=os.environ.get("XLA_FLAGS", ""), conv_impl=conv, stem_conv_impl=stem,
               onednn=onednn.version() if "onednn" in (conv, stem) else "")
  if jax.process_index() == 0:
    log.info("%s", rt.line())
  return rt


def resolve(model_config: ml_collections.ConfigDict, recorded: bool = False) -> Runtime:
  """Decides how ``model_config`` computes in this process (cached; logs one line per choice).

  Args:
    model_config: ``config.model`` (``conv_impl``, ``stem_conv_impl``, ``dtype``).
    recorded: the values come from a trained run's ``config.json``: a recorded implementation
      that cannot run here (e.g. "onednn" on a GPU) is replaced by this process's "auto" choice,
      with a warning, instead of failing.

  Returns:
    The ``Runtime``.

  Raises:
    ConfigError: an explicit "onednn" that cannot run here, or an unknown name.
  """
  try:
    return _resolve(model_config.conv_impl, model_config.get("stem_conv_impl", "auto"),
                    jnp.dtype(model_config.dtype).name, recorded)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


def resolve_config(config: ml_collections.ConfigDict,
                   recorded: bool = False) -> ml_collections.ConfigDict:
  """A copy of ``config`` with concrete ``model.conv_impl``/``stem_conv_impl`` and a ``runtime``
  section (``Runtime``'s fields), as a run records it.

  Args:
    config: the full config (may be locked).
    recorded: see ``resolve``.

  Returns:
    The new config (the input is not changed).
  """
  rt = resolve(config.model, recorded)
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.conv_impl = rt.conv_impl
  out.model.stem_conv_impl = rt.stem_conv_impl
  out.runtime = ml_collections.ConfigDict(dataclasses.asdict(rt))
  return out
