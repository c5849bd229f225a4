"""Issue 14's speed-ups give the same voxels as the slower code they replace.

* ``io.read_volume``: .nii.gz decompressed in one call (ISA-L or zlib) or streamed in slabs
  (``io.STREAM_SLAB``), reoriented in the stored dtype, scaled in float32 -> the same array as
  nibabel's canonical image scaled in float32, for both decompressors.
* ``lung_mask.convex_hull_2d`` -> the pixels of ``skimage.morphology.convex_hull_image``.
* ``infection_ratio.estimate`` on the lung's box -> the openings of the whole volume.
"""

import gzip
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import convex_hull_image

from dsan_jax.data import infection_ratio as ir
from dsan_jax.data import io
from dsan_jax.data import lung_mask
from dsan_jax.data import morphology
from dsan_jax.errors import DataError
from tests.data.conftest import LAS, affine_for, save_nifti

PERMUTED = np.array([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0],
                     [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(params=[True, False], ids=["isal", "zlib"])
def decompressor(request, monkeypatch):
  if request.param:
    pytest.importorskip("isal")
  monkeypatch.setattr(io, "USE_ISAL", request.param)
  return request.param


# k -> y (a coronal stack): not streamed (the k axis is not the canonical z axis).
CORONAL_STACK = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(params=[4, 3, 0], ids=["slabs4", "slabs3", "whole"])
def stream_slab(request, monkeypatch):
  """``io.STREAM_SLAB``: streamed .nii.gz reads in slabs of 4 or 3 k-slices, or none."""
  monkeypatch.setattr(io, "STREAM_SLAB", request.param)
  return request.param


@pytest.mark.parametrize("orientation", [LAS, PERMUTED, CORONAL_STACK],
                         ids=["LAS", "permuted", "coronal"])
@pytest.mark.parametrize("dtype,slope,inter", [(np.int16, 1.0, -1024.0), (np.uint16, 0.5, -1024.0),
                                               (np.float32, 1.0, 0.0), (">i2", 2.0, 0.0)])
def test_fast_read_equals_nibabel(tmp_path, decompressor, stream_slab, orientation, dtype, slope,
                                  inter):
  rng = np.random.default_rng(0)
  data = (rng.integers(0, 3000, size=(13, 10, 7)) - (1024 if inter == 0 else 0)).astype(dtype)
  path = save_nifti(tmp_path / "ct.nii.gz", data, affine_for((0.7, 0.8, 2.5), orientation),
                    slope=slope, inter=inter)
  vol = io.read_volume(path)
  img = nib.load(str(path))
  # float32 scaling in the stored order, as documented (nibabel's own runs in float64), then
  # nibabel's canonical reorientation.
  scaled = np.asarray(img.dataobj.get_unscaled()).astype(np.float32)
  scaled = scaled * np.float32(slope) + np.float32(inter)
  ref = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(scaled, img.affine)).dataobj)
  np.testing.assert_array_equal(vol.array, ref.transpose(2, 1, 0))
  assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
  # pylint: disable-next=protected-access
  streamed = io._streamed_canonical(path, img, io.read_header(path), float(img.dataobj.slope),
                                    float(img.dataobj.inter))
  assert (streamed is not None) == (stream_slab > 0 and orientation is not CORONAL_STACK)


def test_fast_read_refuses_short_and_damaged_gzip(tmp_path, decompressor, stream_slab):
  path = save_nifti(tmp_path / "ok.nii.gz", np.zeros((16, 16, 8), np.int16) - 1000, np.eye(4))
  raw = gzip.decompress(path.read_bytes())
  short = tmp_path / "short.nii.gz"  # A valid gzip stream holding too few voxel bytes.
  short.write_bytes(gzip.compress(raw[:-100]))
  damaged = tmp_path / "damaged.nii.gz"  # The gzip stream itself cut short.
  damaged.write_bytes(path.read_bytes()[:-40])
  crc = tmp_path / "crc.nii.gz"  # Every voxel there, the CRC at the end wrong.
  data = bytearray(path.read_bytes())
  data[-8] ^= 0xFF
  crc.write_bytes(bytes(data))
  for bad in (short, damaged, crc):
    with pytest.raises(DataError, match="cannot read voxel data, truncated or corrupt"):
      io.read_volume(bad)


