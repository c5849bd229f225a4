"""Reading NIfTI volumes and DICOM series in the project's canonical layout; writing NIfTI.

A DICOM series (a folder, or ``folder#SeriesInstanceUID``) is read by ``dsan_jax.data.dicom``
into the same layout, with the geometry dcm2niix gives it; ``read_header``/``read_volume``
dispatch to it, so every caller accepts both.

Canonical layout: the image is reoriented to the closest RAS+ orientation
(``nib.as_closest_canonical``), voxel values are the stored values with the header's
slope/intercept applied (Hounsfield units for CT), and the array is transposed to
``[D, H, W] = (z, y, x)``. The original affine and shape are kept so that results (attention
maps, masks) can be written back on the input's own voxel grid (``to_original_orientation``).

Every expected problem with an input file raises ``DataError(path, cause)`` with a one-line
cause. The rules (documented in docs/data.md, pinned by tests/data/test_io.py):

* missing, empty, truncated or non-NIfTI file -> refused;
* fewer than 3 dimensions, or a "3D" image with fewer than ``MIN_AXIS_VOXELS`` voxels on an
  axis (a single slice saved as 3D) -> refused as 2D;
* 4D: a trailing axis of size 1 is dropped silently; more than one volume is refused (taking
  the first would silently pick an arbitrary phase/echo, a wrong answer users would not see);
* NaN or Inf voxels -> refused;
* spacing outside ``SPACING_RANGE_MM`` (zero, negative, absurdly small or large) -> refused;
* images (not masks) that are clearly not in HU -> refused; see ``check_hounsfield``;
* constant images (all voxels equal, e.g. all air) -> refused.
"""

from __future__ import annotations

from concurrent import futures
import dataclasses
import os
from pathlib import Path
import uuid

import nibabel as nib
import numpy as np

from dsan_jax.errors import DataError

# Voxel sizes outside this range (mm) are header errors, not scans.
SPACING_RANGE_MM = (0.05, 20.0)
# A "3D" volume with fewer voxels than this on an axis is a slice (or a stack of 2), not a CT.
MIN_AXIS_VOXELS = 3
# Raw scanner values: min >= 0 and max above this with no rescale -> not HU (see check_hounsfield).
RAW_UNSIGNED_MAX_HU = 2000.0
# Values no CT in HU reaches; beyond them the data is not HU at all.
HU_PLAUSIBLE_RANGE = (-4000.0, 40000.0)
# Affines of an image and its masks may differ by float rounding of this much (mm).
AFFINE_ATOL_MM = 1e-2
# Decompress .nii.gz with ISA-L (the optional ``isal`` package) when it is installed.
USE_ISAL = True
# k-slices per slab of a streamed .nii.gz read (``_streamed_canonical``); 0: no streaming
# (the whole file decompressed in one call, then converted).
STREAM_SLAB = 4


@dataclasses.dataclass
class Volume:
  """A volume in canonical layout.

  Attributes:
    array: [D, H, W] float32 (z, y, x), RAS+ canonical; HU for images, {0, 1} for masks.
    spacing_zyx: voxel size in mm, (z, y, x).
    affine: 4x4 voxel->world affine of the canonical image, indexed (x, y, z) like NIfTI.
    original_affine: 4x4 affine of the file as stored.
    original_shape: spatial shape of the file as stored, (i, j, k).
    path: the file it came from.
  """
  array: np.ndarray
  spacing_zyx: tuple[float, float, float]
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: tuple[int, int, int]
  path: Path


@dataclasses.dataclass(frozen=True)
class HeaderInfo:
  """What the header says, without reading voxels (cheap; used by manifest validation).

  Attributes:
    shape: spatial shape as stored (i, j, k).
    affine: stored 4x4 affine.
    canonical_shape_zyx: [D, H, W] after canonical reorientation.
    canonical_affine: affine after canonical reorientation.
    spacing_zyx: voxel size in mm, (z, y, x), canonical.
    slope, intercept: scaling from the header (None when absent).
  """
  shape: tuple[int, int, int]
  affine: np.ndarray
  canonical_shape_zyx: tuple[int, int, int]
  canonical_affine: np.ndarray
  spacing_zyx: tuple[float, float, float]
  slope: float | None
  intercept: float | None


