"""Orbax checkpoints of a run: the latest (to resume) and the best (by a validation metric).

A checkpoint holds, in one step folder, the train state (parameters, optimiser state, batch
statistics, step, RNG, skip counters), the data iterator's state and a small JSON ``meta``
(epoch, best metric, history). Orbax writes into a temporary folder and renames it when the save
is complete, so a save interrupted by ``kill -9`` is never listed as a checkpoint; a leftover
temporary folder is ignored and cleaned up by the next save of that step.

A run killed between its ``best`` and ``latest`` saves of an epoch end resumes from the previous
``latest`` and saves ``best`` at the same step again: the existing step folder is then replaced
(Orbax refuses to save an existing step). It is first renamed to a hidden name that Orbax does
not list, so a kill during the removal never leaves a half-deleted folder under a step's name.

Concurrent readers (``evaluate.py``, ``predict`` on a run in progress): the writer holds an
exclusive lock on ``checkpoints/.rw.lock`` while it saves (Orbax also deletes the previous step
then), a reader (``read_only=True``) holds it shared while it lists and restores, so a reader
only ever restores a complete step that is not being removed, and never writes or cleans up.

A full disk during a save (``ENOSPC``, as an ``OSError`` or as TensorStore's
``RESOURCE_EXHAUSTED ... No space left on device``) becomes one ``ResourceError`` line naming the
step folder; the half-written temporary folder is removed and the previous step stays intact.

Layout: ``<run_dir>/checkpoints/latest/<step>/`` and ``<run_dir>/checkpoints/best/<step>/``.
Only the primary process writes (Orbax coordinates this for multi-process runs); restoring
targets an abstract state with the current mesh's shardings, so a checkpoint written on one
device count restores on another.
"""

import contextlib
import logging
import os
import pathlib
import shutil
import sys
import time
import uuid
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from dsan_jax import files, run_lock
from dsan_jax.training import sharding as sharding_lib

LOCK_NAME = ".rw.lock"


def _manager(directory: pathlib.Path, max_to_keep: int,
             read_only: bool = False) -> ocp.CheckpointManager:
  # A reader's manager only lists and restores (Orbax's own read_only mode logs warnings).
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options,
                               item_names=("state", "data", "meta"))


class _DropNoSpaceLogs(logging.Filter):
  """Orbax (absl) and asyncio log a full disk with tracebacks from Orbax's writer threads; the
  save re-raises it as one line, so those records are dropped. Once the save has failed
  (``stopping``), every error record with a traceback is dropped: the writes Orbax left pending
  keep failing (closed event loop, interpreter shutdown) while the command stops."""

  stopping = False

  def filter(self, record: logging.LogRecord) -> bool:
    if self.stopping and (record.exc_info or record.levelno >= logging.ERROR):
      return False
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return not files.is_no_space(Exception(text))


@contextlib.contextmanager
def _quiet_no_space_reports():
  """Drops the duplicate reports of a full disk during a save (see ``_DropNoSpaceLogs``), and
  the RuntimeErrors that TensorStore's pending writes raise, unraisable, once Orbax gave up.
  After a full disk they stay dropped: late ones arrive while the command stops."""
  loggers, flt = [logging.getLogger(n) for n in ("absl", "asyncio")], _DropNoSpaceLogs()
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and (flt.stopping or "Event loop is closed" in str(e))):
      previous(unraisable)

  for logger in loggers:
    logger.addFilter(flt)
  sys.unraisablehook = hook
  try:
    yield
  except Exception as e:
    flt.stopping = files.is_no_space(e)
    raise
  finally:
    if not flt.stopping:
      sys.unraisablehook = previous
      for logger in loggers:
        logger.removeFilter(flt)


def _remove_failed_save(directory: pathlib.Path, step: int, timeout_s: float = 5.0) -> None:
  """Removes the temporary folder of a failed save of ``step``. Writes that Orbax left pending
  may still add files for a moment, so it is removed until it stays gone for 0.2 s."""
  deadline, gone_since = time.monotonic() + timeout_s, None
  while time.monotonic() < deadline:
    found = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    for p in found:
      shutil.rmtree(p, ignore_errors=True)
    if found:
      gone_since = None
    elif gone_since is None:
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= 0.2:
      return
    time.sleep(0.02)


