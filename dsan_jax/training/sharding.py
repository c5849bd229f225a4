"""Data parallelism with ``jax.jit`` over a 1-D ``('data',)`` mesh.

The batch is sharded on its leading axis over every device of every process; parameters,
optimiser state and batch statistics are replicated. Means over the batch inside the jitted step
(the loss, BatchNorm's statistics) are therefore global means, computed by XLA's collectives.
"""

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsan_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named ``('data',)`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """Raises ``ConfigError`` when the global batch does not split evenly over the devices."""
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError(
        f"{what}={global_batch} is not divisible by the {n} devices of the mesh; choose a "
        f"multiple of {n} (e.g. {max(n, global_batch // n * n)} or {(global_batch // n + 1) * n}).")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's part of the global batch on the devices.

  Single process: ``batch`` is the whole global batch. Several processes: ``batch`` is this
  process's contiguous part (``global_batch / process_count`` rows), and the global array is
  assembled with ``jax.make_array_from_process_local_data``.

  Args:
    batch: dict of numpy arrays with a leading batch axis.
    mesh: the data mesh.

  Returns:
    dict of global ``jax.Array`` sharded on their leading axis.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree on every device of the mesh (replicated)."""
  return jax.device_put(tree, replicated(mesh))
