"""One owner per run folder, and locks that die with their process (``fcntl.flock``).

A run folder ``<workdir>/<variant>/fold_<k>`` is trained by one process at a time: its owner
holds an exclusive ``flock`` on ``<run folder>/.owner.lock`` and writes into that file who it is
(host, pid, since when, command). The kernel drops the lock when the owner's process ends in any
way, ``kill -9`` included, so a dead owner's lock is simply taken over by the next command; the
file's stale content then says whom it took over from. A clean exit empties the file. The file
is never deleted (deleting a lock file lets two processes lock two different files).

``locked(path, shared)`` is a readers-writer lock on a file: the checkpoint writer holds it
exclusively while it saves (and Orbax deletes the previous step), readers hold it shared while
they list and restore, so a reader never sees a checkpoint being written or removed.

Limits: ``flock`` locks are per host on NFS mounted with ``nolock`` (and on some FUSE file
systems); where the file system refuses locks (``ENOLCK``, ``EOPNOTSUPP``) a warning is logged
once and ownership is not enforced. On Linux NFS with working locking (NFSv4, or v3 with lockd)
``flock`` is emulated with POSIX byte-range locks and holds across hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import time
from typing import Callable, Iterator

from dsan_jax.errors import RunInProgressError

log = logging.getLogger("dsan_jax")

RUN_LOCK_NAME = ".owner.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_warned: set[str] = set()


class _Unsupported(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Owner:
  """Who holds a lock: host name, process id, since when (UTC), command line."""
  host: str
  pid: int
  since: str
  command: str = ""

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host} since {self.since}"

  @property
  def is_this_process(self) -> bool:
    return self.host == socket.gethostname() and self.pid == os.getpid()


def _me() -> Owner:
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  return Owner(socket.gethostname(), os.getpid(), now, " ".join(sys.argv)[:500])


def _parse(text: str) -> Owner | None:
  if not text.strip():
    return None
  try:
    d = json.loads(text)
    return Owner(str(d["host"]), int(d["pid"]), str(d["since"]), str(d.get("command", "")))
  except (ValueError, KeyError, TypeError):
    return Owner("unknown", 0, "unknown")


def _flock(fd: int, op: int) -> bool:
  """``fcntl.flock``; False when a non-blocking request would block."""
  try:
    fcntl.flock(fd, op)
    return True
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in _UNSUPPORTED:
      raise _Unsupported from e
    raise


def _warn_unsupported(path: pathlib.Path) -> None:
  if str(path) not in _warned:
    _warned.add(str(path))
    log.warning("%s: the file system does not support file locks (fcntl.flock); concurrent "
                "commands on this folder are not detected", path)


class OwnerLock:
  """An exclusive ``flock`` on ``path`` whose file records its holder (see module doc).

  Attributes:
    previous: the owner recorded in the file when this process took it, i.e. one that ended
      without releasing it (killed); None when the file was empty.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.previous: Owner | None = None
    self._fd: int | None = None

  def acquire(self, wait: bool = False, retry_s: float = 1.0,
              on_wait: Callable[[Owner | None], None] | None = None) -> bool:
    """Takes the lock. Returns False when another process holds it (and ``wait`` is False).

    Args:
      wait: block until the holder releases it (``on_wait(holder)`` is called first).
      retry_s: without ``wait``, keep trying this long (a reader's probe holds it an instant).
    """
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      deadline = time.monotonic() + retry_s
      while not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
        if wait:
          if on_wait is not None:
            on_wait(self.holder())
          _flock(fd, fcntl.LOCK_EX)
          break
        if time.monotonic() >= deadline:
          os.close(fd)
          return False
        time.sleep(0.05)
    except _Unsupported:
      _warn_unsupported(self.path)
    except BaseException:
      os.close(fd)
      raise
    self.previous = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    me = json.dumps(dataclasses.asdict(_me())).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    os.fsync(fd)
    self._fd = fd
    return True

  def release(self) -> None:
    """Empties the file (a clean exit) and drops the lock."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    finally:
      os.close(fd)  # Closing the last descriptor drops the flock.

  def holder(self) -> Owner | None:
    """The live holder of the lock, or None (free, or its holder is gone)."""
    return holder(self.path)


def holder(path: str | os.PathLike) -> Owner | None:
  """The live holder of the ``OwnerLock`` file ``path``, or None, without taking the lock.

  A non-empty file whose lock is free belongs to a killed holder: None. (Telling needs a
  shared lock for an instant; ``OwnerLock.acquire`` retries for a second to allow for it.)
  """
  path = pathlib.Path(path)
  try:
    owner = _parse(path.read_text(errors="replace"))
  except (FileNotFoundError, NotADirectoryError):
    return None
  if owner is None or owner.is_this_process:
    return owner
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    free = _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except _Unsupported:
    free = False  # Cannot tell: report the recorded owner.
  finally:
    os.close(fd)
  return None if free else owner


@contextlib.contextmanager
def locked(path: str | os.PathLike, shared: bool = False) -> Iterator[None]:
  """Holds a shared (readers) or exclusive (writer) ``flock`` on ``path`` for the block.

  Blocks until the lock is granted. Where the file cannot be created (a read-only copy of a
  run, which nobody writes) or locks are unsupported, the block runs without a lock.
  """
  path = pathlib.Path(path)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError:
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      fd = None
  try:
    if fd is not None:
      try:
        _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
      except _Unsupported:
        _warn_unsupported(path)
    yield
  finally:
    if fd is not None:
      os.close(fd)


# ------------------------------------------------------------------------------ run folders.


def run_owner(run_dir: str | os.PathLike) -> Owner | None:
  """The process training ``run_dir`` now, or None."""
  return holder(pathlib.Path(run_dir) / RUN_LOCK_NAME)


def in_progress_message(run_dir: str | os.PathLike, owner: Owner | None) -> str:
  who = owner.describe() if owner else "another process (it did not say which)"
  return (f"{run_dir}: run in progress, owned by {who}; wait for it to finish, or stop it and "
          "rerun this command to resume")


def _any_process(flag: bool) -> bool:
  """``flag`` of process 0, on every process of a multi-process JAX run."""
  import jax  # Deferred: this module is also used by jax-free tools.
  if jax.process_count() == 1:
    return flag
  import numpy as np  # Deferred with jax: only a multi-process run gets here.
  from jax.experimental import multihost_utils  # Deferred with jax.
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


@contextlib.contextmanager
def own_run(run_dir: str | os.PathLike) -> Iterator[None]:
  """Makes this process (process 0 of a multi-process run) the owner of ``run_dir``.

  Raises:
    RunInProgressError: another live process owns the run (on every process of the run).
  """
  import jax  # Deferred (see _any_process).
  run_dir = pathlib.Path(run_dir)
  lock, busy = None, None
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = OwnerLock(run_dir / RUN_LOCK_NAME)
    if not lock.acquire():
      lock, busy = None, RunInProgressError(in_progress_message(run_dir, run_owner(run_dir)))
    elif lock.previous is not None:
      log.info("%s: taking over from a previous owner that is gone (%s)", run_dir,
               lock.previous.describe())
  if _any_process(busy is not None):
    raise busy or RunInProgressError(f"{run_dir}: run in progress (see process 0's message)")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def wait_for_run(run_dir: str | os.PathLike, on_wait: Callable[[Owner | None], None]) -> None:
  """Blocks until nobody owns ``run_dir`` (``on_wait(owner)`` is called before waiting)."""
  lock = OwnerLock(pathlib.Path(run_dir) / RUN_LOCK_NAME)
  lock.acquire(wait=True, on_wait=on_wait)
  lock.release()