class RunCheckpoints:
  """The ``latest`` and ``best`` checkpoint managers of one run.

  Args:
    run_dir: the run folder.
    read_only: for readers of a run that may be in progress: nothing is created or cleaned up,
      and restores hold the shared lock (see the module doc).
  """

  def __init__(self, run_dir: str | pathlib.Path, read_only: bool = False):
    root = pathlib.Path(run_dir) / "checkpoints"
    self._lock = root / LOCK_NAME
    self.latest = _manager(root / "latest", max_to_keep=1, read_only=read_only)
    self.best = _manager(root / "best", max_to_keep=1, read_only=read_only)
    if read_only:
      return
    for mngr in (self.latest, self.best):  # Removals that a kill interrupted (see _save).
      for p in pathlib.Path(mngr.directory).glob(".replaced-*"):
        shutil.rmtree(p, ignore_errors=True)

  def _save(self, mngr, step: int, state, data_state: dict, meta: dict) -> None:
    # Only the primary process locks: the others wait for it inside Orbax's own barriers.
    lock = (run_lock.locked(self._lock) if jax.process_index() == 0
            else contextlib.nullcontext())
    try:
      with lock, _quiet_no_space_reports():
        self._save_locked(mngr, step, state, data_state, meta)
    except Exception as e:
      if not files.is_no_space(e):
        raise
      directory = pathlib.Path(mngr.directory)
      if jax.process_index() == 0:
        _remove_failed_save(directory, step)
      self.latest.reload()
      kept = self.latest.latest_step()
      raise files.no_space_error(
          directory / str(step), "while saving a checkpoint",
          "; " + (f"the last complete checkpoint, latest/{kept}, is intact" if kept is not None
                  else "no complete checkpoint yet") +
          ": free some space and rerun the same command to resume") from None

  @staticmethod
  def _save_locked(mngr, step: int, state, data_state: dict, meta: dict) -> None:
    if step in mngr.all_steps():  # Saved by a run killed before its next `latest` save.
      directory = pathlib.Path(mngr.directory)
      old = directory / f".replaced-{step}-{uuid.uuid4().hex[:8]}"
      if jax.process_index() == 0:  # The primary process owns the files (as Orbax does).
        os.replace(directory / str(step), old)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dsan_jax:replace_step_{step}")
      mngr.reload()
      shutil.rmtree(old, ignore_errors=True)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()

  def save_latest(self, step: int, state, data_state: dict, meta: dict) -> None:
    self._save(self.latest, step, state, data_state, meta)

  def save_best(self, step: int, state, data_state: dict, meta: dict) -> None:
    self._save(self.best, step, state, data_state, meta)

  def latest_step(self) -> int | None:
    with run_lock.locked(self._lock, shared=True):
      self.latest.reload()
      return self.latest.latest_step()

  def best_step(self) -> int | None:
    with run_lock.locked(self._lock, shared=True):
      self.best.reload()
      return self.best.latest_step()

  def restore(self, which: str, abstract_state, mesh) -> tuple[Any, dict, dict]:
    """Restores ``(state, data_state, meta)`` from the ``latest`` or ``best`` checkpoint.

    Args:
      which: "latest" or "best".
      abstract_state: the state's structure (``training.abstract_train_state``).
      mesh: arrays are restored replicated over this mesh.
    """
    mngr = self.latest if which == "latest" else self.best
    target = with_sharding(abstract_state, sharding_lib.replicated(mesh))
    with run_lock.locked(self._lock, shared=True):  # No save or removal meanwhile.
      mngr.reload()
      step = mngr.latest_step()
      if step is None:
        raise FileNotFoundError(f"no {which} checkpoint in {mngr.directory}")
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.meta

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def with_sharding(abstract_tree, sharding) -> Any:
  """``ShapeDtypeStruct``s carrying ``sharding`` (the restore target)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree)
