"""The paper's preprocessing (Section IV-B), with the geometry to map results back.

Steps, every constant from ``config.data``:

1. Read the image (HU) and masks in canonical RAS+ ``[D, H, W]`` layout (``dsan_jax.data.io``).
2. Resample to ``target_spacing`` (x, y, z mm) and down-sample by ``scale_factor``, folded into
   ONE linear resampling straight to the final grid: the effective spacing is
   ``target_spacing / scale_factor`` (1.4336, 1.4336, 2.5 mm with the defaults). Resampling
   twice (to 0.7 mm, then by 1/2) costs a full-resolution pass and blurs twice; one
   trilinear pass from the original grid is both faster and closer to the original.
   The output grid has exactly the effective spacing, ``round(extent / spacing)`` voxels per
   axis, and is centred on the input (the physical extent is kept within half an output voxel).
3. If that grid is larger than ``target_shape`` on any axis, the spacing of ALL axes is
   multiplied by one common factor ``max(n / target)`` (never a distorting per-axis factor),
   so the whole field of view fits; the effective spacing is then recorded in the geometry.
4. Clip to ``hu_window`` and scale linearly to [0, 1] (-1350 HU -> 0, 150 HU -> 1).
5. Multiply by the lung mask (``apply_lung_mask``; the manifest's mask, or the classical
   fallback ``lung_mask.segment_lungs`` run on the resampled HU when ``lung_mask_fallback``).
6. Zero-pad, centred, to ``target_shape`` (the extra voxel of an odd margin goes after).

Masks are resampled linearly and thresholded at 0.5 (smoother than nearest neighbour).

The infection ratio is computed on the ORIGINAL voxel grid (no resampling error):
``r = |I| / |L u I|`` voxels, i.e. infection volume over lung volume in mm^3 (every voxel has
the same volume, so voxel counts are volume ratios). The union keeps r <= 1 and counts dense
consolidation that a threshold-based lung mask may exclude as lung.

Without an infection mask the ratio is ESTIMATED from the CT (``infection_ratio.estimate``, the
high-attenuation lung fraction on the output grid) and flagged ``ratio_source = "estimate"``.
``config.data.infection_ratio`` chooses: "mask_or_estimate" (default: the mask where there is
one, else the estimate), "estimate" (every case, also those with a mask: one kind of ratio for
all cases, so that whether a ratio is estimated cannot leak the label), "mask" (no estimate:
NaN without a mask).
"""

from __future__ import annotations

from concurrent import futures
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dsan_jax.data import infection_ratio as ratio_lib
from dsan_jax.data import io
from dsan_jax.errors import ConfigError, DataError

