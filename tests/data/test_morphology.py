"""Shift-based morphology (dsan_jax.data.morphology) gives exactly ndimage's voxels."""

import numpy as np
import pytest
from scipy import ndimage

from dsan_jax.data import morphology

_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def _volumes():
  rng = np.random.default_rng(0)
  for density in (0.05, 0.5, 0.9):
    # Smoothed noise: blobs of several sizes, touching the borders.
    field = ndimage.uniform_filter(rng.random((9, 23, 31)), 3)
    yield field > np.quantile(field, 1.0 - density)


@pytest.mark.parametrize("radius, z_half", [(1, 0), (2, 1), (3, 0), (4, 2)])
def test_disk_opening_equals_ndimage(radius, z_half):
  structure = np.repeat(morphology.disk(radius)[None], 2 * z_half + 1, axis=0)
  # The disk itself: the r^2 + 0.5 rule (radius 2: 13 pixels, radius 3: 29).
  assert morphology.disk(2).sum() == 13 and morphology.disk(3).sum() == 29
  for mask in _volumes():
    want = ndimage.binary_opening(mask, structure=structure)
    assert np.array_equal(morphology.disk_opening(mask, radius, z_half), want)


def test_inplane_dilation_and_erosion_equal_ndimage():
  for mask in _volumes():
    assert np.array_equal(morphology.dilate_inplane(mask),
                          ndimage.binary_dilation(mask, structure=_INPLANE))
    for border in (0, 1):
      assert np.array_equal(morphology.erode_inplane(mask, border_value=bool(border)),
                            ndimage.binary_erosion(mask, structure=_INPLANE,
                                                   border_value=border))


def test_inplane_square_erosion_and_dilation_equal_ndimage():
  square = np.zeros((3, 3, 3), bool)
  square[1] = True
  for mask in _volumes():
    assert np.array_equal(morphology.square3_inplane(mask, np.logical_or),
                          ndimage.binary_dilation(mask, structure=square))
    assert np.array_equal(morphology.square3_inplane(mask, np.logical_and),
                          ndimage.binary_erosion(mask, structure=square))


@pytest.mark.parametrize("sampling", [(2.5, 2.87, 2.87), (1.0, 1.0, 1.0)])
def test_distance_transform_equals_ndimage(sampling):
  for mask in _volumes():
    want = ndimage.distance_transform_edt(mask, sampling=sampling)
    got = morphology.distance_transform(mask, sampling)
    assert got.dtype == np.float64 and np.array_equal(got, want)
  flat = next(_volumes())[3]  # 2D.
  assert np.array_equal(morphology.distance_transform(flat, (1.5, 3.0)),
                        ndimage.distance_transform_edt(flat, sampling=(1.5, 3.0)))


def _touching_by_rolled_copies(labels):
  """Reference: a rolled copy of ``labels`` per 6-neighbour, the wrapped-around face zeroed."""
  out = np.zeros(labels.shape, bool)
  for axis in range(labels.ndim):
    for step in (1, -1):
      other = np.roll(labels, step, axis=axis)
      edge = [slice(None)] * labels.ndim
      edge[axis] = 0 if step == 1 else -1
      other[tuple(edge)] = 0  # No wrap-around.
      out |= (other > 0) & (other != labels)
  return out


def test_touching_other_label_equals_the_rolled_copies():
  from dsan_jax.data import lung_mask  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  for mask in _volumes():
    labels = np.where(mask, rng.integers(1, 4, mask.shape), 0).astype(np.int32)
    keep = rng.random(mask.shape) < 0.3
    want = _touching_by_rolled_copies(labels) & (labels > 0) & ~keep
    got = morphology.touching_other_label(labels)
    assert np.array_equal(got & (labels > 0) & ~keep, want)
    assert np.array_equal(lung_mask._touching_other_label(labels, keep),  # pylint: disable=protected-access
                          want)
    assert got[labels == 1].any() and not np.array_equal(got, labels > 0)
