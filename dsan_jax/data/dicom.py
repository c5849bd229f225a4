"""Reading a CT stored as a DICOM series (a folder of single-frame images).

Naming a series: a folder that holds one series, or ``<folder>#<SeriesInstanceUID>`` to pick
one of several. ``dsan_jax.data.io.read_header``/``read_volume`` dispatch here, so a manifest's
``image``/``lung_mask``/``infection_mask``, the cache and ``predict --image`` accept either.

The rules (docs/data.md "DICOM series", pinned by tests/data/test_dicom.py):

* Files: every regular, non-hidden file directly in the folder. Files that are not DICOM
  (no ``DICM`` preamble) and DICOM files that are not images (DICOMDIR, reports) are ignored
  with a log note; a DICOM file that cannot be parsed, or an image-storage file without an
  image (pydicom reads a truncated file without complaint), is refused (it is a lost slice).
* Localizers: images whose ImageType contains ``LOCALIZER`` are dropped, with a log warning
  naming them. Any other image whose orientation, size or pixel spacing differs from the rest
  of its series is refused (a scout without the flag, or two stacks in one series).
* Series: after dropping localizers, a folder must hold one SeriesInstanceUID, or the name must
  pick one (``folder#uid``); otherwise the error lists every series (uid, description, count).
* Modality: images must be CT (masks may have any modality). Multi-frame (enhanced) files and
  colour images are refused.
* Order: slices are sorted by their position along the slice normal (the cross product of
  ImageOrientationPatient's row and column directions, dotted with ImagePositionPatient),
  never by file name or InstanceNumber.
* Spacing: two slices within ``DUPLICATE_ATOL_MM`` are duplicates -> refused; a step over
  ``GAP_FACTOR`` times the median step means missing slices -> refused; every slice must lie
  within ``UNIFORM_TOL`` slice spacings of a uniform grid, else non-uniform -> refused (no
  resampling is done).
* Gantry tilt: the slices' in-plane drift along the stack must stay under half a pixel, else
  refused (this reader does not correct tilt).
* Values: RescaleSlope and RescaleIntercept of each slice are applied (float32), giving HU.
  Pixel data are decoded by pydicom (pylibjpeg for JPEG), or, for lossless JPEG when
  imagecodecs is installed, by imagecodecs (libjpeg-turbo's decoder where it has one, else
  liblj92's; checked against pydicom on the first slice).
* Geometry: the stored voxel order is dcm2niix's: i = column, j = row reversed, k = slices in
  increasing position along the normal; the affine maps it to RAS+ world coordinates (DICOM's
  LPS with x and y negated), so the volume equals dcm2niix's NIfTI of the same series.
"""

from __future__ import annotations

import collections
from concurrent import futures
import contextlib
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
import warnings

import numpy as np
import pydicom
import pydicom.config
import pydicom.tag
import pydicom.uid
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError

from dsan_jax.data import io
from dsan_jax.errors import DataError

SELECTOR = "#"
# Direction cosines of two slices of one stack agree to this (DS values carry >= 6 digits).
ORIENTATION_ATOL = 1e-4
# Slice positions closer than this (mm) along the normal are the same position.
DUPLICATE_ATOL_MM = 1e-2
# A step longer than this many median steps is a gap: slices are missing.
GAP_FACTOR = 1.5
# Every slice lies within this fraction of the slice spacing of a uniform grid.
UNIFORM_TOL = 0.1
# Tags read for a header-only pass (no pixel data).
HEADER_TAGS = ("SeriesInstanceUID", "SeriesDescription", "Modality", "ImageType",
               "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows",
               "Columns", "NumberOfFrames", "SamplesPerPixel", "RescaleSlope",
               "RescaleIntercept", "GantryDetectorTilt")
# Tags read with the pixels: the above, and those of the image pixel module and the pixel data
# that pydicom's decoders read (``pydicom.pixels.utils._IMAGE_PIXEL``, the extended offset
# table). Parsing only these skips the values (and the sequences of defined length) of the
# rest: 0.19 -> 0.13 s CPU for P002's 133 files. As ``BaseTag``s: pydicom converts the list per
# file, and a long list is slow (it is searched per element).
PIXEL_PASS_TAGS = [pydicom.tag.Tag(k) for k in HEADER_TAGS + (
    "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData")]
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Lossless JPEG (Process 14, any predictor / selection value 1): decoded by imagecodecs when
# it is installed (``pip install imagecodecs``; 3-6x faster than pylibjpeg's libjpeg).
FAST_SYNTAXES = (pydicom.uid.JPEGLossless, pydicom.uid.JPEGLosslessSV1)
USE_IMAGECODECS = True  # False: always pydicom's decoders (the reference; tests use both).
# Slices are decoded by this many threads (imagecodecs and NumPy release the GIL; pydicom's
# decoders mostly do not, so they gain little). 1: in the calling thread.
DECODE_THREADS = min(4, os.cpu_count() or 1)