def _load(path: Path) -> nib.Nifti1Image:
  if not path.exists():
    raise DataError(path, "file not found")
  if path.is_dir():
    raise DataError(path, "is a directory, expected a NIfTI file")
  if path.stat().st_size == 0:
    raise DataError(path, "empty file")
  try:
    img = nib.load(str(path))
  except nib.filebasedimages.ImageFileError as e:
    if _is_dicom_file(path):
      raise DataError(path, "is one DICOM file; pass the folder of its series (a DICOM series "
                      "is read from its folder)") from None
    raise DataError(path, f"not a readable NIfTI file ({_short(e)})") from None
  except Exception as e:  # OSError, EOFError, HeaderDataError, struct.error...: all damage.
    raise DataError(path, f"cannot read header, truncated or corrupt ({_short(e)})") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(path, f"not a NIfTI image (nibabel reads it as {type(img).__name__})")
  return img


def _is_dicom_file(path: Path) -> bool:
  """The DICOM Part 10 preamble: 128 bytes, then ``DICM``."""
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:] == b"DICM"
  except OSError:
    return False


def _short(e: BaseException) -> str:
  msg = " ".join(str(e).split())
  msg = msg if len(msg) < 160 else msg[:157] + "..."
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """Validates dimensionality; returns the 3 spatial sizes (squeezing trailing singletons)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 3:
    raise DataError(path, f"{len(shape)}D image of shape {shape}, expected a 3D volume")
  extra = shape[3:]
  if any(s != 1 for s in extra):
    raise DataError(
        path, f"4D image of shape {shape} holds {int(np.prod(extra))} volumes; refusing to "
        "guess which one is the CT (extract the volume, e.g. with fslroi, and retry)")
  spatial = shape[:3]
  if min(spatial) < MIN_AXIS_VOXELS:
    raise DataError(
        path, f"image of shape {spatial} is 2D (an axis has fewer than {MIN_AXIS_VOXELS} "
        "voxels), expected a 3D volume")
  return spatial  # type: ignore[return-value]


def _canonical_geometry(shape, affine):
  """Canonical (RAS+) shape (x, y, z) and affine, from the header alone."""
  ornt = nib.io_orientation(affine)
  canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
  # io_orientation gives, per stored axis, the world axis it maps to; invert that permutation.
  perm = [0, 0, 0]
  for stored_axis, (world_axis, _) in enumerate(ornt):
    perm[int(world_axis)] = stored_axis
  canonical_shape = tuple(int(shape[p]) for p in perm)
  return canonical_shape, canonical_affine


def _check_spacing(path: Path, spacing) -> tuple[float, float, float]:
  spacing = tuple(float(s) for s in spacing)
  lo, hi = SPACING_RANGE_MM
  if not all(np.isfinite(s) and lo <= s <= hi for s in spacing):
    raise DataError(
        path, f"voxel spacing {tuple(round(s, 6) for s in spacing)} mm is zero, negative or "
        f"outside [{lo}, {hi}] mm; fix the header (pixdim / affine)")
  return spacing  # type: ignore[return-value]


def _check_raw_pixdim(path: Path, img) -> None:
  """Refuses zero/negative pixdim when the affine is built from it.

  nibabel "fixes" pixdim 0 to 1 mm while loading (a silent wrong spacing), so the header is
  re-read unchecked. With an sform the affine does not depend on pixdim and wins.
  """
  if int(img.header["sform_code"]) > 0:
    return
  try:
    with nib.openers.ImageOpener(str(path)) as f:
      raw = type(img.header).from_fileobj(f, check=False)
  except Exception:  # The checked header was readable; nothing more to learn here.
    return
  pixdim = np.asarray(raw["pixdim"][1:4], np.float64)
  if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
    raise DataError(
        path, f"voxel spacing (pixdim) {tuple(float(p) for p in pixdim)} mm is zero or "
        "negative and the file has no sform; fix the header")


def is_dicom_source(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a DICOM series (a folder, or ``folder#SeriesInstanceUID``)."""
  from dsan_jax.data import dicom  # Deferred: pydicom is only imported for DICOM input.
  return dicom.split_source(path) is not None


def source_exists(path: str | os.PathLike) -> bool:
  """Whether an input exists: a file, a folder, or the folder of ``folder#SeriesInstanceUID``."""
  return Path(path).exists() or is_dicom_source(path)


