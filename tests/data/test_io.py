"""NIfTI reading: canonical layout, HU scaling, and the bad-input matrix (issue 6)."""

import gzip
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from dsan_jax.data import io
from dsan_jax.errors import DataError
from tests.data.conftest import LAS, affine_for, save_nifti

# A permuted and flipped orientation: stored axes (j, i, k) with flips on two of them.
PERMUTED = np.array([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0],
                     [0.0, 0.0, 0.0, 1.0]])


def _ct(shape=(12, 10, 8), seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(-1024, 1500, size=shape).astype(np.int16)


@pytest.mark.parametrize("orientation", [None, LAS, PERMUTED], ids=["RAS", "LAS", "permuted"])
def test_canonical_layout_matches_nibabel(tmp_path, orientation):
  data = _ct()
  aff = affine_for((0.7, 0.8, 2.5), orientation)
  path = save_nifti(tmp_path / "ct.nii.gz", data, aff)
  vol = io.read_volume(path)
  ref = nib.as_closest_canonical(nib.load(str(path)))
  np.testing.assert_array_equal(vol.array, np.asarray(ref.dataobj).transpose(2, 1, 0))
  np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
  np.testing.assert_allclose(vol.spacing_zyx, np.asarray(ref.header.get_zooms())[::-1], rtol=1e-6)
  assert vol.array.dtype == np.float32
  assert vol.original_shape == data.shape
  np.testing.assert_allclose(vol.original_affine, aff, atol=1e-6)
  # The inverse brings it back to the stored order exactly.
  np.testing.assert_array_equal(io.to_original_orientation(vol.array, vol.original_affine), data)


def test_slope_intercept_applied(tmp_path):
  raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 10
  path = save_nifti(tmp_path / "ct.nii.gz", raw, np.eye(4), slope=2.0, inter=-1024.0)
  vol = io.read_volume(path)
  np.testing.assert_array_equal(vol.array, (raw.astype(np.float32) * 2 - 1024).transpose(2, 1, 0))


def test_four_d_with_one_volume_is_squeezed(nifti):
  data = _ct()[..., None]
  vol = io.read_volume(nifti("ct.nii.gz", data, spacing_xyz=(0.7, 0.7, 2.0)))
  assert vol.array.shape == (8, 10, 12)
  assert vol.spacing_zyx == pytest.approx((2.0, 0.7, 0.7))
  np.testing.assert_array_equal(vol.array, data[..., 0].transpose(2, 1, 0))


def test_mask_binarised(tmp_path):
  m = np.zeros((6, 6, 6), np.uint8)
  m[1:3] = 2  # Multi-label masks (left = 1, right = 2) count as lung.
  m[4] = 1
  vol = io.read_volume(save_nifti(tmp_path / "m.nii.gz", m, np.eye(4)), is_mask=True)
  assert set(np.unique(vol.array)) == {0.0, 1.0}
  assert vol.array.sum() == 3 * 36
  soft = np.array([0.0, 0.2, 0.49, 0.5, 0.9, 1.0] * 36, np.float32).reshape(6, 6, 6)
  vol = io.read_volume(save_nifti(tmp_path / "p.nii.gz", soft, np.eye(4)), is_mask=True)
  assert vol.array.sum() == 3 * 36  # Probabilities: >= 0.5.


def _write_truncated(tmp_path):
  path = save_nifti(tmp_path / "ok.nii.gz", _ct((64, 64, 32)), np.eye(4))
  blob = path.read_bytes()
  bad = tmp_path / "truncated.nii.gz"
  bad.write_bytes(blob[: len(blob) // 2])
  return bad


def _zero_spacing(tmp_path):
  """pixdim = (0.7, 0, 2.0) with no sform/qform: nibabel builds the affine from pixdim."""
  img = nib.Nifti1Image(_ct(), None)
  img.header.set_zooms((0.7, 0.0, 2.0))
  img.header.set_sform(None, code=0)
  img.header.set_qform(None, code=0)
  path = tmp_path / "zero.nii.gz"
  nib.save(img, str(path))
  return path


def _bad_inputs(tmp_path):
  """name -> (path, regex the one-line cause must match)."""
  cases = {}
  cases["missing"] = (tmp_path / "nope.nii.gz", "file not found")
  empty = tmp_path / "empty.nii.gz"
  empty.write_bytes(b"")
  cases["empty"] = (empty, "empty file")
  cases["truncated_gz"] = (_write_truncated(tmp_path), "truncated or corrupt")
  text = tmp_path / "text.nii.gz"
  text.write_bytes(gzip.compress(b"patient,label\n1,covid\n" * 50))
  cases["not_nifti"] = (text, "not a readable NIfTI")
  cases["2d"] = (save_nifti(tmp_path / "2d.nii.gz", _ct((16, 16)), np.eye(4)), "2D image")
  cases["one_slice"] = (save_nifti(tmp_path / "slice.nii.gz", _ct((16, 16, 1)), np.eye(4)),
                        "is 2D")
  cases["4d"] = (save_nifti(tmp_path / "4d.nii.gz", _ct((8, 8, 8, 3)), np.eye(4)),
                 "4D image .* holds 3 volumes")
  nan = _ct().astype(np.float32)
  nan[1, 2, 3] = np.nan
  cases["nan"] = (save_nifti(tmp_path / "nan.nii.gz", nan, np.eye(4)), "1 NaN or Inf voxels")
  inf = _ct().astype(np.float32)
  inf[0, 0, 0] = np.inf
  inf[1, 1, 1] = -np.inf
  cases["inf"] = (save_nifti(tmp_path / "inf.nii.gz", inf, np.eye(4)), "2 NaN or Inf voxels")
  cases["zero_spacing"] = (_zero_spacing(tmp_path), "voxel spacing")
  cases["extreme_spacing"] = (save_nifti(tmp_path / "big.nii.gz", _ct(),
                                         affine_for((0.7, 0.7, 80.0))), "voxel spacing")
  raw = np.random.default_rng(0).integers(0, 4096, size=(12, 10, 8)).astype(np.uint16)
  cases["not_hu"] = (save_nifti(tmp_path / "raw.nii.gz", raw, np.eye(4)),
                     "raw unsigned scanner values")
  cases["constant"] = (save_nifti(tmp_path / "air.nii.gz", np.full((8, 8, 8), -1000, np.int16),
                                  np.eye(4)), "constant image")
  return cases


BAD = ["missing", "empty", "truncated_gz", "not_nifti", "2d", "one_slice", "4d", "nan", "inf",
       "zero_spacing", "extreme_spacing", "not_hu", "constant"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_matrix(tmp_path, name):
  path, pattern = _bad_inputs(tmp_path)[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # nibabel warns about zero pixdims; the error is ours.
    with pytest.raises(DataError, match=pattern) as info:
      io.read_volume(path)
  err = info.value
  assert err.path == str(path)
  assert "\n" not in str(err)
  assert str(err).startswith(str(path))


def test_raw_values_with_intercept_are_accepted(tmp_path):
  """Same unsigned values, but the header says how to get HU: accepted (rule is documented)."""
  raw = np.random.default_rng(0).integers(0, 4096, size=(12, 10, 8)).astype(np.uint16)
  vol = io.read_volume(save_nifti(tmp_path / "raw.nii.gz", raw.astype(np.int16), np.eye(4),
                                  slope=1.0, inter=-1024.0))
  assert vol.array.min() < 0


def test_body_cropped_positive_values_below_rule_accepted(tmp_path):
  data = np.random.default_rng(0).integers(0, 1500, size=(12, 10, 8)).astype(np.int16)
  assert io.read_volume(save_nifti(tmp_path / "ct.nii.gz", data, np.eye(4))).array.max() < 1500


def test_read_header_is_cheap_and_agrees(tmp_path):
  aff = affine_for((0.7, 0.8, 2.5), PERMUTED)
  path = save_nifti(tmp_path / "ct.nii.gz", _ct(), aff)
  h = io.read_header(path)
  vol = io.read_volume(path)
  assert h.canonical_shape_zyx == vol.array.shape
  np.testing.assert_allclose(h.canonical_affine, vol.affine)
  assert h.spacing_zyx == vol.spacing_zyx


def test_write_nifti_atomic_roundtrip(tmp_path):
  data = _ct().astype(np.float32)
  aff = affine_for((0.7, 0.8, 2.5), LAS)
  out = io.write_nifti(tmp_path / "sub" / "out.nii.gz", data, aff)
  img = nib.load(str(out))
  np.testing.assert_array_equal(np.asarray(img.dataobj), data)
  np.testing.assert_allclose(img.affine, aff, atol=1e-6)
  assert sorted(os.listdir(out.parent)) == ["out.nii.gz"]


def test_write_nifti_failure_leaves_nothing(tmp_path, monkeypatch):
  def boom(img, filename):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(io.nib, "save", boom)
  with pytest.raises(OSError, match="disk full"):
    io.write_nifti(tmp_path / "out.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
  assert os.listdir(tmp_path) == []


def test_zero_spacing_in_sform_refused(tmp_path):
  img = nib.Nifti1Image(_ct(), np.eye(4))
  aff = np.diag([0.7, 0.7, 0.0, 1.0])
  img.set_sform(aff, code=1)
  img.header.set_qform(None, code=0)
  path = tmp_path / "sform0.nii.gz"
  nib.save(img, str(path))
  with pytest.raises(DataError, match="voxel spacing \\(0.0, 0.7, 0.7\\) mm is zero"):
    io.read_volume(path)
