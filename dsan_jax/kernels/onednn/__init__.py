"""oneDNN 3D convolutions for XLA:CPU, an optional kernel package (the ``cpu`` extra).

``builder`` finds oneDNN and compiles the FFI handlers (explicit, cached, logged); ``ops`` loads and
registers them (``load()``) and defines ``conv3d`` with its gradients and its batch partitioning.
"""

from dsan_jax.kernels.onednn import builder
from dsan_jax.kernels.onednn import ops
from dsan_jax.kernels.onednn.builder import OnednnUnavailableError, build, cache_dir, find_onednn
from dsan_jax.kernels.onednn.ops import (available, conv3d, load, main, unavailable_reason,
                                         version, workspace_bytes)

__all__ = ["OnednnUnavailableError", "available", "build", "builder", "cache_dir", "conv3d",
           "find_onednn", "load", "main", "ops", "unavailable_reason", "version",
           "workspace_bytes"]
