"""Classical lung segmentation, the fallback for scans without a lung mask.

``segment_lungs(hu, spacing_zyx)`` on a canonical (RAS+) [D, H, W] CT in HU:

1. Work on a grid no finer than ``WORK_SPACING_MM`` (resampled linearly when the input is
   clearly finer); the mask is mapped back to the input grid at the end, each lung on its
   own so that the cut between them survives. On the preprocessing grid (1.43 x 1.43 x 2.5
   mm) nothing is resampled. Steps 2-7 then run on a grid 2x coarser in-plane (2x2 block
   means of the HU) wherever that grid is no coarser than ``COARSE_SPACING_MM`` (the
   preprocessing grid of an adult chest: 2.87 mm), 4x fewer voxels; step 8 redraws the
   boundary on the finer grid.
2. Body: the largest 3D component of ``hu >= threshold`` (soft tissue and bone), holes filled
   slice by slice. Air outside the body (and the table) is thereby excluded, even where the
   trachea or a lung touches the top or bottom slice.
3. Candidates: ``hu < threshold`` inside the body (lungs, airways, bowel gas, oesophagus),
   components under ``MIN_COMPONENT_ML`` dropped. The largest component is kept, and a
   second one when it is a plausible second lung (>= ``SECOND_LUNG_FRACTION`` of the first,
   or smaller but on the other side of the midline and reaching the upper half of the first
   lung; bowel gas lies below the lungs and fails both).
4. Airways: voxels deeper than ``CORE_RADIUS_MM`` form "cores"; the main bronchi are
   narrower than twice that radius, so the trachea's core is separate from the lungs'. Every
   voxel joins its nearest core; cells that are small (< ``AIRWAY_MAX_FRACTION`` of the air
   volume) and centred on the midline (within ``CENTRAL_FRACTION`` of the body width) are the
   trachea and carina and are removed. Thin lung edges with no core stay with their lung; the
   main bronchi inside the hila stay too (by design: they are lung-side of the cut).
5. A light closing and slice-wise hole filling bring vessels and small nodules inside.
6. Lungs still joined (the ~1 mm anterior junction line vanishes at 1.5 mm) are cut apart at
   the boundary between the Voronoi cells of their two deepest cores.
7. Juxtapleural consolidation (``fill_pleural_bays``): dense lesions touching the chest wall
   are above the threshold and are not holes of the slice; they leave a "bay" in the lung's
   costal contour. First, along every craniocaudal line, the gaps of one lung no longer than
   ``Z_GAP_MAX_MM`` are filled (a consolidation at a slice's outermost extent still has
   aerated lung above and below it; the liver and spleen under a dome have none below).
   Then, per axial slice and per piece of each lung in it, the convex hull of the piece is
   compared with the piece; each bay (hull minus lung, inside the body, below ``BAY_MAX_HU``, not the other
   lung) is added when it opens towards the chest wall: its chord (the bay's pixels on the
   hull's edge) lies within ``WALL_DEPTH_FRACTION`` of the slice's largest depth below the
   body's surface and, on average, shallower than the bay itself; the bay does not cross the
   body's midline; and it is thicker than ``BAY_MIN_DEPTH_MM`` (rib impressions and
   partial-volume rims are thinner).
   An accepted bay then grows past its chord (at most ``BAY_MAX_GROWTH_MM``) into tissue
   deeper below the body's surface than the pleura at the chord's ends (by one pixel): the
   part of the consolidation at the lung's outermost extent, which no chord covers.
   Bays whose chord runs deep into the body are the mediastinum, the heart's notch, the hila
   and the liver or spleen under a diaphragm dome: they stay out. The slices are independent
   and shared among ``BAY_THREADS`` threads (the same mask with any number).
7b. Dependent consolidation against the rib cage (``fill_pleural_cavity``, after step 7 on the
   same grid; ``segment_lungs(..., pleural_cavity=...)``, default ``PLEURAL_CAVITY_DEFAULT``):
   a consolidated posterior half of a lung leaves no bay (the aerated rest is convex), but the
   lung's physical boundary is still there. Per lung, a voxel of tissue (below ``BAY_MAX_HU``)
   is added when it lies on a straight posterior run whose anterior end is the lung and whose
   posterior end is the rib cage: bone over +-``CAVITY_RIB_Z_MM`` in z (the intercostal gaps),
   no deeper below the body's surface than ``WALL_DEPTH_FRACTION`` of the slice's largest depth
   (not the vertebral body, nor a contrast-filled or calcified vessel in the mediastinum).
   It must also be: farther than ``CAVITY_SPINE_MM`` from the body's midline and lateral of
   the lung's medial edge (the ``CAVITY_MEDIAL_PERCENTILE``-th percentile over the slice's
   rows, plus a pixel: the mediastinum); at least as far from the rib cage (in-plane pixels)
   as the lung's own boundary near the wall is in that slice (the chest wall's lining,
   *measured* where the lung is aerated: its median, the lung's median over all slices where
   a slice has fewer than ``CAVITY_MIN_PIXELS``); not in a strip one pixel wide (a 3x3
   opening); on or above the lung's floor (``lung_floor``: the diaphragm continued under the
   consolidation, a quadratic lower envelope of the lowest slice of each column: the liver and
   spleen under a dome stay out); and, from the apex down, under the slice above's lung and
   additions grown by one pixel, in a slice where at least ``CAVITY_TOUCH_FRACTION`` of the
   lung's boundary touches the wall (the apices taper away from the chest wall inside the soft
   tissue of the cavity's top). Below the fitted floor (``floor_under_consolidation``), in a
   column whose lowest aerated slice lies more than ``FLOOR_TOLERANCE`` slices above the fit
   (it ends on consolidation, not on the diaphragm), the same candidates are added down to the
   lowest trusted column's floor anterior of it in its sagittal line (the diaphragm descends
   posteriorly), but only as unbroken columns hanging from the aerated lung (each voxel
   directly under the lung or a voxel taken; no in-plane growth, which would creep under the
   heart's and the domes' edges), without one-pixel strips. Voxels touching the other lung are
   dropped.
8. Boundary on the finer grid (``_refine``, only after the coarse grid of step 1): each
   coarse voxel becomes its 2x2 fine voxels; fine tissue voxels on the mask's rim inside a
   coarse voxel of air (the chest wall's share of a partial-volume voxel) are dropped; fine
   air voxels beside the mask are added, and one fine voxel (below ``BAY_MAX_HU``) beside
   the mask's tissue (consolidation and vessels: the rim the coarse grid rounded off);
   added voxels touching the other lung are dropped. The closing of step 5 keeps its length
   in mm (``_closing_element``): 2x longer in-plane, it would bridge the mediastinum.

Every length and volume above is for an adult chest; for a field of view narrower than
``REFERENCE_FOV_MM`` (phantoms, small children) they shrink with it (except
``BAY_MAX_GROWTH_MM``). The depths and nearest cores of steps 4 and 6 are computed on a 2x
coarser in-plane grid where that grid still resolves the cores (``_coarse_factor``: grids
of 1.5 mm and finer when the coarse grid of step 1 is not used); step 6 reuses step 4's
depths. Steps 4-6 run inside the candidates' bounding box plus one voxel (the same depths and
cells as on the whole grid), step 7 inside that box grown in-plane by a quarter of its size.
Distance maps and the morphology of step 8 use ``dsan_jax.data.morphology`` (ndimage's
results, voxel for voxel, in less time).

Known limitations: a consolidation that lines the whole costal contour of a slice (no bay,
the remaining aerated lung is itself convex) and consolidation on the mediastinal side of a
lung (its chord runs deep) stay out of step 7; step 7b takes in the posterior (dependent) part
of the former, not anterior or lateral consolidation without a bay, not consolidation under
the continued floor (consolidation under a flat aerated bottom that continues the lung's
bottom on the liver is indistinguishable from the liver by shape), nor a region whose slice
above has neither lung nor additions there; it can take in part of the heart where an aerated
lingula lies in front of it and a consolidated lower lobe behind it (a posterior run crosses
the heart; measured on one phantom: 18 mL), and a few mL of the tissue under a consolidation
whose floor lies above the lowest trusted floor in front of it (one phantom: 8 mL).
docs/data.md gives the measured figures ("Juxtapleural consolidation (issue 14)"), including
an earlier thoracic-cavity prototype without the measured lining, the floor and the rib-cage
depth test, which was not adopted.
"""

