"""Finding oneDNN and compiling the FFI handlers (``onednn_conv3d.cc``): an explicit, cached step.

Where oneDNN comes from: the ``onednn-devel-cpu-gomp`` wheel (headers and ``libdnnl.so``, GNU
OpenMP runtime), installed with this package's ``cpu`` extra (``pip install -e ".[cpu]"``), or a
oneDNN 3.x install named by the environment variable ``DSAN_ONEDNN_ROOT`` (with ``include/`` and
``lib/``). ``build()`` compiles the handlers with the system C++ compiler (``$CXX`` or ``g++``,
2-3 s here) against jaxlib's FFI headers, into ``$DSAN_JAX_CACHE`` (default
``~/.cache/dsan_jax``), keyed by the source, jaxlib and oneDNN; later processes find the cached
library. Nothing is downloaded. ``dsan_jax.runtime`` calls it once at start-up, when it chooses
``conv_impl="onednn"``; the ``dsan-onednn-check`` command runs it by hand.
"""

import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jaxlib

from dsan_jax import files

log = logging.getLogger("dsan_jax")

SOURCE = pathlib.Path(__file__).with_name("onednn_conv3d.cc")
_WHEEL_HEADERS = "onednn-devel-cpu-gomp"
_WHEEL_LIBRARY = "onednn-cpu-gomp"


class OnednnUnavailableError(RuntimeError):
  """oneDNN convolutions were asked for but cannot be built or loaded here."""


def cache_dir() -> pathlib.Path:
  """Where compiled handler libraries are kept ($DSAN_JAX_CACHE or ~/.cache/dsan_jax)."""
  root = os.environ.get("DSAN_JAX_CACHE")
  if root:
    return pathlib.Path(root)
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "dsan_jax"


def _find_in_distribution(dist_name: str, suffix: str) -> pathlib.Path | None:
  try:
    dist = importlib.metadata.distribution(dist_name)
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in dist.files or ():
    if str(f).replace("\\", "/").endswith(suffix):
      path = pathlib.Path(dist.locate_file(f)).resolve()
      if path.exists():
        return path
  return None


def find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
  """Locates oneDNN's headers and library.

  Returns:
    (include directory holding ``oneapi/dnnl/dnnl.hpp``, directory holding ``libdnnl.so``).

  Raises:
    OnednnUnavailableError: naming what is missing.
  """
  root = os.environ.get("DSAN_ONEDNN_ROOT")
  if root:
    inc, lib = pathlib.Path(root) / "include", pathlib.Path(root) / "lib"
    if not (inc / "oneapi" / "dnnl" / "dnnl.hpp").exists():
      raise OnednnUnavailableError(f"DSAN_ONEDNN_ROOT={root}: no include/oneapi/dnnl/dnnl.hpp")
    if not any(lib.glob("libdnnl.so*")):
      raise OnednnUnavailableError(f"DSAN_ONEDNN_ROOT={root}: no lib/libdnnl.so*")
    return inc, lib
  header = _find_in_distribution(_WHEEL_HEADERS, "oneapi/dnnl/dnnl.hpp")
  library = _find_in_distribution(_WHEEL_LIBRARY, "libdnnl.so")
  if header is None or library is None:
    raise OnednnUnavailableError(
        f"oneDNN not found: install the CPU extra (pip install -e \".[cpu]\", which brings the "
        f"'{_WHEEL_HEADERS}' wheel) or set DSAN_ONEDNN_ROOT to a oneDNN 3.x install")
  return header.parents[2], library.parent


def _library_path(include: pathlib.Path, libdir: pathlib.Path, cxx: str) -> pathlib.Path:
  key = hashlib.sha256()
  version_header = include / "oneapi" / "dnnl" / "dnnl_version.h"  # An upgrade in place.
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), str(include).encode(),
               version_header.read_bytes(), str(libdir).encode(), cxx.encode(),
               sys.platform.encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / "onednn" / key.hexdigest()[:16] / "libdsan_onednn_conv3d.so"


def build(verbose: bool = False) -> pathlib.Path:
  """Compiles ``onednn_conv3d.cc`` into the cache (once; later calls return the cached file).

  Args:
    verbose: print the compiler command.

  Returns:
    Path of the shared library.

  Raises:
    OnednnUnavailableError: no oneDNN, no compiler, or the compiler failed (its last lines are
      in the message). Nothing half-written is left in the cache: the library is compiled to a
      temporary name and renamed into place.
  """
  include, libdir = find_onednn()
  cxx = os.environ.get("CXX", "g++")
  out = _library_path(include, libdir, cxx)
  if out.exists():
    return out
  if shutil.which(cxx) is None:
    raise OnednnUnavailableError(f"no C++ compiler: {cxx!r} not found (set CXX)")
  out.parent.mkdir(parents=True, exist_ok=True)
  log.info("Compiling the oneDNN convolution handlers into %s (once per oneDNN/jaxlib).", out)
  with files.atomic_path(out) as tmp:
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
           f"-I{include}", str(SOURCE), f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-ldnnl", "-o",
           str(tmp)]
    if verbose:
      print(" ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
      tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
      raise OnednnUnavailableError(f"compiling {SOURCE.name} failed ({cxx}):\n{tail}")
  return out
