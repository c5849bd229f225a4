"""DICOM series input (dsan_jax.data.dicom through io.read_header / read_volume), issue 14.

Small synthetic series are written here with pydicom; the real JPEG-lossless series of P002 is
checked against dcm2niix's NIfTI of it (slow; skipped where ../shared is absent).
"""

import logging
import os
import shutil
import time

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
import pydicom.uid
import pytest

from dsan_jax.data import cache as cache_lib
from dsan_jax.data import dicom
from dsan_jax.data import io
from dsan_jax.data import manifest as manifest_lib
from dsan_jax.data import preprocess
from dsan_jax.errors import DataError, ManifestError
from tests.data.conftest import save_nifti
from tests.test_end_to_end import trained_workdir  # noqa: F401  (a fixture)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
_C, _S = np.cos(np.radians(25.0)), np.sin(np.radians(25.0))
OBLIQUE = (_C, _S, 0.0, -_S * 0.8, _C * 0.8, 0.6)  # Rotated about z, then tipped.
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"


def _write_image(path, pixels, position, orientation=AXIAL, spacing=(0.8, 0.7), *,
                 series_uid=SERIES_UID, instance=1, modality="CT", slope=1.0,
                 intercept=-1024.0, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 description="chest", transfer_syntax=pydicom.uid.ExplicitVRLittleEndian,
                 pixel_bytes=None):
  """One single-frame image; ``pixels`` [rows, columns] stored values (uint16)."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
  meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  meta.TransferSyntaxUID = transfer_syntax
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = modality, series_uid, description
  ds.ImageType = list(image_type)
  ds.InstanceNumber = instance
  ds.ImagePositionPatient = [float(v) for v in position]
  ds.ImageOrientationPatient = [float(v) for v in orientation]
  ds.PixelSpacing = list(spacing)
  ds.SliceThickness = 2.0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  if pixel_bytes is None:
    ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
  else:  # Encapsulated (compressed) pixel data, taken as given.
    ds.PixelData = encapsulate([pixel_bytes])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
  ds.save_as(str(path), enforce_file_format=True)
  return path


def _series(folder, n=8, rows=16, columns=12, orientation=AXIAL, spacing=(0.8, 0.7), step=2.0,
            origin=(-40.0, -60.0, 100.0), seed=0, slope=1.0, intercept=-1024.0, **tags):
  """Writes a regular stack; file names run against the position order, instance numbers
  are shuffled.

  Returns:
    (folder, hu [n, rows, columns] float32 in increasing position order, positions [n, 3],
    orientation (6,), spacing).
  """
  folder.mkdir(parents=True, exist_ok=True)
  o = np.asarray(orientation)
  normal = np.cross(o[:3], o[3:])
  rng = np.random.default_rng(seed)
  stored = rng.integers(0, 2500, size=(n, rows, columns)).astype(np.uint16)
  positions = np.asarray(origin) + step * np.arange(n)[:, None] * normal
  instances = rng.permutation(n) + 1  # Neither names nor instance numbers follow positions.
  for k in range(n):  # IM0001 is the highest position (like P002).
    _write_image(folder / f"IM{n - k:04d}.dcm", stored[k], positions[k], orientation, spacing,
                 instance=int(instances[k]), slope=slope, intercept=intercept, **tags)
  hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
  return folder, hu, positions, o, spacing


def _world_check(vol, hu, positions, orientation, spacing):
  """Every DICOM pixel, placed by the standard's formula, sits at its canonical voxel."""
  n, rows, columns = hu.shape
  k, r, c = (a.ravel() for a in np.indices(hu.shape))
  x, y = orientation[:3], orientation[3:]
  lps = positions[k] + (c * spacing[1])[:, None] * x + (r * spacing[0])[:, None] * y
  ras = lps * np.array([-1.0, -1.0, 1.0])
  ijk = (np.linalg.inv(vol.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
  idx = np.round(ijk).astype(int)
  np.testing.assert_allclose(ijk, idx, atol=1e-6)
  np.testing.assert_array_equal(vol.array[idx[:, 2], idx[:, 1], idx[:, 0]], hu[k, r, c])


def _one_line_error(excinfo, named, cause):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  assert msg.startswith(f"{named}: "), msg
  assert cause in msg, msg
  return msg


# ------------------------------------------------------------------ reading and geometry.


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, OBLIQUE],
                         ids=["axial", "coronal", "oblique"])