from __future__ import annotations

from concurrent import futures
import sys
import time
from typing import Sequence

from absl import flags
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from dsan_jax import cli_flags
from dsan_jax.data import io
from dsan_jax.data import morphology
from dsan_jax.errors import DsanError

THRESHOLD_HU = -320.0
WORK_SPACING_MM = (2.5, 1.5, 1.5)  # (z, y, x)
MIN_COMPONENT_ML = 5.0
CORE_RADIUS_MM = 6.0
SECOND_LUNG_FRACTION = 0.2
MIN_SECOND_LUNG_FRACTION = 0.02
CENTRAL_FRACTION = 0.1  # Airway cells: centroid within this fraction of the body width ...
AIRWAY_MAX_FRACTION = 0.05  # ... of the midline, and under this fraction of the air volume.
REFERENCE_FOV_MM = 300.0  # Lengths above are for an adult chest; smaller fields scale them.
BAY_MIN_DEPTH_MM = 3.0  # Bays of the pleural contour need an inscribed disk of this radius.
Z_GAP_MAX_MM = 60.0  # Craniocaudal gaps of a lung up to this length are filled (step 7).
BAY_MAX_HU = 200.0  # Bays take no bone.
# A bay's chord must lie within this fraction of the slice's largest depth below the body's
# surface: the costal pleura lies 30-60 mm deep in an adult (about 0.25-0.5 of the largest
# depth, measured on P002 and cap002), the mediastinal pleura and the medial end of a dome's
# chord 75-110 mm (0.65-0.9).
WALL_DEPTH_FRACTION = 0.55
BAY_MAX_GROWTH_MM = 9.0  # A bay grows at most this far past its chord (step 7).
COARSE_SPACING_MM = 3.0  # Steps 2-7 run on an in-plane grid up to this coarse (step 8).
# Step 7b (``fill_pleural_cavity``, optional): the rib cage is the bone over this many mm up and
# down (a slice between two ribs sees them); in-plane distances to it are counted up to
# CAVITY_MAX_STEPS pixels; posterior runs start this far from the midline (the vertebral body's
# half-width in an adult); a slice's lining needs CAVITY_MIN_PIXELS boundary pixels near the
# wall; a slice adds only when CAVITY_TOUCH_FRACTION of its lung's boundary touches the wall;
# the medial limit is this percentile of the rows' medial edges.
PLEURAL_CAVITY_DEFAULT = True  # Step 7b in segment_lungs when not asked (docs/data.md).
CAVITY_RIB_Z_MM = 10.0
CAVITY_MAX_STEPS = 5
CAVITY_SPINE_MM = 25.0
CAVITY_MIN_PIXELS = 5
CAVITY_TOUCH_FRACTION = 0.1
CAVITY_MEDIAL_PERCENTILE = 25.0
# Slices above the fitted floor (``lung_floor``) a column's lowest lung slice may lie and still be
# taken as lying on the diaphragm (``floor_under_consolidation``).
FLOOR_TOLERANCE = 2
# Step 7's slices are shared among this many threads (NumPy, qhull and part of ndimage release
# the GIL; the result does not depend on it). 1: in the calling thread.
BAY_THREADS = 2

_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def _resample(array: np.ndarray, out_shape, order: int = 1) -> np.ndarray:
  """Centre-aligned linear resampling of [D, H, W] to out_shape (same field of view)."""
  in_shape = np.asarray(array.shape, np.float64)
  out = np.asarray(out_shape, np.float64)
  step = in_shape / out
  offset = (step - 1) / 2
  return ndimage.affine_transform(array.astype(np.float32), step, offset=offset,
                                  output_shape=tuple(int(s) for s in out_shape), order=order,
                                  mode="nearest", prefilter=False)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
  """Fills holes in every axial slice (in-plane connectivity only). bool [D, H, W].

  Same result as ``ndimage.binary_fill_holes(mask, structure=_INPLANE)``: a hole is a
  background component (4-connected in its slice) that does not reach the slice's edge. One
  labelling pass instead of the iterated dilation, which takes as many passes as the widest
  region is across.
  """
  mask = np.asarray(mask, bool)
  labels, _ = ndimage.label(~mask, structure=_INPLANE)
  outside = np.zeros(int(labels.max()) + 1, bool)
  for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
    outside[edge] = True
  outside[0] = True  # Label 0: the mask itself.
  return mask | ~outside[labels]


def _largest_component(mask: np.ndarray) -> np.ndarray:
  labels, n = ndimage.label(mask)
  if n == 0:
    return mask
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels == int(np.argmax(sizes))


def _segment(hu: np.ndarray, spacing: np.ndarray, threshold: float, scale: float,
             pleural_bays: bool = True, inplane_factor: int = 1,
             pleural_cavity: bool = False) -> np.ndarray:
  voxel_ml = float(np.prod(spacing)) / 1000.0
  min_ml = MIN_COMPONENT_ML * scale ** 3
  tissue = hu >= threshold
  if not tissue.any():
    return np.zeros(hu.shape, bool)
  body = fill_holes_per_slice(_largest_component(tissue))
  candidates = body & ~tissue
  labels, n = ndimage.label(candidates)
  if n == 0:
    return np.zeros(hu.shape, bool)
  sizes = np.bincount(labels.ravel()) * voxel_ml
  keep = sizes >= min_ml
  keep[0] = False
  candidates = keep[labels]
  if not candidates.any():
    return candidates
  # Steps 4-6 happen inside the candidates' bounding box (+1 voxel of background: the same
  # depths, cores, cells and closing as on the whole grid), 2-3x fewer voxels.
  tight = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2)
                for i in np.nonzero(candidates))
  body_x = np.nonzero(body.any(axis=(0, 1)))[0]
  width_x = body_x.max() - body_x.min() + 1
  mid_x = (body_x.min() + body_x.max()) / 2 - tight[2].start
  out = np.zeros(hu.shape, bool)
  out[tight] = _lungs_from_candidates(candidates[tight], body[tight], spacing, voxel_ml, mid_x,
                                      width_x, scale, inplane_factor)
  if pleural_bays:
    # Step 7's box grows in-plane by the deepest bay a lung's hull can hold: consolidation may
    # lie outside the aerated lung's box.
    grow = [int(np.ceil(0.25 * (b.stop - b.start))) for b in tight[1:]]
    box = (tight[0],) + tuple(slice(max(b.start - g, 0), b.stop + g)
                              for b, g in zip(tight[1:], grow))
    out[box] = fill_pleural_bays(out[box], hu[box], body[box], spacing, scale,
                                 cavity=pleural_cavity)
  return out


def _refine_factor(spacing, scale: float) -> int:
  """In-plane factor of the coarse grid of steps 2-7 (1: no coarse grid, step 8)."""
  return 2 if 2 * float(min(spacing[1], spacing[2])) <= COARSE_SPACING_MM * scale else 1