def source_fingerprint(path: str | os.PathLike) -> list:
  """Cheap identity of an input for cache keys: changes when the input's files change.

  Args:
    path: a NIfTI file or a DICOM series (see ``is_dicom_source``).

  Returns:
    ``[resolved path, size, mtime_ns]`` for a file; for a DICOM series
    ``[resolved folder#uid, number of files, SHA-256 of their names, sizes and mtimes]``.

  Raises:
    OSError: the input cannot be stat-ed.
  """
  if is_dicom_source(path):
    from dsan_jax.data import dicom  # Deferred: pydicom only for DICOM input.
    return dicom.fingerprint(path)
  st = os.stat(path)
  return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def header_from_geometry(path: Path, shape, affine: np.ndarray, slope: float | None,
                         intercept: float | None) -> HeaderInfo:
  """Validates a stored (shape, affine) pair and derives the canonical geometry.

  Args:
    path: the input, for messages.
    shape: stored shape (i, j, k), at least 3D.
    affine: stored 4x4 voxel->world (RAS+) affine.
    slope, intercept: the value scaling (None when absent).

  Returns:
    HeaderInfo.

  Raises:
    DataError: not 3D, bad spacing, non-finite or singular affine.
  """
  shape = _spatial_shape(path, shape)
  affine = np.asarray(affine, dtype=np.float64)
  if not np.all(np.isfinite(affine)):
    raise DataError(path, "affine is not finite; fix the header (sform/qform)")
  _check_spacing(path, np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[::-1])
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DataError(path, "affine is singular (voxel axes not independent); fix the header")
  canonical_shape, canonical_affine = _canonical_geometry(shape, affine)
  spacing_xyz = np.sqrt((canonical_affine[:3, :3] ** 2).sum(axis=0))
  spacing_zyx = _check_spacing(path, spacing_xyz[::-1])
  return HeaderInfo(
      shape=shape,
      affine=affine,
      canonical_shape_zyx=canonical_shape[::-1],
      canonical_affine=canonical_affine,
      spacing_zyx=spacing_zyx,
      slope=None if slope is None or not np.isfinite(slope) else float(slope),
      intercept=None if intercept is None or not np.isfinite(intercept) else float(intercept),
  )


def read_header(path: str | os.PathLike, *, is_mask: bool = False) -> HeaderInfo:
  """Reads and validates a header only (no voxel data).

  Args:
    path: a .nii or .nii.gz file, or a DICOM series (a folder of one series, or
      ``folder#SeriesInstanceUID``; see ``dsan_jax.data.dicom``).
    is_mask: the input is a mask (DICOM: any modality is accepted, not only CT).

  Returns:
    HeaderInfo.

  Raises:
    DataError: missing/empty/non-NIfTI file, not 3D, bad spacing or affine; for DICOM every
      series rule of ``dsan_jax.data.dicom``.
  """
  if is_dicom_source(path):
    from dsan_jax.data import dicom  # Deferred: pydicom only for DICOM input.
    return dicom.read_header(path, is_mask=is_mask)
  path = Path(path)
  img = _load(path)
  _spatial_shape(path, img.shape)  # Dimensionality first: it explains most bad files.
  _check_raw_pixdim(path, img)
  return header_from_geometry(path, img.shape, img.affine, img.dataobj.slope,
                              img.dataobj.inter)


def check_hounsfield(path, array: np.ndarray, slope, intercept,
                     value_range: tuple[float, float] | None = None) -> None:
  """Refuses images that are clearly not in Hounsfield units.

  Rule (docs/data.md): a CT in HU has air near -1000. If the smallest value is >= 0, the
  largest exceeds ``RAW_UNSIGNED_MAX_HU`` and the header has no rescale (intercept 0 or
  absent, slope 1 or absent), the file holds raw unsigned scanner values (typically 0..4095)
  whose intercept (usually -1024) was lost in conversion. Values outside
  ``HU_PLAUSIBLE_RANGE`` are refused as well. A scan with min >= 0 but max <= 2000, or with a
  header intercept, passes (it may be cropped to the body).

  ``value_range``: (min, max) of ``array`` when the caller has them (saves two passes).

  Raises:
    DataError: with the observed range and the likely fix.
  """
  lo, hi = value_range if value_range is not None else (float(array.min()), float(array.max()))
  no_rescale = (intercept in (None, 0.0)) and (slope in (None, 1.0))
  if lo >= 0 and hi > RAW_UNSIGNED_MAX_HU and no_rescale:
    raise DataError(
        path, f"values {lo:g}..{hi:g} with no rescale intercept look like raw unsigned scanner "
        "values, not Hounsfield units (air should be near -1000); convert with the DICOM "
        "RescaleIntercept (usually -1024)")
  if lo < HU_PLAUSIBLE_RANGE[0] or hi > HU_PLAUSIBLE_RANGE[1]:
    raise DataError(
        path, f"values {lo:g}..{hi:g} are outside any CT range in Hounsfield units "
        f"{HU_PLAUSIBLE_RANGE}")