log = logging.getLogger("dsan_jax")


@dataclasses.dataclass
class _Image:
  """The tags of one DICOM image this reader uses, as plain values."""
  path: Path
  series_uid: str
  description: str
  modality: str
  image_type: tuple[str, ...]
  orientation: np.ndarray | None  # (6,) row direction, column direction (LPS).
  position: np.ndarray | None  # (3,) LPS mm of the first pixel.
  spacing: tuple[float, float] | None  # PixelSpacing: (between rows, between columns) mm.
  rows: int
  columns: int
  frames: int
  samples: int
  slope: float | None
  intercept: float | None
  tilt: float
  dataset: pydicom.Dataset | None  # Kept when pixels are to be decoded.


def split_source(path: str | os.PathLike) -> tuple[Path, str | None] | None:
  """Splits a DICOM series name into (folder, SeriesInstanceUID or None).

  Args:
    path: a folder, or ``folder#SeriesInstanceUID`` (an existing path is never split).

  Returns:
    (folder, uid) for a DICOM series name, None for anything else (a file, a missing path).
  """
  p = Path(path)
  if p.is_dir():
    return p, None
  if p.exists():
    return None
  folder, sep, uid = str(path).rpartition(SELECTOR)
  if sep and uid.strip() and Path(folder).is_dir():
    return Path(folder), uid.strip()
  return None


