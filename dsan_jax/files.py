"""Files written whole or not at all, safely by several processes at once.

Every writer puts its bytes under a temporary name of its own in the target's folder,
``.<name>.tmp-<pid>-<host>-<random>[suffix]``, and renames it onto the final name
(``os.replace``, atomic on POSIX file systems). Two processes writing the same file never share a
temporary file, a reader never sees a half-written final file, and a failed or killed write
leaves only a temporary file, which ``remove_stale_temps`` recognises as its writer's (same host,
process gone; or another host's and older than a day).

``no_space_error`` turns "disk full" (``ENOSPC``/``EDQUOT``, also as Orbax/TensorStore reports
it) into the project's one-line ``ResourceError``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import pathlib
import re
import shutil
import socket
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dsan_jax.errors import ResourceError

HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
OTHER_HOST_STALE_S = 24 * 3600  # A temporary file of another host is stale after this age.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'",
                  "os_error_code='122'")


def temp_path(path: str | os.PathLike, suffix: str = "") -> pathlib.Path:
  """A temporary name next to ``path``, unique to this process and call (see module doc)."""
  path = pathlib.Path(path)
  return path.parent / (f".{path.name}.tmp-{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}"
                        f"{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[pathlib.Path]:
  """Yields a temporary path; renamed onto ``path`` when the block succeeds, removed otherwise.

  Args:
    path: the final file.
    suffix: appended to the temporary name (e.g. ".nii.gz" for writers that need it).
  """
  tmp = temp_path(path, suffix)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
  """Writes ``text`` to ``path`` atomically (``fsync``: also flushed to the disk first)."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)
      if fsync:
        f.flush()
        os.fsync(f.fileno())


def final_name(path: str | os.PathLike) -> str:
  """The file name a temporary name stands for (``.x.tmp-<pid>-<host>-<random>`` -> ``x``)."""
  name = pathlib.Path(path).name
  m = re.match(r"\.(.+)\.tmp-\d+-[A-Za-z0-9_]+-[0-9a-f]{8}", name)
  return m.group(1) if m else name


def _writer(p: pathlib.Path) -> tuple[int, str] | None:
  """(pid, host) of a temporary file named by ``temp_path``; None for other names.

  Names without a host (``.x.tmp-<pid>-<random>``, written before hosts were recorded) are
  taken as this host's.
  """
  m = re.match(r"\..+\.tmp-(\d+)-(?:([A-Za-z0-9_]+)-)?[0-9a-f]{8}", p.name)
  return (int(m.group(1)), m.group(2) or HOST) if m else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def is_stale_temp(p: pathlib.Path, now: float | None = None) -> bool:
  """True for a temporary file whose writer is gone (see module doc)."""
  writer = _writer(p)
  if writer is None:
    return False
  pid, host = writer
  if host == HOST:
    return not _alive(pid)
  try:
    return (now or time.time()) - p.stat().st_mtime > OTHER_HOST_STALE_S
  except FileNotFoundError:
    return False


def remove_stale_temps(folder: str | os.PathLike, pattern: str = ".*.tmp-*") -> int:
  """Removes the stale temporary files (not folders) matching ``pattern`` in ``folder``.

  Returns:
    Number of files removed.
  """
  removed = 0
  for p in pathlib.Path(folder).glob(pattern):
    if p.is_file() and is_stale_temp(p):
      with contextlib.suppress(FileNotFoundError):
        p.unlink()
        removed += 1
  return removed


def is_no_space(e: BaseException) -> bool:
  """True when ``e`` (or what caused it) says the disk or the quota is full."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    if any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def no_space_error(path: str | os.PathLike, doing: str, after: str = "") -> ResourceError:
  """The one-line error for a full disk: ``<path>: no space left on device (<doing>)<after>``."""
  return ResourceError(f"{path}: no space left on device{f' ({doing})' if doing else ''}{after}")


def jsonable(x: Any) -> Any:
  """Nested dicts/lists/arrays/NumPy scalars/paths -> strict-JSON values (NaN and inf -> None)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return [jsonable(v) for v in x.tolist()]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if isinstance(x, float) and not math.isfinite(x):
    return None  # Strict JSON has no NaN / inf.
  return x


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
  """Puts the completed folder ``tmp`` in the place of ``final`` (renames; a previous ``final`` is
  moved aside first and removed after, so ``final`` is always a complete folder or absent)."""
  tmp, final = pathlib.Path(tmp), pathlib.Path(final)
  old = final.with_name(final.name + f".old-{os.getpid()}")
  if final.exists():
    os.replace(final, old)
  os.replace(tmp, final)
  if old.exists():
    shutil.rmtree(old, ignore_errors=True)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              empty_field: str | None = None) -> None:
  """Writes dict rows as a CSV: the columns in order of first appearance, NaN as an empty cell.

  Args:
    path: the CSV file (written in place: callers write into a folder renamed when complete).
    rows: the rows; a key missing from a row gives an empty cell.
    empty_field: header of a table without rows (None -> an empty header line).
  """
  fields = list(dict.fromkeys(k for r in rows for k in r))
  if not fields and empty_field is not None:
    fields = [empty_field]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