def read_volume(path: str | os.PathLike, *, is_mask: bool = False) -> Volume:
  """Reads a NIfTI file or a DICOM series into canonical layout, validating it.

  Args:
    path: a .nii or .nii.gz file, or a DICOM series (see ``read_header``).
    is_mask: the file is a segmentation mask: values are binarised (integer labels: > 0;
      non-integer values, i.e. probabilities: >= 0.5) and the HU and constant checks are
      skipped (an empty mask is the caller's to judge).

  Returns:
    Volume with ``array`` [D, H, W] float32 (HU, or {0, 1} for masks).

  Raises:
    DataError: for every rule in the module docstring (and, for DICOM, in
      ``dsan_jax.data.dicom``).
  """
  if is_dicom_source(path):
    from dsan_jax.data import dicom  # Deferred: pydicom only for DICOM input.
    return dicom.read_volume(path, is_mask=is_mask)
  path = Path(path)
  header = read_header(path)
  img = _load(path)
  slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
  try:
    streamed = _streamed_canonical(path, img, header, slope, inter)
    data = _stored_voxels(path, img) if streamed is None else None
  except Exception as e:  # nibabel/gzip raise many types for damaged data; all mean the same.
    raise DataError(path, f"cannot read voxel data, truncated or corrupt ({_short(e)})") from None
  if streamed is not None:
    array, value_range = streamed
    return _checked_volume(path, array, header, is_mask=is_mask,
                           integer=np.dtype(img.dataobj.dtype).kind in "biu",
                           value_range=value_range)
  # Scaled in float32 after the reorientation, in finish_volume (nibabel would scale in float64:
  # 2x the memory, slower).
  return finish_volume(path, data.reshape(data.shape[:3]), header, is_mask=is_mask,
                       slope=slope, inter=inter)


def _read_exactly(f, buffer: memoryview) -> None:
  n = 0
  while n < len(buffer):
    got = f.readinto(buffer[n:])
    if not got:
      raise EOFError("the decompressed file ends before the voxel data the header describes")
    n += got


def _streamed_canonical(path: Path, img, header: HeaderInfo, slope: float, inter: float):
  """A .nii.gz read slab by slab straight into the canonical float32 array, or None.

  Applies when the stored k axis is the canonical z axis (every axial scan) and the voxels are
  stored in Fortran order: each slab of ``STREAM_SLAB`` k-slices, decompressed into one of two
  small buffers, is reoriented, converted and scaled (``scale_into``, the same float32
  operations as ``finish_volume``) by a second thread while the next slab is decompressed
  (ISA-L and zlib release the GIL). No whole decompressed copy of the file is made, the
  conversion overlaps the decompression on 2 cores, and the minimum and maximum are taken of
  each slab while it is in cache. The gzip stream is read to its end (its CRC is checked).

  Returns:
    (array [D, H, W] float32, (min, max)), or None where the layout does not apply.
  """
  proxy = img.dataobj
  shape = tuple(int(n) for n in proxy.shape)
  ornt = nib.io_orientation(header.affine)
  if (STREAM_SLAB < 1 or not str(path).endswith(".gz") or getattr(proxy, "order", "F") != "F"
      or len(shape) < 3 or any(n != 1 for n in shape[3:]) or int(ornt[2, 0]) != 2):
    return None
  ni, nj, nk = shape[:3]
  dtype = np.dtype(proxy.dtype)
  canonical = nib.orientations.apply_orientation(
      np.empty((ni, nj, 1), np.uint8), ornt).transpose(2, 1, 0).shape[1:]
  out = np.empty((nk,) + canonical, np.float32)
  per_slice = ni * nj * dtype.itemsize
  buffers = [np.empty(per_slice * STREAM_SLAB, np.uint8) for _ in range(2)]
  ranges = []

  def convert(buffer, k0, k1):
    slab = buffer[:per_slice * (k1 - k0)].view(dtype).reshape(k1 - k0, nj, ni).transpose(2, 1, 0)
    view = nib.orientations.apply_orientation(slab, ornt).transpose(2, 1, 0)
    dst = out[nk - k1:nk - k0] if ornt[2, 1] < 0 else out[k0:k1]
    scale_into(dst, view, slope, inter)
    ranges.append((float(dst.min()), float(dst.max())))

  with _gzip_module().open(path, "rb") as f, futures.ThreadPoolExecutor(1) as pool:
    _read_exactly(f, memoryview(bytearray(int(proxy.offset))))
    pending = None
    for i, k0 in enumerate(range(0, nk, STREAM_SLAB)):
      k1 = min(k0 + STREAM_SLAB, nk)
      _read_exactly(f, memoryview(buffers[i % 2])[:per_slice * (k1 - k0)])
      if pending is not None:
        pending.result()  # The other buffer is free again (and a failure is raised).
      pending = pool.submit(convert, buffers[i % 2], k0, k1)
    pending.result()
    while f.read(1 << 20):  # Trailing bytes, and the CRC and length check at the end.
      pass
  lo, hi = zip(*ranges)
  return out, (float(np.min(lo)), float(np.max(hi)))  # NaN propagates (Python's min does not).


