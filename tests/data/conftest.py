"""Fixtures for the data tests: tiny NIfTI files written into tmp_path."""

import numpy as np
import nibabel as nib
import pytest

# LAS, like dcm2niix output: x flipped (i grows to the patient's left).
LAS = np.diag([-1.0, 1.0, 1.0, 1.0])


def affine_for(spacing_xyz, orientation=None, origin=(10.0, -20.0, 30.0)):
  """Affine with the given voxel size; ``orientation`` a 4x4 sign/permutation matrix."""
  aff = np.diag(list(spacing_xyz) + [1.0])
  if orientation is not None:
    aff = orientation @ aff
  aff[:3, 3] = origin
  return aff


def save_nifti(path, data, affine, slope=None, inter=None, dtype=None):
  """Writes ``data`` (stored order i, j, k) with an affine and optional scaling."""
  data = np.asarray(data)
  img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  if slope is not None or inter is not None:
    img.header.set_slope_inter(1.0 if slope is None else slope, 0.0 if inter is None else inter)
  nib.save(img, str(path))
  return path


def phantom_zyx(shape_zyx=(24, 48, 48), spacing_zyx=(10.0, 7.0, 7.0), seed=0):
  """Simple chest phantom in canonical [D, H, W] (RAS+).

  Air -1000 HU outside, an ellipsoidal body at ~0 HU, two ellipsoidal lungs at ~-850 HU
  (left and right of the midline), Gaussian noise of 20 HU.

  Returns:
    (hu float32 [D, H, W], true lung mask uint8 [D, H, W]).
  """
  rng = np.random.default_rng(seed)
  d, h, w = shape_zyx
  sz, sy, sx = spacing_zyx
  z, y, x = np.meshgrid((np.arange(d) - (d - 1) / 2) * sz, (np.arange(h) - (h - 1) / 2) * sy,
                        (np.arange(w) - (w - 1) / 2) * sx, indexing="ij")
  body = (x / 150.0) ** 2 + (y / 110.0) ** 2 + (z / 200.0) ** 2 <= 1.0
  lungs = np.zeros(shape_zyx, bool)
  for cx in (-65.0, 65.0):
    lungs |= ((x - cx) / 50.0) ** 2 + (y / 70.0) ** 2 + (z / 95.0) ** 2 <= 1.0
  hu = np.full(shape_zyx, -1000.0, np.float32)
  hu[body] = 40.0
  hu[lungs] = -850.0
  hu += rng.normal(0.0, 20.0, shape_zyx).astype(np.float32)
  return hu, lungs.astype(np.uint8)


@pytest.fixture
def nifti(tmp_path):
  """Factory: nifti(name, data_ijk, spacing_xyz=(2, 2, 4), orientation=None, **kw) -> path."""

  def make(name, data, spacing_xyz=(2.0, 2.0, 4.0), orientation=None, **kw):
    return save_nifti(tmp_path / name, data, affine_for(spacing_xyz, orientation), **kw)

  return make


@pytest.fixture
def ct_case(tmp_path):
  """A tiny CT (HU, int16 with intercept -1024, LAS) with lung and infection masks.

  Returns:
    dict(image, lung_mask, infection_mask paths; hu [D, H, W] canonical; lung, infection
    canonical masks; spacing_zyx).
  """
  hu, lung = phantom_zyx(shape_zyx=(16, 32, 32), spacing_zyx=(10.0, 10.0, 10.0))
  infection = np.zeros_like(lung)
  infection[6:10, 12:20, 6:12] = 1
  infection &= lung
  spacing_xyz = (10.0, 10.0, 10.0)
  aff = affine_for(spacing_xyz, LAS)
  # Canonical (RAS) -> LAS stored: x reversed.
  to_stored = lambda a: np.ascontiguousarray(a.transpose(2, 1, 0)[::-1])
  raw = np.round(hu).astype(np.int32) + 1024
  paths = {
      "image": save_nifti(tmp_path / "ct.nii.gz", raw.astype(np.int16).transpose(2, 1, 0)[::-1],
                          aff, slope=1.0, inter=-1024.0),
      "lung_mask": save_nifti(tmp_path / "lung.nii.gz", to_stored(lung), aff, dtype=np.uint8),
      "infection_mask": save_nifti(tmp_path / "inf.nii.gz", to_stored(infection), aff,
                                   dtype=np.uint8),
  }
  return dict(paths, hu=np.round(hu).astype(np.float32), lung=lung, infection=infection,
              spacing_zyx=(10.0, 10.0, 10.0), affine=aff)