def _files(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def fingerprint(path: str | os.PathLike) -> list:
  """Cheap identity of a series for cache keys: the folder's file names, sizes and mtimes.

  Args:
    path: a DICOM series name (see ``split_source``).

  Returns:
    [resolved folder (with ``#uid`` when given), number of files, SHA-256 hex of the listing].
  """
  folder, uid = split_source(path)
  h = hashlib.sha256()
  files = _files(folder)
  for f in files:
    st = f.stat()
    h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  name = str(folder.resolve()) + (f"{SELECTOR}{uid}" if uid else "")
  return [name, len(files), h.hexdigest()]


@contextlib.contextmanager
def _quiet():
  """pydicom validates values lazily and warns on anonymised, non-conformant ones (e.g. UIDs
  that are UUIDs); those do not affect this reader, so validation is off while it reads (a
  global pydicom setting: do not read DICOM from several threads at once)."""
  settings = pydicom.config.settings
  mode = settings.reading_validation_mode
  settings.reading_validation_mode = pydicom.config.IGNORE
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    settings.reading_validation_mode = mode


def _raw_decimals(ds, tag: str, n: int) -> np.ndarray | None:
  """``n`` finite numbers read straight from a DS element's raw bytes (``float`` of each
  backslash-separated string: the value pydicom's DSfloat holds, without its ~4x slower
  conversion), or None where that is not clean (converted already, absent, another VR, not
  ASCII, empty, malformed, the wrong count): ``_floats`` then asks pydicom."""
  elem = ds.get_item(tag)
  if not (isinstance(elem, RawDataElement) and elem.VR in ("DS", None)
          and isinstance(elem.value, bytes)):
    return None
  try:
    arr = np.asarray([float(v) for v in elem.value.decode("ascii").rstrip(" \x00").split("\\")],
                     np.float64)
  except (UnicodeDecodeError, ValueError):
    return None
  return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _floats(ds, tag: str, n: int) -> np.ndarray | None:
  """The ``n`` numbers of DS element ``tag``; None when absent or empty. ValueError: malformed."""
  fast = _raw_decimals(ds, tag, n)
  if fast is not None:
    return fast
  value = ds.get(tag)
  if value is None or value == "":
    return None
  arr = np.asarray([float(v) for v in (value if n > 1 else [value])], np.float64)
  if arr.shape != (n,) or not np.all(np.isfinite(arr)):
    raise ValueError(f"{tag} {list(value) if n > 1 else value} is not {n} finite number(s)")
  return arr


def _parse(path: Path, ds, keep: bool) -> _Image:
  """Extracts the tags this reader uses; DataError names the file for a malformed one."""
  try:
    spacing = _floats(ds, "PixelSpacing", 2)
    slope, intercept = _floats(ds, "RescaleSlope", 1), _floats(ds, "RescaleIntercept", 1)
    tilt = _floats(ds, "GantryDetectorTilt", 1)
    image_type = ds.get("ImageType") or ()
    return _Image(
        path=path, series_uid=str(ds.get("SeriesInstanceUID") or ""),
        description=str(ds.get("SeriesDescription") or ""),
        modality=str(ds.get("Modality") or ""),
        image_type=tuple(str(t).upper() for t in
                         ([image_type] if isinstance(image_type, str) else image_type)),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        rows=int(ds.get("Rows") or 0), columns=int(ds.get("Columns") or 0),
        frames=int(ds.get("NumberOfFrames") or 1), samples=int(ds.get("SamplesPerPixel") or 1),
        slope=None if slope is None else float(slope[0]),
        intercept=None if intercept is None else float(intercept[0]),
        tilt=0.0 if tilt is None else float(tilt[0]), dataset=ds if keep else None)
  except (ValueError, TypeError) as e:
    raise DataError(path, f"malformed DICOM tag ({io._short(e)})") from None


def _scan(folder: Path, pixels: bool) -> list[_Image]:
  """Reads every DICOM image of the folder (headers only unless ``pixels``)."""
  images, ignored = [], []
  files = _files(folder)
  for f in files:
    try:
      ds = pydicom.dcmread(f, specific_tags=PIXEL_PASS_TAGS if pixels else list(HEADER_TAGS))
    except InvalidDicomError:
      ignored.append(f.name)
      continue
    except Exception as e:  # pydicom raises many types for a damaged file; all mean the same.
      raise DataError(f, f"cannot read the DICOM file, truncated or corrupt ({io._short(e)})"
                      ) from None
    if not ds.get("Rows"):  # DICOMDIR, structured report, presentation state...
      sop = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
      if "Image Storage" in getattr(sop, "name", ""):  # pydicom reads a cut file silently.
        raise DataError(f, f"a {sop.name} file without Rows: truncated or corrupt")
      ignored.append(f.name)
      continue
    images.append(_parse(f, ds, keep=pixels))
  if ignored:
    log.info("%s: ignored %d file(s) that are not DICOM images: %s", folder, len(ignored),
             ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
  if not images:
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    hint = (f"; it has subfolders ({', '.join(subdirs[:5])}): pass the folder of one series"
            if subdirs else "")
    raise DataError(folder, f"no DICOM images in the folder ({len(files)} files){hint}; "
                    "expected a NIfTI file or a folder of one DICOM series")
  return images


def _listing(groups: dict[str, list[_Image]]) -> str:
  parts = []
  for uid, ims in groups.items():
    kind = " localizer" if all("LOCALIZER" in im.image_type for im in ims) else ""
    parts.append(f"{uid or '(no SeriesInstanceUID)'} {ims[0].description!r} "
                 f"({len(ims)} {ims[0].modality or '?'}{kind} images)")
  return "; ".join(parts)


def _select(folder: Path, uid: str | None, images: list[_Image]) -> list[_Image]:
  """Drops localizers and picks the one series (named by ``uid`` when given)."""
  groups: dict[str, list[_Image]] = collections.defaultdict(list)
  for im in images:
    groups[im.series_uid].append(im)
  localizers = [im for im in images if "LOCALIZER" in im.image_type]
  if localizers:
    log.warning("%s: dropped %d localizer image(s) (ImageType LOCALIZER): %s", folder,
                len(localizers), ", ".join(im.path.name for im in localizers[:5]))
  kept: dict[str, list[_Image]] = collections.defaultdict(list)
  for im in images:
    if "LOCALIZER" not in im.image_type:
      kept[im.series_uid].append(im)
  if uid is not None:
    if uid not in kept:
      raise DataError(folder, f"no series {uid!r} (besides localizers) in the folder; it "
                      f"holds: {_listing(groups)}")
    return kept[uid]
  if not kept:
    raise DataError(folder, f"the folder holds only localizer images: {_listing(groups)}")
  if len(kept) > 1:
    raise DataError(folder, f"the folder holds {len(kept)} series; choose one as "
                    f"{folder}{SELECTOR}<SeriesInstanceUID>: {_listing(groups)}")
  return next(iter(kept.values()))


def _check_images(folder: Path, series: list[_Image], is_mask: bool) -> None:
  """Per-image rules: modality, single frame, greyscale, placed in space."""
  for im in series:
    if not is_mask and im.modality.upper() != "CT":
      raise DataError(im.path, f"modality {im.modality or '(none)'!r}, expected CT (series "
                      f"{im.series_uid or '?'} in {folder})")
    if im.frames > 1:
      raise DataError(im.path, f"multi-frame (enhanced) DICOM with {im.frames} frames is not "
                      "supported; export single-frame images or convert with dcm2niix")
    if im.samples != 1:
      raise DataError(im.path, f"{im.samples} samples per pixel (colour); expected greyscale")
    missing = [name for name, v in (("ImagePositionPatient", im.position),
                                    ("ImageOrientationPatient", im.orientation),
                                    ("PixelSpacing", im.spacing)) if v is None]
    if missing:
      raise DataError(im.path, f"no {' or '.join(missing)}; cannot place the slice in space")
  if len(series) < io.MIN_AXIS_VOXELS:
    raise DataError(folder, f"the series has {len(series)} image(s), expected a 3D volume of "
                    f"at least {io.MIN_AXIS_VOXELS} slices")


def _check_stack(folder: Path, series: list[_Image]) -> np.ndarray:
  """All images share one orientation, size and pixel spacing; returns the orientation (6,)."""
  keys = [(tuple(np.round(im.orientation, 3)), im.rows, im.columns,
           tuple(np.round(im.spacing, 4))) for im in series]
  # The majority is the stack; the odd image out is the one named.
  ref = series[keys.index(collections.Counter(keys).most_common(1)[0][0])]
  # Every image at once (np.allclose per image: ~30 ms for 133), then the first odd one named.
  same = (np.isclose(np.stack([im.orientation for im in series]), ref.orientation, rtol=1e-5,
                     atol=ORIENTATION_ATOL).all(axis=1)
          & np.isclose(np.stack([im.spacing for im in series]), ref.spacing, rtol=1e-4,
                       atol=1e-8).all(axis=1)
          & np.array([(im.rows, im.columns) == (ref.rows, ref.columns) for im in series]))
  for im in ([] if same.all() else [series[int(np.argmin(same))]]):
    if not np.allclose(im.orientation, ref.orientation, atol=ORIENTATION_ATOL):
      raise DataError(im.path, f"orientation {np.round(im.orientation, 4).tolist()} differs "
                      f"from the rest of the series ({np.round(ref.orientation, 4).tolist()}): a "
                      "scout image without ImageType LOCALIZER? Remove it from the folder")
    if (im.rows, im.columns) != (ref.rows, ref.columns) or not np.allclose(
        im.spacing, ref.spacing, rtol=1e-4):
      raise DataError(im.path, f"{im.rows}x{im.columns} pixels of {im.spacing} mm differ from "
                      f"the rest of the series ({ref.rows}x{ref.columns} of {ref.spacing} mm)")
  x, y = ref.orientation[:3], ref.orientation[3:]
  if not (abs(np.linalg.norm(x) - 1) < 1e-3 and abs(np.linalg.norm(y) - 1) < 1e-3
          and abs(x @ y) < 1e-3):
    raise DataError(ref.path, f"ImageOrientationPatient {ref.orientation.tolist()} is not two "
                    "orthogonal unit vectors")
  return np.concatenate([x / np.linalg.norm(x), y / np.linalg.norm(y)])


def _check_spacing(folder: Path, ims: list[_Image], d: np.ndarray) -> float:
  """Duplicates, gaps and uniformity of the sorted positions ``d`` (mm); returns the step."""
  steps = np.diff(d)
  names = lambda i: f"{ims[i].path.name} and {ims[i + 1].path.name}"
  dup = np.flatnonzero(steps <= DUPLICATE_ATOL_MM)
  if dup.size:
    i = int(dup[0])
    raise DataError(folder, f"duplicate slice position {d[i]:.3f} mm along the slice normal "
                    f"in {names(i)} ({dup.size} duplicate(s)): the series is stored twice or "
                    "mixes two acquisitions")
  median = float(np.median(steps))
  gaps = np.flatnonzero(steps > GAP_FACTOR * median)
  if gaps.size:
    i = int(gaps[0])
    n_missing = max(1, int(round(steps[i] / median)) - 1)
    raise DataError(folder, f"missing slices: a gap of {steps[i]:.4g} mm between {names(i)} "
                    f"(positions {d[i]:.2f} and {d[i + 1]:.2f} mm) where the spacing is "
                    f"{median:.4g} mm (about {n_missing} slice(s) missing)")
  step = float((d[-1] - d[0]) / (len(d) - 1))
  off = np.abs(d - (d[0] + step * np.arange(len(d))))
  if off.max() > UNIFORM_TOL * step:
    i = int(np.argmax(off))
    raise DataError(folder, f"non-uniform slice spacing ({steps.min():.4g} to "
                    f"{steps.max():.4g} mm; {ims[i].path.name} lies {off[i]:.3g} mm off a "
                    f"uniform grid of {step:.4g} mm); resample the series to uniform spacing")
  return step


def _check_tilt(folder: Path, ims: list[_Image], pos: np.ndarray, normal: np.ndarray,
                pixel_mm: float) -> None:
  """In-plane drift of the sorted slice positions ``pos`` [n, 3] must stay under half a pixel."""
  rel = pos - pos[0]
  drift = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1)
  if drift.max() > 0.5 * pixel_mm:
    angle = np.degrees(np.arctan2(drift[-1], rel[-1] @ normal))
    raise DataError(folder, f"gantry tilt: the slices shift {drift.max():.3g} mm in-plane along "
                    f"the stack (about {angle:.2f} degrees; GantryDetectorTilt "
                    f"{ims[0].tilt:g}); tilted series are not resampled here, correct the tilt "
                    "first (e.g. dcm2niix does)")


def _geometry(folder: Path, series: list[_Image]):
  """Sorts the slices along the normal; returns (sorted images, stored shape, RAS affine)."""
  orientation = _check_stack(folder, series)
  x, y = orientation[:3], orientation[3:]
  normal = np.cross(x, y)
  pos = np.stack([im.position for im in series])
  order = np.argsort(pos @ normal, kind="stable")
  ims, pos = [series[i] for i in order], pos[order]
  step = _check_spacing(folder, ims, pos @ normal)
  row_mm, col_mm = ims[0].spacing
  _check_tilt(folder, ims, pos, normal, min(row_mm, col_mm))
  rows = ims[0].rows
  lps = np.eye(4)
  lps[:3, 0] = x * col_mm  # i: along a row (column index).
  lps[:3, 1] = -y * row_mm  # j: rows reversed, as dcm2niix stores them.
  lps[:3, 2] = normal * step
  lps[:3, 3] = pos[0] + (rows - 1) * row_mm * y
  return ims, (ims[0].columns, rows, len(ims)), _LPS_TO_RAS @ lps


def _series(path, is_mask: bool, pixels: bool):
  """Scans, selects and checks a series; returns (sorted images, HeaderInfo)."""
  folder, uid = split_source(path)
  series = _select(folder, uid, _scan(folder, pixels))
  _check_images(folder, series, is_mask)
  ims, shape, affine = _geometry(folder, series)
  return ims, io.header_from_geometry(Path(path), shape, affine, ims[0].slope, ims[0].intercept)


def read_header(path: str | os.PathLike, *, is_mask: bool = False) -> io.HeaderInfo:
  """Reads and checks a series' headers (no pixel data).

  Args:
    path: a folder of one series, or ``folder#SeriesInstanceUID``.
    is_mask: accept any modality (a mask exported as DICOM), not only CT.

  Returns:
    io.HeaderInfo with the stored shape (columns, rows, slices) and dcm2niix's affine.

  Raises:
    DataError: for every rule in the module docstring except pixel decoding.
  """
  with _quiet():
    return _series(path, is_mask, pixels=False)[1]


def _pydicom_pixels(im: _Image) -> np.ndarray:
  """pydicom's decoding (pylibjpeg for JPEG); DataError names the file and transfer syntax."""
  try:
    return im.dataset.pixel_array
  except Exception as e:  # Decoders raise many types for damaged or unsupported data.
    ts = im.dataset.file_meta.get("TransferSyntaxUID", "?")
    name = getattr(ts, "name", str(ts))
    raise DataError(im.path, f"cannot decode the pixel data (transfer syntax {name}, "
                    f"{ts}): {io._short(e)}") from None


def _fast_pixels(im: _Image, decode) -> np.ndarray | None:
  """imagecodecs' lossless-JPEG decoding of an unsigned single frame; None where it does not
  apply or fails (pydicom's decoder then decodes, or names the problem)."""
  ds = im.dataset
  if (ds.file_meta.get("TransferSyntaxUID") not in FAST_SYNTAXES
      or int(ds.get("PixelRepresentation", 0)) != 0):
    return None
  try:
    return decode(next(generate_frames(ds.PixelData, number_of_frames=1)))
  except Exception:  # Any failure: the reference decoder decides.
    return None


def _fast_decoder():
  """imagecodecs' lossless-JPEG decoder when enabled and installed, else None.

  libjpeg-turbo's (``jpeg8_decode``; lossless JPEG of 2-16 bits since libjpeg-turbo 3.0,
  ``JPEG8.all_precisions``) where imagecodecs is built with it: 2x faster than
  ``ljpeg_decode`` (liblj92), which is used otherwise. Both give the same pixels (checked on
  the 133 slices of P002, and against pydicom on every series' first slice, ``_decode``).
  """
  if not USE_IMAGECODECS:
    return None
  try:
    import imagecodecs  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  jpeg8 = getattr(imagecodecs, "JPEG8", None)
  if (jpeg8 is not None and getattr(jpeg8, "available", False)
      and getattr(jpeg8, "all_precisions", False)):
    return imagecodecs.jpeg8_decode
  return imagecodecs.ljpeg_decode


def _decode(ims: list[_Image], rows: int, columns: int) -> np.ndarray:
  """Decodes and rescales every slice; returns [slices, rows, columns] float32, each slice
  with its rows and columns reversed.

  With imagecodecs installed, lossless JPEG is decoded by it (3-6x faster than libjpeg);
  its first slice is checked against pydicom's decoder, and any disagreement sends the whole
  series back to pydicom's decoder. The other slices are decoded by ``DECODE_THREADS``
  threads; a failure names the first failing slice in slice order.
  """
  out = np.empty((len(ims), rows, columns), np.float32)
  fast = _fast_decoder()
  start = 0
  if ims and fast is not None:
    pixels = _fast_pixels(ims[0], fast)
    if pixels is not None:
      reference = _pydicom_pixels(ims[0])
      if pixels.shape != reference.shape or not np.array_equal(pixels, reference):
        log.warning("%s: imagecodecs and pydicom decode %s differently; using pydicom",
                    ims[0].path.parent, ims[0].path.name)
        fast = None
      _store(out, 0, ims[0], reference)
      start = 1

  def one(k: int) -> None:
    pixels = None if fast is None else _fast_pixels(ims[k], fast)
    _store(out, k, ims[k], _pydicom_pixels(ims[k]) if pixels is None else pixels)

  todo = range(start, len(ims))
  if DECODE_THREADS > 1 and len(todo) > 1:
    with futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
      list(pool.map(one, todo))  # Re-raises the first failure in slice order.
  else:
    for k in todo:
      one(k)
  return out


def _store(out: np.ndarray, k: int, im: _Image, pixels: np.ndarray) -> None:
  """Slice k of ``out`` = ``pixels`` reversed (see read_volume), rescaled to HU."""
  rows, columns = out.shape[1:]
  if pixels.shape != (rows, columns):
    raise DataError(im.path, f"pixel data of shape {pixels.shape}, the header says "
                    f"{rows}x{columns}")
  # Reversed (see read_volume): axial scans need no reordering. ``io.scale_into`` fuses the
  # conversion with the rescale (8x faster than a reversed-stride assignment).
  io.scale_into(out[k], pixels[::-1, ::-1], im.slope, im.intercept)


def read_volume(path: str | os.PathLike, *, is_mask: bool = False) -> io.Volume:
  """Reads a DICOM series into the project's canonical layout (see ``io.read_volume``).

  Args:
    path: a folder of one series, or ``folder#SeriesInstanceUID``.
    is_mask: binarise the values and accept any modality.

  Returns:
    io.Volume: ``array`` [D, H, W] float32 in HU (or {0, 1}), RAS+ canonical;
    ``original_affine``/``original_shape`` are dcm2niix's stored geometry.

  Raises:
    DataError: for every rule in the module docstring, and undecodable pixel data.
  """
  with _quiet():
    ims, header = _series(path, is_mask, pixels=True)
    columns, rows, _ = header.shape
    data = _decode(ims, rows, columns)
  # data[k, a, b] = pixel (row R-1-a, column C-1-b) of slice k -> stored (i, j, k) = (column,
  # reversed row, slice) is a view. An axial scan's canonical RAS array is then ``data``
  # itself, so finish_volume makes no second copy (140 MB for a 512x512x133 scan).
  stored = data.transpose(2, 1, 0)[::-1, :, :]
  return io.finish_volume(Path(path), stored, header, is_mask=is_mask)