def _gzip_module():
  """The fastest gzip implementation installed: ISA-L's ``igzip`` (``isal``) when enabled,
  else the standard ``gzip`` (both give ``open`` and ``decompress``)."""
  if USE_ISAL:
    try:
      from isal import igzip  # pylint: disable=import-outside-toplevel
      return igzip
    except ImportError:
      pass
  import gzip  # pylint: disable=import-outside-toplevel
  return gzip


def _stored_voxels(path: Path, img) -> np.ndarray:
  """The unscaled voxels of a NIfTI file, in the stored dtype and order (i, j, k[, ...]).

  A ``.nii.gz`` is decompressed in one call (``_gzip_module().decompress``: ~3x faster with ISA-L,
  1.4x with zlib, than nibabel's streamed read) and viewed in place; anything else is read by
  nibabel. Both give the same array (pinned by tests/data/test_speedups.py).
  """
  proxy = img.dataobj
  if not str(path).endswith(".gz"):
    return np.asarray(proxy.get_unscaled())
  raw = _gzip_module().decompress(path.read_bytes())
  dtype = np.dtype(proxy.dtype)
  count = int(np.prod(proxy.shape))
  if len(raw) < proxy.offset + count * dtype.itemsize:
    raise EOFError(f"{len(raw)} bytes after decompression, the header needs "
                   f"{proxy.offset + count * dtype.itemsize}")
  data = np.frombuffer(raw, dtype, count=count, offset=proxy.offset)
  return data.reshape(proxy.shape, order=proxy.order)