def test_voxels_and_affine_follow_the_dicom_geometry(tmp_path, orientation):
  folder, hu, pos, o, spacing = _series(tmp_path / "s", orientation=orientation, slope=2.0)
  vol = io.read_volume(folder)
  assert vol.array.dtype == np.float32 and vol.array.size == hu.size
  _world_check(vol, hu, pos, o, spacing)
  header = io.read_header(folder)
  np.testing.assert_allclose(header.canonical_affine, vol.affine, atol=1e-9)
  assert header.shape == vol.original_shape == (12, 16, 8)  # (columns, rows, slices).
  assert sorted(vol.spacing_zyx) == pytest.approx(sorted((2.0, 0.8, 0.7)))


def test_axial_layout_is_dcm2niix_and_round_trips(tmp_path):
  folder, hu, pos, _, _ = _series(tmp_path / "s")
  vol = io.read_volume(folder)
  assert vol.spacing_zyx == pytest.approx((2.0, 0.8, 0.7))
  # Canonical RAS: z up the stack, y anterior (rows reversed), x right (columns reversed).
  np.testing.assert_array_equal(vol.array, hu[:, ::-1, ::-1])
  # Stored like dcm2niix: i = column, j = row reversed, k = position order.
  stored = io.to_original_orientation(vol.array, vol.original_affine)
  np.testing.assert_array_equal(stored, hu.transpose(2, 1, 0)[:, ::-1, :])
  np.testing.assert_allclose(vol.original_affine[:3, 3], [40.0, 60.0 - 15 * 0.8, 100.0])


def test_rescale_applied_per_slice(tmp_path):
  folder = tmp_path / "s"
  folder.mkdir()
  stored = np.full((16, 12), 1000, np.uint16)
  stored[0, 0] = 0
  for k, (slope, inter) in enumerate([(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0)]):
    _write_image(folder / f"{k}.dcm", stored, (0.0, 0.0, 3.0 * k), slope=slope, intercept=inter)
  vol = io.read_volume(folder)
  np.testing.assert_array_equal(vol.array[:, 0, 0], [-24.0, -48.0, -500.0])


def test_mask_series_of_any_modality(tmp_path):
  folder, hu, *_ = _series(tmp_path / "m", modality="OT", slope=1.0, intercept=0.0)
  vol = io.read_volume(folder, is_mask=True)
  np.testing.assert_array_equal(vol.array, (hu > 0)[:, ::-1, ::-1].astype(np.float32))
  io.read_header(folder, is_mask=True)
  with pytest.raises(DataError, match="modality 'OT', expected CT"):
    io.read_header(folder)


def test_several_series_are_listed_and_one_is_picked(tmp_path):
  folder, hu, *_ = _series(tmp_path / "s", description="lung kernel")
  for k in range(4):
    _write_image(folder / f"other{k}.dcm", np.zeros((16, 12), np.uint16), (0, 0, 5.0 * k),
                 series_uid="1.2.3.4", description="bone kernel", instance=k)
  with pytest.raises(DataError) as e:
    io.read_header(folder)
  msg = _one_line_error(e, folder, "holds 2 series")
  for part in (f"{folder}#<SeriesInstanceUID>", SERIES_UID, "'lung kernel' (8 CT images)",
               "1.2.3.4 'bone kernel' (4 CT images)"):
    assert part in msg, msg
  picked = io.read_volume(f"{folder}#{SERIES_UID}")
  np.testing.assert_array_equal(picked.array, hu[:, ::-1, ::-1])
  assert io.read_header(f"{folder}#1.2.3.4").shape == (12, 16, 4)
  with pytest.raises(DataError) as e:
    io.read_header(f"{folder}#9.9.9")
  _one_line_error(e, folder, "no series '9.9.9'")