def test_streamed_read_refuses_nan_and_keeps_the_value_checks(tmp_path, stream_slab):
  data = np.full((12, 10, 9), -800.0, np.float32)
  data[3, 4, 8] = np.nan  # In the last (short) slab.
  path = save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
  with pytest.raises(DataError, match="1 NaN or Inf voxels"):
    io.read_volume(path)
  raw = save_nifti(tmp_path / "raw.nii.gz", np.full((12, 10, 9), 3000, np.int16), np.eye(4))
  with pytest.raises(DataError, match="constant image"):
    io.read_volume(raw)
  data = np.zeros((12, 10, 9), np.int16)
  data[..., 8] = 3000  # Raw unsigned values, the maximum in the last slab only.
  with pytest.raises(DataError, match="raw unsigned scanner values"):
    io.read_volume(save_nifti(tmp_path / "raw2.nii.gz", data, np.eye(4)))


def test_convex_hull_2d_equals_skimage():
  rng = np.random.default_rng(1)
  shapes = [np.ones((1, 1), bool), np.ones((1, 5), bool), np.eye(6, dtype=bool)]
  for _ in range(200):
    h, w = (int(n) for n in rng.integers(2, 40, 2))
    img = ndimage.binary_dilation(rng.random((h, w)) > 0.96, iterations=int(rng.integers(0, 3)))
    if img.any():
      shapes.append(img)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # skimage warns on degenerate hulls.
    for img in shapes:
      np.testing.assert_array_equal(lung_mask.convex_hull_2d(img), convex_hull_image(img))


def test_ratio_estimate_on_the_lung_box_equals_the_whole_volume():
  rng = np.random.default_rng(2)
  d, h, w = 24, 48, 200  # 300 mm across at 1.5 mm: no field-of-view scaling.
  lung = np.zeros((d, h, w), bool)
  lung[1:23, 0:40, 100:200] = True  # 495 mL; touches two borders of the array.
  lung[1:5, 10:30, 10:60] = True
  hu = np.where(rng.random((d, h, w)) < 0.3, 0.0, -850.0).astype(np.float32)
  hu[2:4, 5:20, 160:190] = -500.0
  hu[2:4, 15:25, 20:40] = 20.0
  est = ir.estimate(hu, lung, (2.5, 1.5, 1.5))
  ref = np.zeros_like(lung)
  # GGO: 3 mm -> 2 px in-plane, +-2.5 mm -> 1 slice; dense: 4 mm -> 3 px, in-plane only.
  for (lo, hi), structure in ((ir.GGO_HU, np.repeat(morphology.disk(2)[None], 3, axis=0)),
                              (ir.DENSE_HU, morphology.disk(3)[None])):
    ref |= ndimage.binary_opening(lung & (hu >= lo) & (hu < hi), structure=structure)
  assert ref.any()
  np.testing.assert_array_equal(est.dense, ref)


@pytest.mark.slow
def test_real_ct_fast_read_equals_nibabel(real_ct_dir, monkeypatch):
  path = real_ct_dir / "P002.nii.gz"
  img = nib.as_closest_canonical(nib.load(str(path)))
  # slope 1, intercept -1024 on int16: float64 and float32 scaling agree exactly.
  ref = np.asarray(img.dataobj, np.float64).astype(np.float32).transpose(2, 1, 0)
  for use_isal in (True, False):
    monkeypatch.setattr(io, "USE_ISAL", use_isal)
    np.testing.assert_array_equal(io.read_volume(path).array, ref)