# The trilinear resampling's bands of output rows are shared among this many threads (the same
# result with any number). 1: in the calling thread.
RESAMPLE_THREADS = 2


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
  """The ``config.data`` fields that change the preprocessed output (defaults = the paper's).

  The defaults mirror configs/default.py (a test checks that they agree).
  """
  target_spacing: tuple[float, float, float] = (0.7168, 0.7168, 1.25)  # (x, y, z) mm.
  scale_factor: float = 0.5
  target_shape: tuple[int, int, int] = (138, 256, 256)  # (D, H, W).
  hu_window: tuple[float, float] = (-1350.0, 150.0)
  apply_lung_mask: bool = True
  mask_on_input_grid: bool = False  # See ``masked_image``.
  lung_mask_fallback: bool = True
  infection_ratio: str = "mask_or_estimate"  # See the module docstring.

  @classmethod
  def from_config(cls, config: Any = None) -> "PreprocessSettings":
    """From a full config (uses ``.data``), its ``data`` section, or None (the defaults)."""
    if config is None:
      return cls()
    data = config.data if hasattr(config, "data") else config
    s = cls(
        target_spacing=tuple(float(v) for v in data.target_spacing),
        scale_factor=float(data.scale_factor),
        target_shape=tuple(int(v) for v in data.target_shape),
        hu_window=tuple(float(v) for v in data.hu_window),
        apply_lung_mask=bool(data.apply_lung_mask),
        # Configs written before the option existed have no such field.
        mask_on_input_grid=bool(getattr(data, "mask_on_input_grid", False)),
        lung_mask_fallback=bool(data.lung_mask_fallback),
        # Configs written before the estimate existed have no such field.
        infection_ratio=str(getattr(data, "infection_ratio", cls.infection_ratio)),
    )
    s.validate()
    return s

  def validate(self) -> None:
    if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
      raise ConfigError(
          f"data.target_spacing must be 3 positive mm values, got {self.target_spacing}")
    if not 0 < self.scale_factor <= 4:
      raise ConfigError(f"data.scale_factor must be in (0, 4], got {self.scale_factor}")
    if len(self.target_shape) != 3 or min(self.target_shape) < 1:
      raise ConfigError(f"data.target_shape must be 3 positive sizes, got {self.target_shape}")
    if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
      raise ConfigError(f"data.hu_window must be (low, high) with low < high, got {self.hu_window}")
    if self.infection_ratio not in ratio_lib.MODES:
      raise ConfigError(f"data.infection_ratio must be one of {list(ratio_lib.MODES)}, got "
                        f"{self.infection_ratio!r}")

  @property
  def effective_spacing_zyx(self) -> np.ndarray:
    """Spacing of the final grid before any fit-to-target factor, (z, y, x) mm."""
    return np.asarray(self.target_spacing[::-1], np.float64) / self.scale_factor

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Everything needed to map a preprocessed [D, H, W] volume back onto the input grid.

  Attributes:
    original_shape: spatial shape of the input file as stored (i, j, k).
    original_affine: stored 4x4 affine of the input file.
    canonical_shape: [D, H, W] of the input after canonical reorientation.
    canonical_affine: affine of the canonical input (indexed x, y, z).
    input_spacing: (z, y, x) mm of the input.
    output_spacing: (z, y, x) mm of the preprocessed grid (effective spacing, times
      ``fit_factor`` when the volume had to shrink to fit).
    fit_factor: the common factor (>= 1) applied to fit ``target_shape``; 1 when it fitted.
    resampled_shape: [D, H, W] of the resampled volume before padding.
    pad_before: zero voxels added before the resampled volume on each axis.
    target_shape: final [D, H, W].
  """
  original_shape: tuple[int, int, int]
  original_affine: np.ndarray
  canonical_shape: tuple[int, int, int]
  canonical_affine: np.ndarray
  input_spacing: tuple[float, float, float]
  output_spacing: tuple[float, float, float]
  fit_factor: float
  resampled_shape: tuple[int, int, int]
  pad_before: tuple[int, int, int]
  target_shape: tuple[int, int, int]

  @property
  def step(self) -> np.ndarray:
    """Input voxels per output voxel, per axis (z, y, x)."""
    return np.asarray(self.output_spacing) / np.asarray(self.input_spacing)

  def target_to_canonical(self, coords_zyx: np.ndarray) -> np.ndarray:
    """Maps target-grid voxel coordinates [..., 3] (z, y, x) to canonical input voxel coords."""
    c_in = (np.asarray(self.canonical_shape) - 1) / 2
    c_out = (np.asarray(self.resampled_shape) - 1) / 2
    return c_in + (np.asarray(coords_zyx) - np.asarray(self.pad_before) - c_out) * self.step

  def target_affine(self) -> np.ndarray:
    """4x4 world affine of the preprocessed grid, indexed (x, y, z) = (W, H, D) like NIfTI.

    Save a preprocessed volume with ``nib.Nifti1Image(vol.transpose(2, 1, 0), affine)``.
    """
    step_xyz = self.step[::-1]
    offset_xyz = self.target_to_canonical(np.zeros(3))[::-1]
    vox = np.eye(4)
    vox[:3, :3] = np.diag(step_xyz)
    vox[:3, 3] = offset_xyz
    return self.canonical_affine @ vox


@dataclasses.dataclass
class Preprocessed:
  """One preprocessed case.

  Attributes:
    image: [D, H, W] float32 in [0, 1]: windowed CT times the lung mask, zero-padded (uint8
      ``round(255 x)`` when made with ``uint8_image``).
    lung_mask: [D, H, W] uint8 {0, 1} on the same grid.
    infection_mask: [D, H, W] uint8 {0, 1}, or None without an infection mask.
    ratio: the infection ratio used (``ratio_source`` says which): from the infection mask
      (on the original grid), or estimated; NaN when neither is available.
    geometry: mapping back to the input grid.
    lung_mask_source: "file", "fallback" or "none".
    ratio_source: "mask", "estimate" or "none" (``infection_ratio.SOURCE_*``).
    ratio_mask: the ratio from the infection mask (NaN without one).
    ratio_estimate: the estimate (NaN when not computed).
    ratio_per_slice: float64 [d] the estimate per slice of the resampled (unpadded) grid, or
      None when not computed.
    lung_ml: volume of the lung mask on the output grid, mL (NaN without a lung mask).
    ct: [D, H, W] float32 in [0, 1]: the windowed CT without the lung multiplication,
      zero-padded (for displays), or None unless asked for (``keep_ct``).
  """
  image: np.ndarray
  lung_mask: np.ndarray
  infection_mask: np.ndarray | None
  ratio: float
  geometry: Geometry
  lung_mask_source: str
  ratio_source: str = ratio_lib.SOURCE_NONE
  ratio_mask: float = float("nan")
  ratio_estimate: float = float("nan")
  ratio_per_slice: np.ndarray | None = None
  lung_ml: float = float("nan")
  ct: np.ndarray | None = None


def plan_geometry(volume: io.Volume, settings: PreprocessSettings) -> Geometry:
  """Chooses the output grid for ``volume`` (steps 2, 3 and 6 of the module docstring)."""
  in_shape = np.asarray(volume.array.shape)
  in_spacing = np.asarray(volume.spacing_zyx, np.float64)
  target = np.asarray(settings.target_shape)
  extent = in_shape * in_spacing
  spacing = settings.effective_spacing_zyx
  n = np.maximum(np.round(extent / spacing).astype(int), 1)
  fit = 1.0
  if np.any(n > target):
    fit = float(np.max(n / target))
    spacing = spacing * fit
    # Rounding may overshoot by one voxel; the extent then loses < 1 output voxel.
    n = np.minimum(np.maximum(np.round(extent / spacing).astype(int), 1), target)
  pad_before = (target - n) // 2
  return Geometry(
      original_shape=tuple(int(s) for s in volume.original_shape),
      original_affine=np.asarray(volume.original_affine),
      canonical_shape=tuple(int(s) for s in in_shape),
      canonical_affine=np.asarray(volume.affine),
      input_spacing=tuple(float(s) for s in in_spacing),
      output_spacing=tuple(float(s) for s in spacing),
      fit_factor=fit,
      resampled_shape=tuple(int(s) for s in n),
      pad_before=tuple(int(s) for s in pad_before),
      target_shape=tuple(int(s) for s in target),
  )


def resample_to_output(array: np.ndarray, geometry: Geometry, *, order: int = 1) -> np.ndarray:
  """Resamples a canonical [D, H, W] input-grid array to the (unpadded) output grid.

  Trilinear (``order=1``) runs as three 1D linear interpolations in float32, one axis after
  the other (the output axes are the input's: trilinear is separable), ~3x faster than
  ``ndimage.affine_transform`` and equal to it within float32 rounding (1.2e-4 HU on P002).
  Edges as ``mode="nearest"``; input and output centres aligned.

  Args:
    array: [D, H, W] on the canonical input grid.
    geometry: from ``plan_geometry``.
    order: spline order (1 = trilinear; others through ``ndimage.affine_transform``).

  Returns:
    [d, h, w] = ``geometry.resampled_shape`` float32.
  """
  step = geometry.step
  c_in = (np.asarray(geometry.canonical_shape) - 1) / 2
  c_out = (np.asarray(geometry.resampled_shape) - 1) / 2
  if order == 1:
    array = np.asarray(array, np.float32)
    n_out = geometry.resampled_shape
    pos = [np.clip(c_in[a] + step[a] * (np.arange(n_out[a]) - c_out[a]), 0,
                   array.shape[a] - 1) for a in range(3)]
    out = np.empty(n_out, np.float32)

    # A band of output rows at a time (x, then y, then z): the temporaries stay small (no
    # first-touch page faults of 20-60 MB arrays; 0.35 -> 0.1 s CPU on P002). The bands are
    # independent: ``RESAMPLE_THREADS`` threads share them (NumPy releases the GIL).
    def bands(starts):
      for y0 in starts:
        rows = pos[1][y0:y0 + 8]
        lo, hi = int(np.floor(rows[0])), min(int(np.floor(rows[-1])) + 2, array.shape[1])
        band = _lerp_axis(array[:, lo:hi], 2, pos[2])
        out[:, y0:y0 + 8] = _lerp_axis(_lerp_axis(band, 1, rows - lo), 0, pos[0])

    starts = list(range(0, n_out[1], 8))
    if RESAMPLE_THREADS > 1 and len(starts) > 1:
      with futures.ThreadPoolExecutor(RESAMPLE_THREADS) as pool:
        list(pool.map(bands, [starts[i::RESAMPLE_THREADS] for i in range(RESAMPLE_THREADS)]))
    else:
      bands(starts)
    return out
  # A diagonal matrix makes affine_transform use its fast separable path; centres are aligned.
  return ndimage.affine_transform(
      np.asarray(array, np.float32), step, offset=c_in - step * c_out,
      output_shape=geometry.resampled_shape, order=order, mode="nearest", prefilter=False)


def _lerp_axis(x: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
  """float32 ``x`` linearly interpolated along ``axis`` at positions ``pos`` [n] in [0, n - 1]."""
  n = x.shape[axis]
  i0 = np.minimum(np.floor(pos).astype(np.intp), max(n - 2, 0))
  i1 = np.minimum(i0 + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = pos.size
  w = (pos - i0).astype(np.float32).reshape(shape)
  lo = np.take(x, i0, axis=axis)
  hi = np.take(x, i1, axis=axis)
  hi -= lo
  hi *= w
  lo += hi
  return lo


def resample_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Binary mask -> output grid: linear interpolation, then >= 0.5. Returns uint8 [d, h, w]."""
  return (resample_to_output(mask.astype(np.float32), geometry) >= 0.5).astype(np.uint8)


def window(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
  """Clips to [low, high] HU and scales linearly to [0, 1]; float32, same shape."""
  lo, hi = hu_window
  out = np.clip(hu, lo, hi).astype(np.float32, copy=False)
  out -= np.float32(lo)
  out *= np.float32(1.0 / (hi - lo))
  return np.clip(out, 0.0, 1.0, out=out)


def to_uint8(image: np.ndarray, slab: int = 8) -> np.ndarray:
  """The cache's quantisation ``round(image * 255)`` as uint8, ``slab`` slices at a time.

  The same float32 operations as ``np.round(image * 255.0).astype(np.uint8)``, without its two
  full-size float32 temporaries (36 MB each for 138 x 256 x 256: every one a fresh memory map,
  whose first-touch page faults cost more than the arithmetic).

  Args:
    image: [D, H, W] float32 in [0, 1].

  Returns:
    uint8 [D, H, W].
  """
  out = np.empty(image.shape, np.uint8)
  for z in range(0, image.shape[0], slab):
    part = image[z:z + slab] * 255.0
    np.round(part, out=part)
    out[z:z + slab] = part
  return out


def pad_to_target(array: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Zero-pads a resampled [d, h, w] array to ``geometry.target_shape``, centred."""
  out = np.zeros(geometry.target_shape, array.dtype)
  sl = tuple(slice(b, b + n) for b, n in zip(geometry.pad_before, array.shape))
  out[sl] = array
  return out


def to_original_grid(volume_dhw: np.ndarray, geometry: Geometry, *, order: int = 1) -> np.ndarray:
  """Maps a volume on the preprocessed grid back onto the input file's voxel grid.

  ``volume_dhw`` may be the full ``target_shape`` or any coarser grid covering the same padded
  field of view (e.g. a class activation map at 1/16 resolution): voxel centres are placed
  proportionally. Save the result with ``io.write_nifti(path, out, geometry.original_affine)``.

  Args:
    volume_dhw: [d, h, w] array on the preprocessed (padded) grid, or a coarser version of it.
    geometry: from the preprocessing of that input.
    order: interpolation order (1 = linear, 0 = nearest for label maps).

  Returns:
    float32 array of ``geometry.original_shape``, indexed like the stored file.
  """
  canonical = to_canonical_grid(volume_dhw, geometry, order=order)
  return io.to_original_orientation(canonical, geometry.original_affine)


def to_canonical_grid(volume_dhw: np.ndarray, geometry: Geometry, *, order: int = 1) -> np.ndarray:
  """Like ``to_original_grid`` but stops at the canonical [D, H, W] input grid."""
  vol = np.asarray(volume_dhw, np.float32)
  if vol.ndim != 3:
    raise ValueError(f"expected a [D, H, W] volume, got shape {vol.shape}")
  target = np.asarray(geometry.target_shape, np.float64)
  scale = np.asarray(vol.shape) / target  # vol voxels per target voxel.
  # Canonical voxel j -> target coordinate t = (j - c_in) / step + c_out + pad, and target
  # coordinate t -> vol coordinate (t + 0.5) * scale - 0.5 (voxel centres, same field of view).
  step = geometry.step
  c_in = (np.asarray(geometry.canonical_shape) - 1) / 2
  c_out = (np.asarray(geometry.resampled_shape) - 1) / 2
  t0 = -c_in / step + c_out + np.asarray(geometry.pad_before)
  return ndimage.affine_transform(
      vol, scale / step, offset=(t0 + 0.5) * scale - 0.5, output_shape=geometry.canonical_shape,
      # "nearest": a coarse map covers the whole padded field of view; its outer half voxel
      # must not fade to zero.
      order=order, mode="nearest", prefilter=False)


def infection_ratio(lung: np.ndarray, infection: np.ndarray) -> float:
  """r = |I| / |L u I| from binary masks on one grid (volume ratio; see module docstring)."""
  inf = np.count_nonzero(infection)
  denom = np.count_nonzero(np.logical_or(lung, infection))
  return float(inf / denom) if denom else float("nan")


def _read_mask_like(path: Path, image: io.Volume, what: str) -> np.ndarray:
  mask = io.read_volume(path, is_mask=True)
  if not io.same_grid(mask.original_shape, mask.original_affine,
                      image.original_shape, image.original_affine):
    # Masks stored in another orientation of the same grid are accepted after reorientation.
    if not io.same_grid(mask.array.shape, mask.affine, image.array.shape, image.affine):
      raise DataError(
          path, f"{what} grid (shape {mask.original_shape}) does not match its image "
          f"{image.path.name} (shape {image.original_shape}) in shape or affine")
  return mask.array


def load_and_preprocess(image_path: str | os.PathLike,
                        lung_mask_path: str | os.PathLike | None = None,
                        infection_mask_path: str | os.PathLike | None = None,
                        config: Any = None, *, keep_ct: bool = False,
                        uint8_image: bool = False) -> Preprocessed:
  """Reads one CT (and its masks) and applies the paper's preprocessing.

  Args:
    image_path: CT in HU: NIfTI, or a DICOM series (see ``dsan_jax.data.dicom``).
    lung_mask_path: lung mask on the same grid, or None (classical fallback when
      ``config.data.lung_mask_fallback``, else no masking).
    infection_mask_path: infection mask on the same grid, or None.
    config: full config, its ``data`` section, or None for the paper's defaults.
    keep_ct: also return the windowed CT without the lung multiplication (``Preprocessed.ct``).
    uint8_image: return the image quantised as the cache stores it (``to_uint8``; before the
      padding: the same bytes, a quarter of the padded float32 array's memory).

  Returns:
    Preprocessed (image [D, H, W] float32 in [0, 1], or uint8 with ``uint8_image``; masks
    uint8, ratio and its source, geometry).

  Raises:
    DataError: unreadable or invalid inputs, mismatched masks, empty lung mask, a ratio
      estimate asked for with an implausibly small lung mask.
  """
  settings = PreprocessSettings.from_config(config)
  image = io.read_volume(image_path)
  lung_full = inf_full = None
  if lung_mask_path is not None:
    lung_full = _read_mask_like(Path(lung_mask_path), image, "lung mask")
    if not lung_full.any():
      raise DataError(lung_mask_path, "lung mask is empty")
  if infection_mask_path is not None:
    inf_full = _read_mask_like(Path(infection_mask_path), image, "infection mask")
  return preprocess_volume(image, settings, lung_full, inf_full, lung_mask_path,
                           keep_ct=keep_ct, uint8_image=uint8_image)


def _output_lung(hu: np.ndarray, geometry: Geometry, lung_full: np.ndarray | None,
                 settings: PreprocessSettings, image_path, lung_mask_path):
  """The lung mask on the output grid: (uint8 [d, h, w], source "file"/"fallback"/"none")."""
  if lung_full is not None:
    lung = resample_mask(lung_full, geometry)
    if not lung.any():
      raise DataError(lung_mask_path, "lung mask vanishes after resampling (fewer voxels than "
                      "one output voxel)")
    return lung, "file"
  if settings.lung_mask_fallback:
    from dsan_jax.data import lung_mask as lung_mask_lib  # Only needed for the fallback.
    # Segmenting on the resampled grid is ~7x cheaper than at full resolution and gives
    # the mask on the grid the network sees.
    lung = lung_mask_lib.segment_lungs(hu, geometry.output_spacing)
    if not lung.any():
      raise DataError(image_path, "the lung-mask fallback found no lungs; provide a lung mask")
    return lung, "fallback"
  return np.ones(geometry.resampled_shape, np.uint8), "none"


def masked_image(canonical_hu: np.ndarray, hu: np.ndarray, lung: np.ndarray,
                 lung_full: np.ndarray | None, geometry: Geometry,
                 settings: PreprocessSettings) -> np.ndarray:
  """The windowed CT times the lung mask on the output grid (steps 4-5; not yet padded).

  The paper masks "the original CT image with the corresponding lung mask" (Section III) and
  resamples (Section IV-B) without saying which comes first; at its ~1.4 mm voxels the order
  hardly matters. At the CPU configs' ~5 mm it does: resampled first (``mask_on_input_grid``
  False, the default), the lung mask's outer voxel layer interpolates the chest wall and the
  mediastinum into the lung (partial volume: bright, like a lesion); masked first (True, with a
  lung mask file on the input grid), it interpolates the lung with the zeros outside it (darker
  than the lung). Masking first costs a windowing and a resampling of the whole input (+0.9 to
  1.5 s for P002's 512 x 512 x 133), which is why the paper-sized default resamples first.
  Both results are zero outside the output-grid lung mask, and masked-first is never brighter
  (linear weights >= 0).

  Args:
    canonical_hu: [D, H, W] HU on the canonical input grid.
    hu: [d, h, w] the same resampled to the output grid.
    lung: [d, h, w] uint8 lung mask on the output grid.
    lung_full: [D, H, W] {0, 1} lung mask from a file on the input grid, or None (then the
      image is resampled first: the fallback's mask is made on the output grid, and mapped
      back to the input grid it would add only that round trip's error, not a finer
      boundary).
    geometry, settings: as in ``preprocess_volume``.

  Returns:
    [d, h, w] float32 in [0, 1].
  """
  if not settings.apply_lung_mask:
    return window(hu, settings.hu_window)
  if not settings.mask_on_input_grid or lung_full is None:
    return window(hu, settings.hu_window) * lung
  native = window(canonical_hu, settings.hu_window)
  native *= lung_full
  return resample_to_output(native, geometry) * lung


def preprocess_volume(image: io.Volume, settings: PreprocessSettings,
                      lung_full: np.ndarray | None = None, inf_full: np.ndarray | None = None,
                      lung_mask_path=None, *, keep_ct: bool = False,
                      uint8_image: bool = False) -> Preprocessed:
  """``load_and_preprocess`` on volumes in memory (canonical [D, H, W] masks on its grid).

  Args:
    image: the CT (``io.read_volume``).
    settings: preprocessing settings.
    lung_full, inf_full: {0, 1} [D, H, W] masks on the image's canonical grid, or None.
    lung_mask_path: the lung mask's file, named in errors.
    keep_ct: also return ``Preprocessed.ct``.
    uint8_image: see ``load_and_preprocess``.

  Returns:
    Preprocessed.
  """
  geometry = plan_geometry(image, settings)
  lung_file = lung_full  # Below, a fallback mask may stand in for it when computing the ratio.
  hu = resample_to_output(image.array, geometry)
  lung, source = _output_lung(hu, geometry, lung_full, settings, image.path, lung_mask_path)
  infection = None
  ratio_mask = float("nan")
  if inf_full is not None:
    infection = pad_to_target(resample_mask(inf_full, geometry), geometry)
    if lung_full is None and source == "fallback":
      lung_full = to_canonical_grid(pad_to_target(lung.astype(np.float32), geometry),
                                    geometry) >= 0.5
    if lung_full is not None:
      ratio_mask = infection_ratio(lung_full, inf_full)
  est = None
  mode = settings.infection_ratio
  if source != "none" and (mode == "estimate" or (mode == "mask_or_estimate"
                                                  and not np.isfinite(ratio_mask))):
    est = ratio_lib.estimate(hu, lung, geometry.output_spacing,
                             path=lung_mask_path if lung_mask_path is not None else image.path,
                             fov_x_mm=image.array.shape[2] * image.spacing_zyx[2])
  if est is not None:
    ratio, ratio_source = est.ratio, ratio_lib.SOURCE_ESTIMATE
  elif np.isfinite(ratio_mask):
    ratio, ratio_source = ratio_mask, ratio_lib.SOURCE_MASK
  else:
    ratio, ratio_source = float("nan"), ratio_lib.SOURCE_NONE
  img = masked_image(image.array, hu, lung, lung_file, geometry, settings)
  voxel_ml = float(np.prod(geometry.output_spacing)) / 1000.0
  return Preprocessed(
      image=pad_to_target(to_uint8(img) if uint8_image else img, geometry),
      lung_mask=pad_to_target(lung, geometry),
      infection_mask=infection, ratio=ratio, geometry=geometry, lung_mask_source=source,
      ratio_source=ratio_source, ratio_mask=ratio_mask,
      ratio_estimate=est.ratio if est is not None else float("nan"),
      ratio_per_slice=est.per_slice if est is not None else None,
      lung_ml=float(np.count_nonzero(lung)) * voxel_ml if source != "none" else float("nan"),
      ct=pad_to_target(window(hu, settings.hu_window), geometry) if keep_ct else None)