def _lossless_jpeg_series(folder, n=6):
  """A JPEG Lossless (Process 14) series encoded by imagecodecs; returns (folder, hu)."""
  imagecodecs = pytest.importorskip("imagecodecs")
  folder.mkdir()
  stored = np.random.default_rng(1).integers(0, 4095, size=(n, 16, 12)).astype(np.uint16)
  for k in range(n):
    _write_image(folder / f"{k}.dcm", stored[k], (0.0, 0.0, 2.0 * k),
                 transfer_syntax=pydicom.uid.JPEGLossless,
                 pixel_bytes=imagecodecs.ljpeg_encode(stored[k]))
  return folder, stored.astype(np.float32) - 1024


def test_lossless_jpeg_decodes_alike_with_imagecodecs_and_pylibjpeg(tmp_path, monkeypatch,
                                                                    caplog):
  folder, hu = _lossless_jpeg_series(tmp_path / "s")
  fast = io.read_volume(folder)
  monkeypatch.setattr(dicom, "USE_IMAGECODECS", False)  # pydicom + pylibjpeg only.
  reference = io.read_volume(folder)
  np.testing.assert_array_equal(fast.array, hu[:, ::-1, ::-1])
  np.testing.assert_array_equal(reference.array, fast.array)
  # A fast decoder that disagrees on the first slice is dropped for the whole series.
  monkeypatch.setattr(dicom, "USE_IMAGECODECS", True)
  monkeypatch.setattr(dicom, "_fast_decoder", lambda: lambda frame: np.zeros((16, 12), np.uint16))
  with caplog.at_level(logging.WARNING, logger="dsan_jax"):
    np.testing.assert_array_equal(io.read_volume(folder).array, fast.array)
  assert any("decode 0.dcm differently; using pydicom" in r.getMessage() for r in caplog.records)


def test_files_that_are_not_dicom_images_are_ignored(tmp_path):
  folder, hu, *_ = _series(tmp_path / "s")
  (folder / "README.txt").write_text("exported by PACS")
  (folder / ".DS_Store").write_bytes(b"\0" * 64)
  np.testing.assert_array_equal(io.read_volume(folder).array, hu[:, ::-1, ::-1])


@pytest.mark.slow
def test_real_series_matches_dcm2niix(real_ct_dir):
  """P002's JPEG-lossless series against dcm2niix's NIfTI: same voxels, affines within 1e-3."""
  folder = real_ct_dir / "dicom" / "P002"
  if not folder.is_dir():
    pytest.skip(f"no DICOM series at {folder}")
  header = io.read_header(folder)
  t0 = time.perf_counter()
  vol = io.read_volume(folder)
  seconds = time.perf_counter() - t0
  ref = io.read_volume(real_ct_dir / "P002.nii.gz")
  np.testing.assert_array_equal(vol.array, ref.array)
  np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-3)
  np.testing.assert_allclose(vol.original_affine, ref.original_affine, atol=1e-3)
  assert vol.original_shape == ref.original_shape == header.shape == (512, 512, 133)
  assert vol.spacing_zyx == pytest.approx(ref.spacing_zyx, abs=1e-5)
  print(f"P002 DICOM series read in {seconds:.2f} s "
        f"(imagecodecs: {dicom._fast_decoder() is not None})")


@pytest.mark.slow
def test_real_series_decodes_alike_with_both_decoders(real_ct_dir, tmp_path, monkeypatch):
  pytest.importorskip("imagecodecs")
  folder = real_ct_dir / "dicom" / "P002"
  if not folder.is_dir():
    pytest.skip(f"no DICOM series at {folder}")
  part = tmp_path / "P002_part"  # 12 consecutive slices, so that the test stays short.
  part.mkdir()
  for k in range(60, 72):
    shutil.copy(folder / f"IM{k:04d}.dcm", part)
  fast = io.read_volume(part)
  monkeypatch.setattr(dicom, "USE_IMAGECODECS", False)
  np.testing.assert_array_equal(io.read_volume(part).array, fast.array)


