"""Infection-ratio estimate for scans without an infection mask (a classical estimate).

The size-balanced sampler, the ensemble weight and Table III all need r = |I| / |L u I|. The
paper took I from a deep segmentation toolkit (VB-Net); without one, this module estimates r
as the **high-attenuation lung fraction** (the quantity of the "high attenuation area"
literature, e.g. Podolanczuk et al., and the "poorly/non-aerated lung" of quantitative COVID-19
CT): the fraction of lung voxels whose HU lies in a ground-glass-to-consolidation range, after
thin bright structures are removed:

1. Candidates: lung voxels in ``GGO_HU`` (-700 to -250 HU, ground glass; aerated lung is
   about -850) and in ``DENSE_HU`` (-250 to 100 HU, consolidation, but also vessels and airway
   walls, which have the same HU).
2. Vessels, airway walls and the partial-volume rim at the pleura are thin: a morphological
   opening removes every structure narrower than about twice its element's radius. Ground
   glass: a disk of ``GGO_RADIUS_MM`` (3 mm; 2 px on the network's grid) spanning
   ``GGO_Z_HALF_MM`` above and below (3 slices at 2.5 mm), so that the partial-volume halo of
   vessels goes whether the vessel runs across the slices (thin in-plane) or within one slice
   (one slice thick). Dense range: an in-plane disk of ``DENSE_RADIUS_MM`` (4 mm; vessels up
   to about 8 mm across go; a consolidation is larger).
3. r_est = |opened candidates| / |lung|; per slice the same fraction (``per_slice``).

The ranges and radii were chosen on 16 phantoms of seed 0 (of the issue-12 testbed:
the ground glass's element, 1.5 mm in-plane before, was enlarged there, cutting the
false-positive fraction of the true lung from 7.2 % to 3.5 %), looking at the real scans'
slice labels for three candidate elements; benchmarks/validate_ratio_estimate.py prints the
figures on other seeds.

It is an ESTIMATE, flagged as such wherever it is used (``ratio_source == "estimate"``): it
cannot replace a segmentation. It counts every dense lung region (atelectasis, dependent
density in a shallow breath, fibrosis, large hilar vessels, the diaphragm's partial volume) as
infection and misses lesions thinner than the opening. docs/data.md ("Infection-ratio estimate")
gives its validation and when to trust it.

``estimate(hu, lung, spacing_zyx, path)`` works on any grid; the preprocessing calls it on the
network's grid (1.43 x 1.43 x 2.5 mm), where the fallback lung mask lives.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dsan_jax.data import morphology
from dsan_jax.errors import DataError

GGO_HU = (-700.0, -250.0)  # [low, high): ground glass.
DENSE_HU = (-250.0, 100.0)  # [low, high): consolidation (and vessels, airway walls).
GGO_RADIUS_MM = 3.0  # In-plane radius of the ground glass's opening ...
GGO_Z_HALF_MM = 2.5  # ... which also spans this far above and below (3 slices at 2.5 mm).
DENSE_RADIUS_MM = 4.0  # The dense range's opening is in-plane only.
MIN_LUNG_ML = 300.0  # Below this an adult chest CT's lung mask is implausible (scaled, below).
MIN_LUNG_VOXELS = 50  # Fewer voxels give no meaningful fraction at any size.
REFERENCE_FOV_MM = 300.0  # As in lung_mask: a smaller field of view scales lengths down.

#: Values of ``ratio_source`` (cache metadata, manifests, predictions, reports).
SOURCE_MASK = "mask"  # r = |I| / |L u I| from an infection mask.
SOURCE_ESTIMATE = "estimate"  # This module.
SOURCE_MANIFEST = "manifest"  # Given in the manifest's infection_ratio column.
SOURCE_NONE = "none"  # Unknown (NaN).
#: ``config.data.infection_ratio`` modes.
MODES = ("mask_or_estimate", "estimate", "mask")


@dataclasses.dataclass(frozen=True)
class Estimate:
  """An infection-ratio estimate.

  Attributes:
    ratio: estimated r in [0, 1].
    per_slice: float64 [D] the same fraction per axial slice (NaN where a slice has no lung).
    lung_ml: lung volume of the mask used, mL.
    dense_ml: volume counted as infection, mL.
    dense: bool [D, H, W] the voxels counted as infection.
  """
  ratio: float
  per_slice: np.ndarray
  lung_ml: float
  dense_ml: float
  dense: np.ndarray


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
  """The bounding box of ``mask`` [D, H, W], grown in-plane by ``margin`` voxels (clipped)."""
  zs, ys, xs = (np.nonzero(mask.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
  return (slice(int(zs[0]), int(zs[-1]) + 1),
          slice(max(int(ys[0]) - margin, 0), int(ys[-1]) + 1 + margin),
          slice(max(int(xs[0]) - margin, 0), int(xs[-1]) + 1 + margin))


def check_lung(lung: np.ndarray, spacing_zyx, path: str | os.PathLike | None,
               fov_x_mm: float | None = None) -> float:
  """Refuses a lung mask too small to estimate from; returns its volume in mL.

  Args:
    lung: [D, H, W] lung mask.
    spacing_zyx: (z, y, x) mm.
    path: the scan, named in the error.
    fov_x_mm: field of view across (x); None -> the mask's own width ``W * spacing_x``.

  Raises:
    DataError: empty mask, or fewer than ``MIN_LUNG_VOXELS`` voxels or ``MIN_LUNG_ML`` mL
      (scaled by (field of view / 300 mm)^3 for phantoms and small children).
  """
  spacing = np.asarray(spacing_zyx, np.float64)
  n = int(np.count_nonzero(lung))
  name = path if path is not None else "<array>"
  if n == 0:
    raise DataError(name, "lung mask is empty: cannot estimate the infection ratio "
                    "(provide a lung mask, an infection mask or the ratio in the manifest)")
  ml = n * float(np.prod(spacing)) / 1000.0
  fov = fov_x_mm if fov_x_mm is not None else lung.shape[2] * spacing[2]
  scale = float(min(1.0, fov / REFERENCE_FOV_MM))
  min_ml = MIN_LUNG_ML * scale ** 3
  if n < MIN_LUNG_VOXELS or ml < min_ml:
    raise DataError(name, f"lung mask is implausibly small ({ml:.1f} mL, {n} voxels; need "
                    f">= {min_ml:.0f} mL and >= {MIN_LUNG_VOXELS} voxels for a "
                    f"{fov:.0f} mm field of view): cannot estimate the infection ratio "
                    "(provide a lung mask, an infection mask or the ratio in the manifest)")
  return ml


def estimate(hu: np.ndarray, lung: np.ndarray, spacing_zyx,
             path: str | os.PathLike | None = None,
             fov_x_mm: float | None = None) -> Estimate:
  """Estimates the infection ratio from the CT alone (see the module docstring).

  Args:
    hu: [D, H, W] CT in HU (canonical RAS+).
    lung: [D, H, W] lung mask on the same grid (e.g. the lung-mask fallback's).
    spacing_zyx: (z, y, x) mm.
    path: the scan's file, named in errors.
    fov_x_mm: field of view across, for the plausibility check (None: the array's width).

  Returns:
    Estimate (ratio, per-slice fractions [D], volumes, dense-voxel mask [D, H, W]).

  Raises:
    DataError: empty or implausibly small lung mask (``check_lung``).
  """
  hu = np.asarray(hu)
  lung = np.asarray(lung).astype(bool, copy=False)
  if hu.shape != lung.shape or hu.ndim != 3:
    raise ValueError(f"hu {hu.shape} and lung {lung.shape} must be equal [D, H, W] shapes")
  spacing = np.asarray(spacing_zyx, np.float64)
  lung_ml = check_lung(lung, spacing, path, fov_x_mm)
  in_plane = float(min(spacing[1], spacing[2]))
  dense = np.zeros(lung.shape, bool)
  # The openings only see the lung: cropped to its bounding box plus a margin of twice the
  # largest radius (erosion then dilation), they give the same voxels at a third of the cost.
  radii = [max(1, int(round(r / in_plane))) for r in (GGO_RADIUS_MM, DENSE_RADIUS_MM)]
  box = _box(lung, 2 * max(radii) + 1)
  hu_box, lung_box, dense_box = hu[box], lung[box], dense[box]
  z_half = (int(round(GGO_Z_HALF_MM / float(spacing[0]))), 0)
  for (lo, hi), radius_px, zh in zip((GGO_HU, DENSE_HU), radii, z_half):
    part = lung_box & (hu_box >= lo) & (hu_box < hi)
    if part.any():
      # Outside the box there is no lung: the box's own zero border gives the same opening.
      # ``morphology.disk_opening``: ndimage's binary_opening with this disk, voxel for voxel.
      dense_box |= morphology.disk_opening(part, radius_px, zh)
  n_lung = lung.sum(axis=(1, 2)).astype(np.float64)
  n_dense = dense.sum(axis=(1, 2)).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_slice = np.where(n_lung > 0, n_dense / n_lung, np.nan)
  voxel_ml = float(np.prod(spacing)) / 1000.0
  return Estimate(ratio=float(n_dense.sum() / n_lung.sum()), per_slice=per_slice,
                  lung_ml=lung_ml, dense_ml=float(n_dense.sum()) * voxel_ml, dense=dense)


def describe_source(source: str) -> str:
  """One phrase for people: where a ratio came from."""
  return {
      SOURCE_MASK: "from the infection mask",
      SOURCE_ESTIMATE: "ESTIMATED from the CT (high-attenuation lung fraction, not a "
                       "segmentation; see docs/data.md)",
      SOURCE_MANIFEST: "given in the manifest",
      SOURCE_NONE: "unknown",
  }.get(source, source)