def scale_into(out: np.ndarray, values: np.ndarray, slope: float | None = 1.0,
               inter: float | None = 0.0) -> None:
  """``out[...] = float32(values) * float32(slope) + float32(inter)``, fused where it can be.

  The same float32 operations (and bits) as ``out[...] = values; out *= slope; out += inter``,
  but the conversion is fused with the first of them: one pass over ``out`` fewer (two with
  slope 1), and for reversed-stride ``values`` several times faster than a plain assignment.

  Args:
    out: float32 array to fill.
    values: any numeric array of ``out``'s shape (any strides).
    slope, inter: the scaling; None, 1 and 0 mean none.
  """
  has_slope = slope is not None and slope != 1
  has_inter = inter is not None and inter != 0
  if has_slope:
    np.multiply(values, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
  elif has_inter:
    np.add(values, np.float32(inter), out=out, dtype=np.float32, casting="unsafe")
  else:
    np.copyto(out, values, casting="unsafe")
  if has_slope and has_inter:
    out += np.float32(inter)


def finish_volume(path: Path, data: np.ndarray, header: HeaderInfo, *,
                  is_mask: bool = False, slope: float = 1.0, inter: float = 0.0) -> Volume:
  """Validates voxel data and brings it to canonical layout (shared by every reader).

  The reorientation is done on ``data`` as given (int16 for most CT files: half the bytes of
  float32), and the conversion to float32, the scaling and the copy into canonical order are
  one pass: ``float32(x) * float32(slope) + float32(inter)`` per voxel, the same values as
  scaling before the reorientation.

  Args:
    path: the input, for messages and ``Volume.path``.
    data: [i, j, k] voxel values in the stored order of ``header.affine``: float32 HU (DICOM,
      already rescaled), or the file's stored values of any numeric dtype (NIfTI).
    header: the input's HeaderInfo.
    is_mask: binarise instead of the HU and constant checks (see ``read_volume``).
    slope, inter: scaling applied after the float32 conversion (1 and 0: none).

  Returns:
    Volume.

  Raises:
    DataError: NaN/Inf voxels, constant image, not in HU.
  """
  # Reorient exactly as as_closest_canonical does: flips and a transpose are views of ``data``.
  ornt = nib.io_orientation(header.affine)
  view = nib.orientations.apply_orientation(data, ornt).transpose(2, 1, 0)
  if view.dtype == np.float32 and view.flags.c_contiguous and slope == 1 and inter == 0:
    array = np.array(view, copy=None)  # DICOM's reader hands over canonical float32: no copy.
  else:
    array = np.empty(view.shape, np.float32)
    scale_into(array, view, slope, inter)
  # One min and one max serve every check: NaN propagates through both, and +-Inf shows in one.
  return _checked_volume(path, array, header, is_mask=is_mask, integer=data.dtype.kind in "biu",
                         value_range=(float(array.min()), float(array.max())))


def _checked_volume(path: Path, array: np.ndarray, header: HeaderInfo, *, is_mask: bool,
                    integer: bool, value_range: tuple[float, float]) -> Volume:
  """``finish_volume``'s checks of a canonical float32 ``array`` (its (min, max) given)."""
  lo, hi = value_range
  # Integer voxels scaled by a finite slope and intercept are finite: only floats are checked.
  if not integer and not (np.isfinite(lo) and np.isfinite(hi)):
    n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise DataError(path, f"{n_bad} NaN or Inf voxels")
  if is_mask:
    # Label maps (0/1, 0/1/2, 0/255) -> > 0; soft masks (probabilities) -> >= 0.5.
    soft = bool(np.any(array != np.round(array)))
    array = ((array >= 0.5) if soft else (array > 0)).astype(np.float32)
  else:
    if lo == hi:
      raise DataError(path, f"constant image (every voxel is {lo:g})")
    check_hounsfield(path, array, header.slope, header.intercept, value_range=(lo, hi))
  return Volume(
      array=array,
      spacing_zyx=header.spacing_zyx,
      affine=header.canonical_affine,
      original_affine=header.affine,
      original_shape=header.shape,
      path=path,
  )


def same_grid(a_shape, a_affine, b_shape, b_affine, atol: float = AFFINE_ATOL_MM) -> bool:
  """Whether two (shape, affine) pairs describe the same voxel grid, within ``atol`` mm."""
  return tuple(a_shape) == tuple(b_shape) and np.allclose(a_affine, b_affine, atol=atol)


def to_original_orientation(array_dhw: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
  """Inverse of the canonical reorientation: [D, H, W] canonical -> array in the file's order.

  Args:
    array_dhw: [D, H, W] array on the canonical grid of an image read with ``read_volume``.
    original_affine: that image's stored affine (``Volume.original_affine``).

  Returns:
    Array indexed like the stored file (i, j, k); save it with ``original_affine``.
  """
  xyz = array_dhw.transpose(2, 1, 0)
  # apply_orientation(data, ornt) maps stored -> canonical; ornt_transform(RAS, ornt) inverts it.
  inverse = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt("RAS"), nib.io_orientation(original_affine))
  return np.ascontiguousarray(nib.orientations.apply_orientation(xyz, inverse))


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None) -> Path:
  """Writes a NIfTI file atomically (temporary file in the same folder, then ``os.replace``).

  A process killed mid-write leaves at most a hidden temporary file, never a truncated
  ``path``.

  Args:
    path: destination, .nii or .nii.gz.
    array: voxel array indexed like ``affine`` (i, j, k).
    affine: 4x4 voxel->world affine.
    header: optional header to copy (dtype, units...).

  Returns:
    The destination path.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
  img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64), header=header)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  try:
    nib.save(img, str(tmp))
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