# ------------------------------------------------------------------------- bad input.


def test_missing_slice_is_refused(tmp_path):
  folder, *_ = _series(tmp_path / "s")
  os.remove(folder / "IM0004.dcm")  # Position index 4 of 0..7.
  with pytest.raises(DataError) as e:
    io.read_header(folder)
  msg = _one_line_error(e, folder, "missing slices: a gap of 4 mm between IM0005.dcm and "
                        "IM0003.dcm")
  assert "about 1 slice(s) missing" in msg


def test_duplicate_position_is_refused(tmp_path):
  folder, *_ = _series(tmp_path / "s")
  shutil.copy(folder / "IM0003.dcm", folder / "copy_of_IM0003.dcm")
  with pytest.raises(DataError) as e:
    io.read_volume(folder)
  _one_line_error(e, folder, "duplicate slice position")
  assert "IM0003.dcm and copy_of_IM0003.dcm" in str(e.value)


def test_non_uniform_spacing_and_tilt_are_refused(tmp_path):
  uneven = tmp_path / "uneven"
  uneven.mkdir()
  for k, z in enumerate([0.0, 2.0, 4.0, 6.8, 8.8, 10.8]):
    _write_image(uneven / f"{k}.dcm", np.zeros((16, 12), np.uint16), (0.0, 0.0, z))
  with pytest.raises(DataError) as e:
    io.read_header(uneven)
  _one_line_error(e, uneven, "non-uniform slice spacing")
  tilted = tmp_path / "tilted"
  tilted.mkdir()
  for k in range(6):  # 2 mm steps along z, each shifted 0.5 mm in y: a 14 degree tilt.
    _write_image(tilted / f"{k}.dcm", np.zeros((16, 12), np.uint16), (0.0, 0.5 * k, 2.0 * k))
  with pytest.raises(DataError) as e:
    io.read_header(tilted)
  msg = _one_line_error(e, tilted, "gantry tilt")
  assert "14.04 degrees" in msg