def _block_mean(hu: np.ndarray, f: int) -> np.ndarray:
  """float32 [D, ceil(H/f), ceil(W/f)]: mean of each f x f in-plane block (edges replicated)."""
  d, h, w = hu.shape
  padded = np.pad(np.asarray(hu, np.float32), ((0, 0), (0, -h % f), (0, -w % f)), mode="edge")
  if f == 2:  # (a + b) + (c + d), in half the time of the mean below (and in its order here:
    # the same bits on P002, cap002 and the 16 phantoms).
    out = padded[:, 0::2, 0::2] + padded[:, 0::2, 1::2]
    out += padded[:, 1::2, 0::2] + padded[:, 1::2, 1::2]
    out /= np.float32(4)
    return out
  blocks = padded.reshape(d, padded.shape[1] // f, f, padded.shape[2] // f, f)
  return blocks.mean(axis=(2, 4), dtype=np.float32)


def _segment_refined(hu: np.ndarray, spacing: np.ndarray, threshold: float, scale: float,
                     pleural_bays: bool, pleural_cavity: bool = False) -> np.ndarray:
  """Steps 2-7 on the coarse grid, the boundary refined on the input grid (step 8). bool."""
  f = _refine_factor(spacing, scale)
  if f == 1:
    return _segment(hu, spacing, threshold, scale, pleural_bays, pleural_cavity=pleural_cavity)
  hu_c = _block_mean(hu, f)
  labels_c, _ = ndimage.label(_segment(hu_c, spacing * np.array([1, f, f]), threshold, scale,
                                       pleural_bays, inplane_factor=f,
                                       pleural_cavity=pleural_cavity))
  hu = np.asarray(hu)
  return _refine(labels_c, hu_c < threshold, hu < threshold, hu < BAY_MAX_HU, f)


def _refine(labels_c: np.ndarray, air_c: np.ndarray, air: np.ndarray, tissue_ok: np.ndarray,
            f: int) -> np.ndarray:
  """Step 8: a coarse lung mask on the fine grid, its boundary redrawn by the threshold.

  Args:
    labels_c: int [D, h, w] lungs on the coarse grid (one label per lung).
    air_c: bool [D, h, w] coarse voxels below the threshold.
    air: bool [D, H, W] fine voxels below the threshold.
    f: in-plane factor between the grids.

  Returns:
    bool [D, H, W]. Fine voxels of the coarse mask's rim that are tissue inside a coarse voxel
    of air (the chest wall's share of a partial-volume voxel) are dropped; fine air voxels
    beside the mask are added; everything the coarse mask holds that is not air there (vessels,
    closing, juxtapleural consolidation) is kept. Voxels added beside one lung that touch the
    other are dropped (the cut survives).
  """
  out = np.zeros(air.shape, bool)
  if not labels_c.any():
    return out
  # Inside the mask's box (+1 coarse voxel in-plane): the rest stays empty.
  box_c = (slice(None),) + tuple(
      slice(max(int(i.min()) - 1, 0), int(i.max()) + 2)
      for i in np.nonzero(labels_c.any(axis=0)))
  box = (slice(None),) + tuple(slice(b.start * f, min(b.stop * f, n))
                               for b, n in zip(box_c[1:], air.shape[1:]))
  shape = air[box].shape
  up = _fine(labels_c[box_c], shape, f)
  air_up = _fine(air_c[box_c], shape, f)
  air, tissue_ok = air[box], tissue_ok[box]
  inside = up > 0
  rim = inside & ~morphology.erode_inplane(inside, border_value=True)
  keep = inside & ~(rim & ~air & air_up)
  # New voxels: fine air beside the mask, and one fine voxel of tissue (no bone) beside the
  # mask's tissue (consolidation, vessels: the coarse grid's share of their rim).
  dense = keep & ~air_up
  new = ~inside & ((air & morphology.dilate_inplane(inside))
                   | (tissue_ok & morphology.dilate_inplane(dense)))
  labels = np.where(keep, up, 0)
  zz, yy, xx = np.nonzero(new)
  # Each new voxel takes the label of an in-plane neighbour in the coarse mask; one with
  # neighbours of two lungs, or a 6-neighbour of the other lung, is dropped.
  padded = np.pad(up, 1)
  near = [padded[zz + 1, yy + 1 + dy, xx + 1 + dx] for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
  lab = np.max(near, axis=0)
  ok = np.all([(n == 0) | (n == lab) for n in near], axis=0)
  labels[zz[ok], yy[ok], xx[ok]] = lab[ok]
  out[box] = (labels > 0) & ~(morphology.touching_other_label(labels) & ~keep)
  return out


def _slice_bays(lung2d: np.ndarray, ext2d: np.ndarray, allowed2d: np.ndarray,
                depth2d: np.ndarray, min_depth_px: float, mid_x: float,
                pixel_mm: float) -> np.ndarray:
  """Bays of one lung in one slice that open towards the chest wall (step 7). bool [h, w].

  Args:
    lung2d: the lung in this slice.
    ext2d: the lung plus its craniocaudal gap filling (its hull is the reference contour).
    allowed2d: pixels a bay may take.
    depth2d: distance to the body's surface, mm.
    min_depth_px: a bay must hold a disk of this radius (pixels).
    mid_x: the body's midline (column); a bay across it is the mediastinum or the spine.
    pixel_mm: in-plane pixel size.
  """
  ys, xs = np.nonzero(ext2d)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  if min(y1 - y0, x1 - x0) < 3:
    return np.zeros_like(lung2d)  # A sliver holds no bay.
  hull = convex_hull_2d(ext2d[y0:y1, x0:x1])
  bays = hull & ~lung2d[y0:y1, x0:x1] & allowed2d[y0:y1, x0:x1]
  out = np.zeros_like(lung2d)
  if not bays.any():
    return out
  labels, n = ndimage.label(bays)
  # Chord: bay pixels on the hull's edge (a 4-neighbour outside the hull, or the crop's border).
  outside = ~np.pad(hull, 1)
  edge = (outside[:-2, 1:-1] | outside[2:, 1:-1] | outside[1:-1, :-2] | outside[1:-1, 2:])
  max_chord_depth = WALL_DEPTH_FRACTION * float(depth2d.max())
  depth = depth2d[y0:y1, x0:x1]
  # Per bay at once: chord size, deepest and mean chord depth, mean bay depth.
  chord_labels = np.where(edge, labels, 0).ravel()
  n_chord = np.bincount(chord_labels, minlength=n + 1)
  chord_max = np.zeros(n + 1)
  np.maximum.at(chord_max, chord_labels, depth.ravel())
  chord_mean = np.bincount(chord_labels, depth.ravel(), n + 1) / np.maximum(n_chord, 1)
  bay_mean = (np.bincount(labels.ravel(), depth.ravel(), n + 1)
              / np.maximum(np.bincount(labels.ravel(), minlength=n + 1), 1))
  # A bay against the chest wall has its chord along the wall: shallow, and nearer the body's
  # surface than the bay itself. The mediastinum, the heart's notch, the hila and a diaphragm
  # dome have a chord that runs deep into the body.
  candidates = (n_chord > 0) & (chord_max <= max_chord_depth) & (chord_mean < bay_mean)
  candidates[0] = False
  objects = ndimage.find_objects(labels) if candidates.any() else []
  for lab in np.nonzero(candidates)[0]:
    sl = objects[lab - 1]
    if x0 + sl[1].start <= mid_x <= x0 + sl[1].stop - 1:
      continue  # Across the midline: the mediastinum or the spine.
    part = labels[sl] == lab
    if ndimage.distance_transform_edt(np.pad(part, 1)).max() >= min_depth_px:
      accepted = np.zeros_like(lung2d)
      accepted[y0:y1, x0:x1][sl] = part
      pleura = float(depth[sl][part & edge[sl]].min())
      out |= _beyond_chord(accepted, lung2d, allowed2d, depth2d, pleura, pixel_mm)
  return out


def convex_hull_2d(mask: np.ndarray) -> np.ndarray:
  """The convex hull of a 2D mask, as ``skimage.morphology.convex_hull_image`` gives it.

  The same hull (qhull on the midpoints of the edges of the row and column end pixels,
  borders included) rasterised row by row: each row of a convex polygon is one run of
  pixels, bounded by its edges' half-planes (exact up to ``1e-7`` pixel; the vertices lie on
  a half-pixel grid), instead of a point-in-polygon test of every pixel.

  Args:
    mask: bool [h, w], not empty.

  Returns:
    bool [h, w].
  """
  h, w = mask.shape
  rows = np.nonzero(mask.any(axis=1))[0]
  m_rows = mask[rows]
  # The row ends suffice: in any direction, a row's farthest pixel is one of its ends.
  ends = np.concatenate([
      np.stack([rows, np.argmax(m_rows, axis=1)], 1),
      np.stack([rows, w - 1 - np.argmax(m_rows[:, ::-1], axis=1)], 1)]).astype(np.float64)
  diamond = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])
  # Unique points (qhull may fail on repeated ones), keyed on the half-pixel grid.
  pts2 = np.rint(2 * (ends[:, None, :] + diamond).reshape(-1, 2)).astype(np.int64) + 1
  key = np.unique(pts2[:, 0] * (2 * w + 3) + pts2[:, 1])
  points = np.stack([key // (2 * w + 3), key % (2 * w + 3)], 1).astype(np.float64) / 2 - 0.5
  try:
    v = points[ConvexHull(points).vertices]
  except QhullError:
    return np.zeros(mask.shape, bool)  # As skimage (which warns): a degenerate hull.
  e = np.roll(v, -1, axis=0) - v  # Edges [V, 2] (row, column).
  # Inside: sign * cross(e, p - v) >= 0 for every edge; the sign from the vertices' mean.
  sign = np.sign(e[:, 0] * (v[:, 1].mean() - v[:, 1]) - e[:, 1] * (v[:, 0].mean() - v[:, 0]))
  r = np.arange(h, dtype=np.float64)[:, None]
  a = sign * e[:, 0]  # Coefficient of the column: a * c + b >= 0.
  b = sign * (-e[:, 1] * (r - v[:, 0]) - e[:, 0] * v[:, 1])  # [h, V]
  with np.errstate(divide="ignore", invalid="ignore"):
    bound = -b / a
  lo = np.where(a > 0, bound, -np.inf).max(axis=1)
  hi = np.where(a < 0, bound, np.inf).min(axis=1)
  empty = ((a == 0) & (b < -1e-7)).any(axis=1)
  lo, hi = np.ceil(lo - 1e-7), np.floor(hi + 1e-7)
  c = np.arange(w, dtype=np.float64)
  return (c >= lo[:, None]) & (c <= hi[:, None]) & ~empty[:, None]


def _beyond_chord(bay: np.ndarray, lung2d: np.ndarray, allowed2d: np.ndarray,
                  depth2d: np.ndarray, pleura_depth: float, pixel_mm: float) -> np.ndarray:
  """A bay grown outwards past its chord, down to the depth of the pleura at the chord's ends.

  The consolidation at a lung's outermost extent bulges past the chord of the aerated lung; it
  lies at least as deep below the body's surface as the pleura beside it, the chest wall
  above it. The growth is geodesic inside ``allowed2d`` and at most ``BAY_MAX_GROWTH_MM``.
  """
  room = allowed2d & ~lung2d & (depth2d > pleura_depth + pixel_mm)
  steps = max(1, int(round(BAY_MAX_GROWTH_MM / pixel_mm)))
  return ndimage.binary_dilation(bay, iterations=steps, mask=room | bay)


def fill_z_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
  """Fills the runs of False along axis 0 that lie between two True voxels, up to ``max_gap``.

  Args:
    mask: bool [D, H, W].
    max_gap: longest run (voxels) that is filled.

  Returns:
    bool [D, H, W]: ``mask`` with the short gaps filled.
  """
  d = mask.shape[0]
  z = np.arange(d, dtype=np.int32)[:, None, None]
  prev = np.maximum.accumulate(np.where(mask, z, -1), axis=0)
  nxt = np.minimum.accumulate(np.where(mask, z, d)[::-1], axis=0)[::-1]
  gap = nxt - prev - 1
  return mask | ((prev >= 0) & (nxt < d) & (gap <= max_gap))


def fill_pleural_bays(lungs: np.ndarray, hu: np.ndarray, body: np.ndarray, spacing,
                      scale: float = 1.0, cavity: bool = False) -> np.ndarray:
  """Adds juxtapleural consolidation to a lung mask (step 7 of the module docstring).

  Args:
    lungs: bool [D, H, W] lung mask (left and right lungs separate components).
    hu: [D, H, W] CT in HU on the same grid.
    body: bool [D, H, W] body mask (outside air excluded).
    spacing: (z, y, x) mm.
    scale: field-of-view scale of the length constants (1 for an adult chest).
    cavity: also add dependent consolidation against the posterior rib cage (step 7b,
      ``fill_pleural_cavity``).

  Returns:
    bool [D, H, W]: ``lungs`` plus the accepted bays (and step 7b's additions).
  """
  labels, n = ndimage.label(lungs)
  if n == 0:
    return lungs
  labels = labels.astype(np.int32)
  allowed = body & (hu < BAY_MAX_HU)
  max_gap = int(Z_GAP_MAX_MM * scale / float(spacing[0]))
  ext = labels.copy()  # Each lung with its craniocaudal gaps filled: the reference contour.
  for lab, box in enumerate(ndimage.find_objects(labels), start=1):
    # A gap lies between two voxels of the lung in its column: inside the lung's box.
    ext[box][fill_z_gaps(labels[box] == lab, max_gap) & allowed[box] & (ext[box] == 0)] = lab
  pixel_mm = float(min(spacing[1], spacing[2]))
  min_depth_px = BAY_MIN_DEPTH_MM * scale / pixel_mm
  # Slices are independent (each writes only its own slice of ``labels``): with
  # ``BAY_THREADS`` threads, every thread takes every BAY_THREADS-th slice.
  todo = [int(z) for z in np.nonzero(ext.any(axis=(1, 2)))[0]]
  depth = np.zeros(lungs.shape, np.float32) if cavity else None  # Step 7b reuses the depths.

  def run(zs):
    for z in zs:
      _fill_slice_bays(labels[z], ext[z], allowed[z], body[z], spacing, min_depth_px, pixel_mm,
                       None if depth is None else depth[z])

  parts = [todo[i::BAY_THREADS] for i in range(BAY_THREADS)]
  if BAY_THREADS > 1 and len(todo) > 1:
    with futures.ThreadPoolExecutor(BAY_THREADS) as pool:
      list(pool.map(run, parts))  # Re-raises a thread's exception.
  else:
    run(todo)
  out = (labels > 0) & ~_touching_other_label(labels, lungs)
  if cavity:
    out = fill_pleural_cavity(out, labels, hu, body, depth, spacing, scale)
  return out


def fill_pleural_cavity(lungs: np.ndarray, labels: np.ndarray, hu: np.ndarray,
                        body: np.ndarray, depth: np.ndarray, spacing,
                        scale: float = 1.0) -> np.ndarray:
  """Adds dependent consolidation between a lung and the posterior rib cage (step 7b).

  Args:
    lungs: bool [D, H, W] lung mask after the bays (step 7).
    labels: int [D, H, W] its lungs' labels (read inside ``lungs`` only).
    hu: [D, H, W] CT in HU on the same grid.
    body: bool [D, H, W] body mask.
    depth: float [D, H, W] distance (mm) to the body's surface, per slice (0 in slices
      without lung).
    spacing: (z, y, x) mm.
    scale: field-of-view scale of the length constants.

  Returns:
    bool [D, H, W]: ``lungs`` plus, per lung, the tissue on posterior runs from the lung to the
    rib cage that passes the tests of step 7b (module docstring).
  """
  if not lungs.any():
    return lungs
  cols = np.nonzero(body.any(axis=(0, 1)))[0]
  mid_x = (cols.min() + cols.max()) / 2.0
  # Runs lie in the lungs' columns, posterior of their anterior edge: a box of the lungs (and
  # the rib cage's bone CAVITY_RIB_Z_MM above and below, CAVITY_MAX_STEPS pixels beside).
  half = int(round(CAVITY_RIB_Z_MM * scale / float(spacing[0])))
  (z0, z1), (_, y1), (x0, x1) = [
      (int(i[0]), int(i[-1]) + 1)
      for i in (np.nonzero(lungs.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))]
  m = CAVITY_MAX_STEPS + 1
  box = (slice(max(z0 - half, 0), z1 + half), slice(0, y1 + 1),
         slice(max(x0 - m, 0), x1 + m))
  out = lungs.copy()
  out[box] = _cavity_in_box(lungs[box], np.where(lungs[box], labels[box], 0).astype(np.int16),
                            hu[box], body[box], depth[box], spacing, scale,
                            mid_x - box[2].start, half)
  return out


def _cavity_in_box(lungs, labels, hu, body, depth, spacing, scale, mid_x, half):
  """``fill_pleural_cavity`` inside its box; ``mid_x``: the body's midline (column)."""
  n = int(labels.max())
  bone = body & (hu >= BAY_MAX_HU)
  # The rib cage: bone up to CAVITY_RIB_Z_MM above or below (a slice between two ribs). (Only
  # the gaps between two ribs, ``fill_z_gaps``, let runs through the chest wall of P002's and
  # cap002's upper slices: 2 mL each.)
  bone_z = ndimage.maximum_filter1d(bone, 2 * half + 1, axis=0) if half else bone
  # In-plane chessboard distance to bone, in pixels, capped at CAVITY_MAX_STEPS.
  steps = np.full(lungs.shape, CAVITY_MAX_STEPS, np.int8)
  grown = bone_z
  for k in range(CAVITY_MAX_STEPS):
    steps[grown & (steps > k)] = k
    if k + 1 < CAVITY_MAX_STEPS:
      grown = morphology.square3_inplane(grown, np.logical_or)
  slice_max = depth.max(axis=(1, 2), keepdims=True)
  rib_cage = bone_z & (depth <= WALL_DEPTH_FRACTION * slice_max) & (slice_max > 0)
  free = body & (hu < BAY_MAX_HU) & ~bone_z & (labels == 0)
  # What ends a run first on either side along each column: a lung (its label), the rib
  # cage (n + 1), anything else (n + 2); free voxels are 0.
  code = np.where(labels > 0, labels, np.where(rib_cage, n + 1, n + 2)).astype(np.int16)
  code[free] = 0
  anterior, posterior = _first_stop(code, forward=True), _first_stop(code, forward=False)
  x_off = np.arange(lungs.shape[2]) - mid_x
  run = free & (posterior == n + 1) & (
      np.abs(x_off) >= CAVITY_SPINE_MM * scale / float(spacing[2]))[None, None, :]
  edge = lungs & ~morphology.square3_inplane(lungs, np.logical_and)
  out = labels.copy()
  for lab in range(1, n + 1):
    # The lung's own columns (and one beside them: the opening's neighbourhood).
    cols = np.nonzero((labels == lab).any(axis=(0, 1)))[0]
    if cols.size == 0:
      continue  # A label without voxels (all touching the other lung).
    sub = (slice(None), slice(None), slice(max(int(cols[0]) - 1, 0), int(cols[-1]) + 2))
    one, xo = labels[sub] == lab, x_off[sub[2]]
    side = np.sign(cols.mean() - mid_x)
    add = run[sub] & (anterior[sub] == lab) & (xo * side > 0)[None, None, :]
    add &= np.abs(xo)[None, None, :] >= _medial_limit(one, np.abs(xo))[:, None, None] + 1.0
    lining, touching = _lining(steps[sub], edge[sub] & one)
    add &= steps[sub] >= lining[:, None, None]
    add = _open_inplane(add)
    add = _above_floor(one, add, spacing, touching)
    out[sub][add & (out[sub] == 0)] = lab
  return (out > 0) & ~_touching_other_label(out, lungs)


def _open_inplane(mask: np.ndarray) -> np.ndarray:
  """3x3 in-plane opening of bool [D, H, W]: no strips one pixel wide (step 7b)."""
  return morphology.square3_inplane(morphology.square3_inplane(mask, np.logical_and),
                                    np.logical_or)


def _first_stop(code: np.ndarray, forward: bool) -> np.ndarray:
  """int16 [D, H, W]: the code of the nearest non-zero voxel strictly beyond each voxel along
  y (towards higher y when ``forward``), -1 where there is none."""
  out = np.empty_like(code)
  cur = np.full(code[:, 0].shape, -1, code.dtype)
  for y in (range(code.shape[1] - 1, -1, -1) if forward else range(code.shape[1])):
    out[:, y] = cur
    c = code[:, y]
    cur = np.where(c != 0, c, cur)
  return out


def _medial_limit(one: np.ndarray, x_dist: np.ndarray) -> np.ndarray:
  """float [D]: per slice, the ``CAVITY_MEDIAL_PERCENTILE``-th percentile over the rows with
  lung of the lung's distance (columns) from the midline in that row (inf without lung)."""
  rows = np.sort(np.where(one, x_dist[None, None, :], np.inf).min(axis=2), axis=1)  # [D, H]
  count = np.isfinite(rows).sum(axis=1)
  # np.percentile's linear interpolation between the sorted finite values of each slice.
  pos = np.maximum(count - 1, 0) * (CAVITY_MEDIAL_PERCENTILE / 100.0)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
  a = np.take_along_axis(rows, lo[:, None], 1)[:, 0]
  b = np.take_along_axis(rows, hi[:, None], 1)[:, 0]
  with np.errstate(invalid="ignore"):
    out = a + (b - a) * (pos - lo)
  return np.where(count > 0, out, np.inf)


def _lining(steps: np.ndarray, edge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The chest wall's lining, measured where the lung is aerated (step 7b).

  Args:
    steps: int [D, H, W] in-plane chessboard distance to the rib cage, capped at
      ``CAVITY_MAX_STEPS``.
    edge: bool [D, H, W] the lung's boundary pixels.

  Returns:
    (lining float [D], touching bool [D]): per slice, the median distance of the lung's
    boundary pixels near the wall (the lung's median over all slices where a slice has fewer
    than ``CAVITY_MIN_PIXELS``); whether at least ``CAVITY_TOUCH_FRACTION`` of the slice's
    boundary touches the wall (no farther from it than the lung's median).
  """
  d = edge.shape[0]
  # hist[z, k]: the slice's boundary pixels at distance k < CAVITY_MAX_STEPS.
  hist = np.stack([(edge & (steps == k)).sum(axis=(1, 2)) for k in range(CAVITY_MAX_STEPS)], 1)
  count = hist.sum(axis=1)
  if count.sum() == 0:
    return np.full(d, np.inf), np.zeros(d, bool)
  overall = float(np.median(np.repeat(np.arange(CAVITY_MAX_STEPS), hist.sum(axis=0))))
  # Each slice's median (np.median's: the mean of the two middle values) from its histogram.
  cum = np.cumsum(hist, axis=1)
  middle = [np.argmax(cum > r[:, None], axis=1) for r in ((count - 1) // 2, count // 2)]
  lining = np.where(count >= CAVITY_MIN_PIXELS, (middle[0] + middle[1]) / 2.0, overall)
  touch = hist[:, :int(np.floor(overall)) + 1].sum(axis=1)
  n_edge = edge.sum(axis=(1, 2))
  return lining, touch >= CAVITY_TOUCH_FRACTION * np.maximum(n_edge, 1)


def lung_floor(one: np.ndarray, spacing, tolerance: int = FLOOR_TOLERANCE
               ) -> np.ndarray | None:
  """The diaphragm under a lung, continued under its consolidation (step 7b).

  A quadratic surface z(y, x) fitted to the lowest slice of the lung in each (y, x) column, as
  a lower envelope: columns more than ``tolerance`` slices above the fit (whose lowest aerated
  voxel lies on consolidation, not on the diaphragm) are dropped and the fit repeated.

  Args:
    one: bool [D, H, W] one lung.
    spacing: (z, y, x) mm.

  Returns:
    float [H, W] the floor's slice index, or None with fewer than 10 columns.
  """
  zlow = np.argmax(one, axis=0)
  ys, xs = np.nonzero(one.any(axis=0) & (zlow > 0))
  if ys.size < 10:
    return None
  z = zlow[ys, xs].astype(np.float64)
  y0, x0 = ys.mean(), xs.mean()

  def design(y, x):
    y, x = (y - y0) * spacing[1], (x - x0) * spacing[2]
    return np.stack(np.broadcast_arrays(np.ones_like(y * x), y, x, y * y, x * x, x * y), -1)

  a = design(ys.astype(np.float64), xs.astype(np.float64))
  keep = np.ones(z.size, bool)
  for _ in range(6):
    ak = a[keep]
    # The normal equations (6 x 6; lstsq for a rank-deficient set, e.g. one row of columns).
    coef = np.linalg.lstsq(ak.T @ ak, ak.T @ z[keep], rcond=None)[0]
    new = z - a @ coef <= tolerance
    if new.sum() < 10 or (new == keep).all():
      break
    keep = new
  h, w = one.shape[1:]
  grid = design(np.arange(h, dtype=np.float64)[:, None], np.arange(w, dtype=np.float64)[None])
  return grid @ coef


def _above_floor(one: np.ndarray, cand: np.ndarray, spacing, touching: np.ndarray
                 ) -> np.ndarray:
  """Step 7b's floor and support for one lung: which candidates it adds. bool [D, H, W].

  Args:
    one: bool [D, H, W] the lung.
    cand: bool [D, H, W] the voxels that passed the run, medial, lining and opening tests.
    spacing: (z, y, x) mm.
    touching: bool [D] slices whose lung touches the wall (``_lining``).

  Returns:
    The candidates on or above ``lung_floor``, from the apex down under the slice above
    (``_supported_from_above``); and in the columns whose aerated lung ends on consolidation
    (``floor_under_consolidation``), the candidates below it down to the continued floor that
    hang from the lung in unbroken columns (``_hanging_columns``), without one-pixel strips.
  """
  floor = lung_floor(one, spacing)
  if floor is None:
    return _supported_from_above(one, cand, touching)
  z = np.arange(one.shape[0])[:, None, None]
  add = _supported_from_above(one, cand & (z >= floor[None]), touching)
  deep = floor_under_consolidation(one, floor) & cand & touching[:, None, None]
  return add | _open_inplane(_hanging_columns(one, add | deep) & deep)


def floor_under_consolidation(one: np.ndarray, floor: np.ndarray,
                              tolerance: int = FLOOR_TOLERANCE) -> np.ndarray:
  """Where a lung's consolidated columns may continue below its fitted floor (step 7b).

  A column whose lowest aerated slice lies more than ``tolerance`` slices above the fitted floor
  (``lung_floor``) ends on consolidation, not on the diaphragm (untrusted); the others are
  trusted. Posterior of a dome's top the diaphragm only descends, so under an untrusted column
  it lies no higher than, and is taken as, the lowest trusted column anterior of it in the same
  sagittal line (rows of higher y, same x).

  Args:
    one: bool [D, H, W] one lung.
    floor: float [H, W] its fitted floor (slice index).
    tolerance: slices above the fit that a column's lowest slice may lie and be trusted.

  Returns:
    bool [D, H, W]: in untrusted columns, the voxels below the lowest aerated slice and on or
    above that continued floor (none in columns without a trusted column anterior of them).
  """
  big = np.iinfo(np.int32).max
  has = one.any(axis=0)
  low = np.where(has, np.argmax(one, axis=0), big).astype(np.int64)
  trusted = has & (low - floor <= tolerance)
  # min over the rows y' >= y of the trusted columns' lowest slice (big where none).
  cont = np.minimum.accumulate(np.where(trusted, low, big)[::-1], axis=0)[::-1]
  z = np.arange(one.shape[0])[:, None, None]
  return (has & ~trusted & (cont < big))[None] & (z < low[None]) & (z >= cont[None])


def _hanging_columns(one: np.ndarray, cand: np.ndarray) -> np.ndarray:
  """From the apex down, the voxels of ``cand`` directly under (the same column, one slice up)
  the lung or a voxel already taken: unbroken columns hanging from the aerated lung, with no
  in-plane growth (which would creep under the heart's and the domes' edges). bool [D, H, W]."""
  out = np.zeros_like(cand)
  for z in range(one.shape[0] - 2, -1, -1):
    if cand[z].any():
      out[z] = cand[z] & (one[z + 1] | out[z + 1])
  return out


def _supported_from_above(one: np.ndarray, add: np.ndarray, touching: np.ndarray) -> np.ndarray:
  """Slice by slice from the top: a slice keeps only the additions under the slice above's lung
  and additions (grown by one pixel), and none when its lung does not touch the wall
  (``touching``: the apices taper away from the chest wall)."""
  out = np.zeros_like(add)
  support = None
  for z in range(one.shape[0] - 1, -1, -1):
    if support is not None and touching[z]:
      out[z] = add[z] & support
    grown = one[z] | out[z]
    support = morphology.dilate_inplane(grown[None])[0] if grown.any() else None
  return out


def _fill_slice_bays(lab_z: np.ndarray, ext_z: np.ndarray, allowed_z: np.ndarray,
                     body_z: np.ndarray, spacing, min_depth_px: float, pixel_mm: float,
                     depth_out: np.ndarray | None = None) -> None:
  """Step 7's bays of one slice, written into ``lab_z`` (int [H, W], the slice's lung labels).

  ``ext_z``: the labels with the craniocaudal gaps filled; ``allowed_z``: pixels a bay may take;
  ``body_z``: the body; ``depth_out``: float [H, W] that receives the slice's depth below the
  body's surface (mm), or None.
  """
  present = np.nonzero(np.bincount(ext_z.ravel()))[0]
  present = present[present > 0]
  if present.size == 0:
    return
  depth = _slice_depth(body_z, spacing[1:])
  if depth_out is not None:
    depth_out[...] = depth
  cols = np.nonzero(body_z.any(axis=0))[0]
  mid_x = (cols.min() + cols.max()) / 2.0 if cols.size else lab_z.shape[1] / 2.0
  free = allowed_z & (lab_z == 0)
  for lab in present:
    # Each piece of the lung in this slice on its own: a hull over two pieces (a lung that
    # wraps the heart, or both lungs joined) would span the mediastinum.
    pieces, n_pieces = ndimage.label(ext_z == lab)
    for piece in range(1, n_pieces + 1):
      ext_piece = pieces == piece
      lung_piece = ext_piece & (lab_z == lab)
      if lung_piece.any():
        lab_z[_slice_bays(lung_piece, ext_piece, free, depth, min_depth_px, mid_x,
                          pixel_mm)] = lab


def _slice_depth(body2d: np.ndarray, spacing_yx) -> np.ndarray:
  """Distance (mm) of every pixel to the body's surface in one slice, float [H, W].

  Computed on a 2x coarser grid (it only ranks a bay's chord against the bay, step 7).
  """
  f = 2 if min(body2d.shape) >= 64 and max(spacing_yx) < 2.0 else 1
  coarse = np.pad(_coarse(body2d[None], f)[0], 1)
  depth = morphology.distance_transform(coarse, np.asarray(spacing_yx) * f)
  return _fine(depth[None, 1:-1, 1:-1], (1,) + body2d.shape, f)[0]


def _touching_other_label(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """Voxels not in ``keep`` with a 6-neighbour of another non-zero label (keeps lungs apart)."""
  return morphology.touching_other_label(labels) & (labels > 0) & ~keep


def _lungs_from_candidates(candidates, body, spacing, voxel_ml, mid_x, width_x, scale,
                           inplane_factor=1):
  """Steps 4-5 of the module docstring on a cropped box; ``mid_x`` is the body's midline."""
  # Which candidate components are lungs: the largest, and a plausible second one.
  cand_labels, n_cand = ndimage.label(candidates)
  comp_sizes = np.bincount(cand_labels.ravel())
  comp_sizes[0] = 0
  order = np.argsort(comp_sizes)[::-1]
  kept_comps = [int(order[0])]
  if n_cand > 1 and comp_sizes[order[1]] > 0:
    first, second = int(order[0]), int(order[1])
    ratio = comp_sizes[second] / comp_sizes[first]
    zf, _, xf = np.nonzero(cand_labels == first)
    zs, _, xs = np.nonzero(cand_labels == second)
    other_side = (xf.mean() - mid_x) * (xs.mean() - mid_x) < 0
    reaches_up = zs.max() >= (zf.min() + zf.max()) / 2
    if ratio >= SECOND_LUNG_FRACTION or (
        ratio >= MIN_SECOND_LUNG_FRACTION and other_side and reaches_up):
      kept_comps.append(second)
  keep = np.zeros(n_cand + 1, bool)
  keep[kept_comps] = True
  lungs = keep[cand_labels]

  # Airways: cut the candidates into the Voronoi cells of their deep cores; drop small cells
  # centred on the midline (trachea, carina).
  f = _coarse_factor(spacing, scale)
  coarse, coarse_spacing = _coarse(lungs, f), spacing * np.array([1, f, f])
  depth = morphology.distance_transform(coarse, coarse_spacing)
  core_labels, n_cores = ndimage.label(depth > CORE_RADIUS_MM * scale)
  if n_cores > 1:
    # The nearest core of every lung voxel, read off the coarse grid (``_fine``'s mapping).
    zz, yy, xx = np.nonzero(lungs)
    cell = _nearest_seed(core_labels, coarse_spacing, (zz, yy // f, xx // f))
    vol = np.bincount(cell, minlength=n_cores + 1).astype(np.float64)
    cx = np.bincount(cell, weights=xx, minlength=n_cores + 1) / np.maximum(vol, 1)
    airway = ((np.abs(cx - mid_x) < CENTRAL_FRACTION * width_x)
              & (vol < AIRWAY_MAX_FRACTION * vol[1:].sum()))
    airway[0] = False
    drop = airway[cell]
    lungs[zz[drop], yy[drop], xx[drop]] = False

  lungs = ndimage.binary_closing(np.pad(lungs, 2), structure=_closing_element(inplane_factor),
                                 iterations=1 if inplane_factor > 1 else 2)[2:-2, 2:-2, 2:-2]
  lungs = fill_holes_per_slice(lungs) & body
  lungs = _split_left_right(lungs, spacing, scale, depth)
  # Drop specks left by the closing and the cut.
  labels, _ = ndimage.label(lungs)
  sizes = np.bincount(labels.ravel()) * voxel_ml
  keep = sizes >= MIN_COMPONENT_ML * scale ** 3
  keep[0] = False
  return keep[labels]


def _closing_element(f: int) -> np.ndarray:
  """Step 5's closing: two 6-connected steps on the input grid, the same length in mm on a grid
  ``f`` times coarser in-plane (one element {|dz| / 2 + f (|dy| + |dx|) / 2 <= 1})."""
  if f == 1:
    return ndimage.generate_binary_structure(3, 1)
  r = 2 // f
  dz, dy, dx = np.ogrid[-2:3, -r:r + 1, -r:r + 1]
  return np.abs(dz) / 2 + f * (np.abs(dy) + np.abs(dx)) / 2 <= 1


def _coarse_factor(spacing, scale: float) -> int:
  """In-plane factor of the grid on which depths and nearest cores are computed.

  Cores are defined by depths of ``CORE_RADIUS_MM`` and more, so a grid of up to half that
  spacing resolves them; on the 1.43 mm preprocessing grid of an adult chest that is 2x
  coarser in-plane (4x fewer voxels for the distance transforms, the slowest steps).
  """
  return 2 if 2 * float(min(spacing[1], spacing[2])) <= 0.5 * CORE_RADIUS_MM * scale else 1


def _coarse(mask: np.ndarray, f: int) -> np.ndarray:
  """bool [D, ceil(H/f), ceil(W/f)]: majority of each f x f in-plane block."""
  if f == 1:
    return mask
  d, h, w = mask.shape
  padded = np.zeros((d, -(-h // f) * f, -(-w // f) * f), np.uint8)
  padded[:, :h, :w] = mask
  blocks = padded.reshape(d, padded.shape[1] // f, f, padded.shape[2] // f, f)
  return blocks.sum(axis=(2, 4), dtype=np.int32) * 2 >= f * f


def _fine(labels: np.ndarray, shape, f: int) -> np.ndarray:
  """Nearest-neighbour inverse of ``_coarse``: [D, h, w] labels back to ``shape``."""
  if f == 1:
    return labels
  return np.repeat(np.repeat(labels, f, axis=1), f, axis=2)[:, :shape[1], :shape[2]]


def _nearest_seed(seeds: np.ndarray, spacing, where: tuple[np.ndarray, ...]) -> np.ndarray:
  """Label of the nearest non-zero voxel of ``seeds`` (a Voronoi partition) at the voxels
  ``where`` (index arrays, as ``np.nonzero`` gives them)."""
  idx = ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_distances=False,
                                       return_indices=True)
  return seeds[tuple(axis[where] for axis in idx)]


def _split_left_right(lungs: np.ndarray, spacing: np.ndarray, scale: float,
                      depth: np.ndarray | None = None) -> np.ndarray:
  """Cuts lungs joined at the anterior/posterior junction into a left and a right component.

  On a ~1.5 mm grid the junction line (about 1 mm of tissue) averages to air, joining the
  lungs. When the mask is one component, cores of increasing depth are tried until two large
  ones lie on opposite sides; voxels go to the nearest core and the one-voxel boundary
  between the two is removed. ``depth`` (on the coarse grid of ``_coarse_factor``) may come
  from before the closing (step 4's): the cores then lie where both masks are.
  """
  labels, n = ndimage.label(lungs)
  if n == 0:
    return lungs
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  order = np.argsort(sizes)[::-1]
  if n > 1 and sizes[order[1]] >= SECOND_LUNG_FRACTION * sizes[order[0]]:
    return lungs  # Already two lungs.
  f = _coarse_factor(spacing, scale)
  coarse, coarse_spacing = _coarse(lungs, f), spacing * np.array([1, f, f])
  if depth is None:
    depth = morphology.distance_transform(coarse, coarse_spacing)
  else:
    depth = np.where(coarse, depth, 0.0)
  x_mid = np.nonzero(coarse)[2].mean()
  for radius in (8.0, 10.0, 12.0, 15.0, 20.0, 25.0):
    cores, n_cores = ndimage.label(depth > radius * scale)
    if n_cores < 2:
      continue
    sizes = np.bincount(cores.ravel())
    sizes[0] = 0
    a, b = np.argsort(sizes)[::-1][:2]
    if sizes[b] < SECOND_LUNG_FRACTION * sizes[a]:
      continue
    xa = np.nonzero(cores == a)[2].mean()
    xb = np.nonzero(cores == b)[2].mean()
    if (xa - x_mid) * (xb - x_mid) >= 0:
      continue
    seeds = np.where(cores == a, 1, 0) + np.where(cores == b, 2, 0)
    zz, yy, xx = np.nonzero(lungs)
    side = np.zeros(lungs.shape, np.uint8)
    side[zz, yy, xx] = _nearest_seed(seeds, coarse_spacing, (zz, yy // f, xx // f))
    touching_a = ndimage.binary_dilation(side == 1,
                                         structure=ndimage.generate_binary_structure(3, 1))
    return lungs & ~(touching_a & (side == 2))
  return lungs


def segment_lungs(hu: np.ndarray, spacing_zyx, *, threshold_hu: float = THRESHOLD_HU,
                  pleural_bays: bool = True,
                  pleural_cavity: bool | None = None) -> np.ndarray:
  """Segments both lungs in a chest CT (classical method, see module docstring).

  Args:
    hu: [D, H, W] CT in Hounsfield units, canonical RAS+ (z, y, x).
    spacing_zyx: voxel size in mm, (z, y, x).
    threshold_hu: air/tissue threshold.
    pleural_bays: add juxtapleural consolidation (step 7); False gives the mask without it.
    pleural_cavity: also add dependent consolidation against the posterior rib cage (step 7b;
      only with ``pleural_bays``). None: ``PLEURAL_CAVITY_DEFAULT``.

  Returns:
    uint8 [D, H, W] mask, 1 inside the lungs (all zeros when none is found).
  """
  hu = np.asarray(hu)
  if hu.ndim != 3:
    raise ValueError(f"expected a [D, H, W] volume, got shape {hu.shape}")
  spacing = np.asarray(spacing_zyx, np.float64)
  cavity = PLEURAL_CAVITY_DEFAULT if pleural_cavity is None else bool(pleural_cavity)
  # Phantoms and small children: every length and volume constant shrinks with the field of
  # view (a real chest CT's field of view is >= 300 mm wide, so scale = 1 there).
  scale = float(min(1.0, hu.shape[2] * spacing[2] / REFERENCE_FOV_MM))
  # Resample only when clearly finer than the work grid (the preprocessed 1.43 mm grid is not).
  work = np.asarray(WORK_SPACING_MM) * scale
  work_spacing = np.where(spacing >= 0.8 * work, spacing, work)
  work_shape = np.maximum(np.round(hu.shape * spacing / work_spacing).astype(int), 1)
  if np.array_equal(work_shape, hu.shape):
    return _segment_refined(hu, spacing, threshold_hu, scale, pleural_bays,
                            cavity).astype(np.uint8)
  work_spacing = hu.shape * spacing / work_shape
  small = _segment_refined(_resample(hu, work_shape), work_spacing, threshold_hu, scale,
                           pleural_bays, cavity)
  # Upsample each component on its own (inside its bounding box) so that the cut between the
  # two lungs survives interpolation; voxels of a later component touching an earlier one are
  # dropped.
  labels, n = ndimage.label(small)
  out = np.zeros(hu.shape, np.uint8)
  scale = work_shape / np.asarray(hu.shape, np.float64)  # Work voxels per input voxel.
  six = ndimage.generate_binary_structure(3, 1)
  for lab, box_small in enumerate(ndimage.find_objects(labels), start=1):
    lo = np.array([b.start for b in box_small]) - 1
    hi = np.array([b.stop for b in box_small])  # Last index + 1 margin.
    j0 = np.maximum(np.floor((lo + 0.5) / scale - 0.5).astype(int), 0)
    j1 = np.minimum(np.ceil((hi + 0.5) / scale - 0.5).astype(int) + 1, hu.shape)
    part = ndimage.affine_transform(
        (labels == lab).astype(np.float32), scale, offset=scale * j0 + (scale - 1) / 2,
        output_shape=tuple(j1 - j0), order=1, mode="constant", cval=0.0,
        prefilter=False) >= 0.5
    box = tuple(slice(a, b) for a, b in zip(j0, j1))
    if lab > 1:
      grown = tuple(slice(max(a - 1, 0), b + 1) for a, b in zip(j0, j1))
      near = ndimage.binary_dilation(out[grown].astype(bool), structure=six)
      part &= ~near[tuple(slice(a - g.start, b - g.start) for a, b, g in zip(j0, j1, grown))]
    out[box] |= part.astype(np.uint8)
  return out


def lung_volume_litres(mask: np.ndarray, spacing_zyx) -> float:
  """Volume of a binary mask in litres."""
  return float(np.count_nonzero(mask)) * float(np.prod(spacing_zyx)) / 1e6


def left_right_volumes(mask: np.ndarray, spacing_zyx, min_fraction: float = 0.1):
  """Volumes (litres) of the largest components of a canonical (RAS+) mask, with sides.

  Returns:
    list of (side, litres) for the components holding at least ``min_fraction`` of the mask,
    largest first; side is "right" (patient's right: x above the mask's centre in RAS+) or
    "left".
  """
  labels, n = ndimage.label(mask)
  if n == 0:
    return []
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  total = sizes.sum()
  centre_x = np.nonzero(mask)[2].mean()
  out = []
  for lab in np.argsort(sizes)[::-1]:
    if lab == 0 or sizes[lab] < min_fraction * total:
      break
    cx = np.nonzero(labels == lab)[2].mean()
    # RAS+: x grows towards the patient's right.
    out.append(("right" if cx > centre_x else "left",
                float(sizes[lab]) * float(np.prod(spacing_zyx)) / 1e6))
  return out


def save_overlay_png(hu: np.ndarray, mask: np.ndarray, spacing_zyx, path: str,
                     title: str = "") -> None:
  """Axial and coronal slices (through the mask's centre) with the mask outlined in red.

  Axial is shown in radiological convention (patient's right on the image's left, anterior
  up), coronal with superior up.
  """
  import matplotlib  # Deferred: only the --png picture needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  zc, yc, _ = (np.round(np.mean(np.nonzero(mask), axis=1)).astype(int)
               if mask.any() else np.array(hu.shape) // 2)
  sz, sy, sx = spacing_zyx
  fig, axes = plt.subplots(1, 2, figsize=(12, 6))
  # RAS+: flip y so anterior is up, flip x so the patient's right is on the image's left.
  axial = hu[zc][::-1, ::-1]
  axial_m = mask[zc][::-1, ::-1]
  coronal = hu[:, yc, :][::-1, ::-1]
  coronal_m = mask[:, yc, :][::-1, ::-1]
  for ax, img, m, aspect, name in ((axes[0], axial, axial_m, sy / sx, f"axial z={zc}"),
                                   (axes[1], coronal, coronal_m, sz / sx, f"coronal y={yc}")):
    ax.imshow(img, cmap="gray", vmin=-1350, vmax=150, aspect=aspect)
    ax.imshow(np.ma.masked_where(m == 0, m), cmap="autumn", alpha=0.35, aspect=aspect)
    if m.any():
      ax.contour(m, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(name)
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _cli_flags() -> flags.FlagValues:
  """The command line's flags (a FlagValues of its own: see dsan_jax/cli_flags.py)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "Write the mask here (NIfTI, the input's grid).",
                      flag_values=fv)
  flags.DEFINE_string("png", None, "Write an axial + coronal overlay picture here.",
                      flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m dsan_jax.data.lung_mask --image IMAGE [--out mask.nii.gz] [--png overlay.png]``.

  IMAGE: a CT in HU (NIfTI file or DICOM series folder). Prints the lung volumes and the
  segmentation time; an expected problem prints one line and exits 1.
  """
  args = _cli_flags()
  flags.DEFINE_string("image", None, "The CT in HU: a NIfTI file or a DICOM series folder.",
                      flag_values=args)
  flags.mark_flag_as_required("image", flag_values=args)
  status = cli_flags.parse(args, argv, "python -m dsan_jax.data.lung_mask",
                           "The classical lung-mask fallback on one CT: lung volumes, and "
                           "optionally the mask (NIfTI) and an overlay picture (PNG).")
  if status is not None:
    return status
  try:
    vol = io.read_volume(args.image)
    t0 = time.perf_counter()
    mask = segment_lungs(vol.array, vol.spacing_zyx)
    seconds = time.perf_counter() - t0
  except DsanError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  total = lung_volume_litres(mask, vol.spacing_zyx)
  parts = ", ".join(f"{side} {v:.2f} L" for side, v in left_right_volumes(mask, vol.spacing_zyx))
  print(f"{args.image}: lungs {total:.2f} L ({parts}); segmentation {seconds:.2f} s")
  if args.out:
    io.write_nifti(args.out, io.to_original_orientation(mask, vol.original_affine),
                   vol.original_affine)
  if args.png:
    save_overlay_png(vol.array, mask, vol.spacing_zyx, args.png,
                     title=f"{args.image}: {total:.2f} L")
  return 0


if __name__ == "__main__":
  sys.exit(main())