def test_localizer_is_dropped_with_a_note(tmp_path, caplog):
  folder, hu, *_ = _series(tmp_path / "s")
  _write_image(folder / "IM0000.dcm", np.zeros((16, 12), np.uint16), (0.0, 0.0, 0.0),
               orientation=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
  with caplog.at_level(logging.WARNING, logger="dsan_jax"):
    vol = io.read_volume(folder)
  np.testing.assert_array_equal(vol.array, hu[:, ::-1, ::-1])
  notes = [r.getMessage() for r in caplog.records if "localizer" in r.getMessage()]
  assert len(notes) == 1 and str(folder) in notes[0] and "IM0000.dcm" in notes[0], notes


def test_unflagged_scout_is_refused(tmp_path):
  folder, *_ = _series(tmp_path / "s")
  scout = _write_image(folder / "scout.dcm", np.zeros((16, 12), np.uint16), (0.0, 0.0, 0.0),
                       orientation=CORONAL)
  with pytest.raises(DataError) as e:
    io.read_header(folder)
  _one_line_error(e, scout, "differs from the rest of the series")


def test_non_ct_modality_is_refused(tmp_path):
  folder, *_ = _series(tmp_path / "s", modality="MR")
  with pytest.raises(DataError) as e:
    io.read_header(folder)
  _one_line_error(e, folder / "IM0001.dcm", "modality 'MR', expected CT")


@pytest.mark.parametrize("threads", [1, 3])
def test_threaded_decoding_equals_serial_and_names_the_first_bad_slice(tmp_path, monkeypatch,
                                                                       threads):
  monkeypatch.setattr(dicom, "DECODE_THREADS", threads)
  folder, hu = _lossless_jpeg_series(tmp_path / "s")
  np.testing.assert_array_equal(io.read_volume(folder).array, hu[:, ::-1, ::-1])
  for k in (4, 2):  # Two damaged slices: the error names the first in slice order.
    _write_image(folder / f"{k}.dcm", np.zeros((16, 12), np.uint16), (0.0, 0.0, 2.0 * k),
                 transfer_syntax=pydicom.uid.JPEGLossless,
                 pixel_bytes=b"\xff\xd8\xff\xc3" + bytes(range(256)) * 4)
  with pytest.raises(DataError) as e:
    io.read_volume(folder)
  _one_line_error(e, folder / "2.dcm", "cannot decode the pixel data")


@pytest.mark.parametrize("imagecodecs", [True, False], ids=["imagecodecs", "pydicom"])
def test_undecodable_compressed_pixel_data_is_refused(tmp_path, monkeypatch, imagecodecs):
  monkeypatch.setattr(dicom, "USE_IMAGECODECS", imagecodecs)
  folder, *_ = _series(tmp_path / "s", n=4)
  bad = _write_image(folder / "IM0000.dcm", np.zeros((16, 12), np.uint16), (-40, -60, 108.0),
                     transfer_syntax=pydicom.uid.JPEGLosslessSV1,
                     pixel_bytes=b"\xff\xd8\xff\xc3" + bytes(range(256)) * 4)
  io.read_header(folder)  # The headers are fine...
  with pytest.raises(DataError) as e:
    io.read_volume(folder)  # ... the pixels are not.
  _one_line_error(e, bad, "cannot decode the pixel data (transfer syntax JPEG Lossless")


def test_a_single_dicom_file_is_refused_with_a_hint(tmp_path):
  folder, *_ = _series(tmp_path / "s", n=3)
  with pytest.raises(DataError) as e:
    io.read_header(folder / "IM0001.dcm")
  _one_line_error(e, folder / "IM0001.dcm", "is one DICOM file; pass the folder of its series")


def test_truncated_file_empty_folder_and_too_few_slices(tmp_path):
  folder, *_ = _series(tmp_path / "s")
  data = (folder / "IM0002.dcm").read_bytes()
  for cut, cause in ((400, "truncated or corrupt"),  # In the header...
                     (len(data) - 100, "pixel data is less than expected")):  # ... in the pixels.
    (folder / "IM0002.dcm").write_bytes(data[:cut])
    with pytest.raises(DataError) as e:
      io.read_volume(folder)
    _one_line_error(e, folder / "IM0002.dcm", cause)
  empty = tmp_path / "empty"
  (empty / "study" / "series").mkdir(parents=True)
  with pytest.raises(DataError) as e:
    io.read_header(empty)
  _one_line_error(e, empty, "no DICOM images in the folder (0 files); it has subfolders (study)")
  odd = _write_image(folder / "IM0002.dcm", np.zeros((16, 12), np.uint16), (0, 0, 0))
  ds = pydicom.dcmread(odd)
  ds.PixelSpacing = [0.8]  # One value where two are required.
  ds.save_as(odd)
  with pytest.raises(DataError) as e:
    io.read_header(folder)
  _one_line_error(e, odd, "malformed DICOM tag")
  few, *_ = _series(tmp_path / "few", n=2)
  with pytest.raises(DataError) as e:
    io.read_header(few)
  _one_line_error(e, few, "the series has 2 image(s)")


def test_decimal_strings_read_from_raw_bytes_equal_pydicoms(tmp_path):
  """``_raw_decimals`` (the DS fast path) gives pydicom's values, or None where pydicom must
  decide (then ``_floats`` raises the same "malformed" error as before)."""
  path = _write_image(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16), (0, 0, 0))
  for text, n in ((b"-162.1982421875\\-293.1982421875\\-173.7 ", 3), (b"1e-3\\ 2.50", 2),
                  (b"0.603515625\\0.603515625 ", 2), (b"-1024 ", 1)):
    ds = pydicom.dcmread(path)
    ds["PixelSpacing"] = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag("PixelSpacing"), "DS", len(text), text, 0, False, True)
    fast = dicom._raw_decimals(ds, "PixelSpacing", n)
    np.testing.assert_array_equal(fast, [float(v) for v in (ds.PixelSpacing if n > 1
                                                            else [ds.PixelSpacing])])
    assert dicom._raw_decimals(ds, "PixelSpacing", n) is None  # Converted now: pydicom's.
  for text in (b"abc\\1", b"1\\", b"1\\2\\3", b"nan\\1", b"  ", b"\xb51\\2"):
    ds = pydicom.dcmread(path)
    ds["PixelSpacing"] = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag("PixelSpacing"), "DS", len(text), text, 0, False, True)
    assert dicom._raw_decimals(ds, "PixelSpacing", 2) is None, text
  assert dicom._raw_decimals(pydicom.dcmread(path), "GantryDetectorTilt", 1) is None  # Absent.


# ------------------------------------------------------- manifest, cache and preprocessing.


def _cfg():
  return type("DataConfig", (), dict(
      target_spacing=(5.0, 5.0, 5.0), scale_factor=0.5, target_shape=(8, 16, 16),
      hu_window=(-1350.0, 150.0), apply_lung_mask=True, lung_mask_fallback=False))()


def _dicom_and_nifti(tmp_path):
  """A DICOM series, its NIfTI twin (dcm2niix layout) and a NIfTI lung mask on that grid."""
  folder, hu, *_ = _series(tmp_path / "dicom" / "series")
  vol = io.read_volume(folder)
  stored = io.to_original_orientation(vol.array, vol.original_affine)
  nifti = save_nifti(tmp_path / "ct.nii.gz", (stored + 1024).astype(np.int16),
                     vol.original_affine, slope=1.0, inter=-1024.0)
  lung = save_nifti(tmp_path / "lung.nii.gz", (stored > 0).astype(np.uint8),
                    vol.original_affine)
  return folder, nifti, lung


def test_manifest_accepts_series_folders(tmp_path):
  folder, nifti, lung = _dicom_and_nifti(tmp_path)
  cases = [manifest_lib.Case("a", "p", 1, folder, lung_mask=lung),
           manifest_lib.Case("b", "p", 0, type(folder)(f"{folder}#{SERIES_UID}"),
                             lung_mask=folder)]
  path = manifest_lib.write_manifest(cases, tmp_path / "m.csv")
  assert f"dicom/series#{SERIES_UID}" in path.read_text()
  m = manifest_lib.load_manifest(path)
  assert [c.image for c in m] == [c.image for c in cases]
  (tmp_path / "bad.csv").write_text("case_id,patient_id,label,image\n"
                                    "a,p,covid,dicom/series#9.9.9\nb,p,cap,dicom/none#1.2\n")
  with pytest.raises(ManifestError) as e:
    manifest_lib.load_manifest(tmp_path / "bad.csv")
  assert e.value.problems[0].startswith(f"row 2 (a): image {folder}: no series '9.9.9'")
  assert e.value.problems[1] == f"row 3 (b): image file not found: {tmp_path}/dicom/none#1.2"


def test_cache_key_follows_the_folder_and_preprocessing_matches_nifti(tmp_path):
  folder, nifti, _ = _dicom_and_nifti(tmp_path)
  settings = preprocess.PreprocessSettings.from_config(_cfg())
  case = manifest_lib.Case("a", "p", 1, folder)
  key = cache_lib.case_key(case, settings)
  assert cache_lib.case_key(manifest_lib.Case("a", "p", 1, folder), settings) == key
  picked = manifest_lib.Case("a", "p", 1, type(folder)(f"{folder}#{SERIES_UID}"))
  assert cache_lib.case_key(picked, settings) != key
  st = os.stat(folder / "IM0003.dcm")
  os.utime(folder / "IM0003.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert cache_lib.case_key(case, settings) != key
  st = os.stat(nifti)  # NIfTI keys are unchanged by this (existing caches stay valid).
  assert io.source_fingerprint(nifti) == [str(nifti.resolve()), st.st_size, st.st_mtime_ns]
  a = preprocess.load_and_preprocess(folder, config=_cfg())
  b = preprocess.load_and_preprocess(nifti, config=_cfg())
  # The NIfTI stores its affine in float32 (relative rounding ~6e-8 of the spacing), which moves
  # the resampling positions by far less than 1e-4 of a voxel: values agree to 1e-5.
  np.testing.assert_allclose(a.image, b.image, atol=1e-5)
  np.testing.assert_allclose(a.geometry.original_affine, b.geometry.original_affine, atol=1e-5)


# ------------------------------------------------------------------------------ predict.


def _write_like_nifti(folder, stored, affine, intercept=-2048.0):
  """Writes ``stored`` [i, j, k] (HU, integers) with a RAS ``affine`` as the DICOM series that
  dcm2niix would convert back to it (i = column, j = row reversed, k = slices along the normal).
  """
  folder.mkdir(parents=True, exist_ok=True)
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
  col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
  x, y, step = lps[:3, 0] / col_mm, -lps[:3, 1] / row_mm, lps[:3, 2]
  assert np.cross(x, y) @ step > 0, "slices must run along the normal"
  columns, rows, n = stored.shape
  first = lps[:3, 3] - (rows - 1) * row_mm * y
  for k in range(n):
    pixels = (stored[:, ::-1, k].T - intercept).astype(np.uint16)
    _write_image(folder / f"slice{k:03d}.dcm", pixels, first + k * step,
                 np.concatenate([x, y]), (row_mm, col_mm), intercept=intercept)
  return folder


def test_predict_refuses_a_folder_of_two_series_before_loading_models(tmp_path):
  from dsan_jax import predict
  folder, *_ = _series(tmp_path / "s")
  _series(folder, n=4, series_uid="1.2.3.4")  # Same folder, names overwritten in part.
  with pytest.raises(DataError) as e:
    predict.predict_case(tmp_path / "no_workdir", folder)
  _one_line_error(e, folder, "series; choose one as")


@pytest.mark.slow
def test_predict_from_dicom_equals_predict_from_nifti(trained_workdir, tmp_path):
  import nibabel as nib
  from dsan_jax import predict
  from tests.test_predict import _las_affine, _phantom, _save
  hu, _, _ = _phantom()
  affine = _las_affine()
  nifti = _save(tmp_path / "ct.nii.gz", hu, affine)
  folder = _write_like_nifti(tmp_path / "dicom", hu, affine)
  res = {name: predict.predict_case(trained_workdir, src, out=tmp_path / f"out_{name}")
         for name, src in (("nifti", nifti), ("dicom", folder))}
  # The NIfTI holds its affine in float32 (relative rounding ~3e-8), the DICOM tags in decimal:
  # the resampling positions differ by ~1e-6 voxel, the network input by ~1e-6 at tissue edges,
  # the outputs by ~1e-6 (measured up to 1.8e-6 on the maps). A wrong axis, flip or slice order
  # moves the map's structure (std > 0.05, checked below), far beyond 1e-4.
  assert res["dicom"]["probability"] == pytest.approx(res["nifti"]["probability"], abs=1e-5)
  np.testing.assert_allclose(res["dicom"]["input_affine"], affine, atol=1e-5)
  a, b = (nib.load(str(tmp_path / f"out_{n}" / "attention.nii.gz")) for n in ("dicom", "nifti"))
  assert a.shape == b.shape == hu.shape
  np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-4)
  assert np.asarray(a.dataobj).std() > 0.05  # Not a flat map that any input would match.


def test_series_written_from_a_nifti_reads_back_as_that_nifti(tmp_path):
  """The premise of the predict test: an oblique LAS volume and its DICOM twin read alike."""
  from tests.test_predict import _las_affine, _phantom, _save
  hu = _phantom(shape=(20, 16, 6))[0]
  nifti = io.read_volume(_save(tmp_path / "ct.nii.gz", hu, _las_affine()))
  vol = io.read_volume(_write_like_nifti(tmp_path / "dicom", hu, _las_affine()))
  np.testing.assert_array_equal(vol.array, nifti.array)
  np.testing.assert_allclose(vol.affine, nifti.affine, atol=1e-5)
  np.testing.assert_allclose(vol.original_affine, nifti.original_affine, atol=1e-5)
  assert vol.original_shape == nifti.original_shape
