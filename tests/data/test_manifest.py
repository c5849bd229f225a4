"""Manifest loading: every kind of problem, all problems at once, skip_bad, round trip."""

import math

import numpy as np
import pytest

from dsan_jax.data import manifest as manifest_lib
from dsan_jax.errors import ManifestError
from tests.data.conftest import LAS, affine_for, save_nifti

HEADER = "case_id,patient_id,label,image,lung_mask,infection_mask,infection_ratio,split\n"


@pytest.fixture
def files(tmp_path):
  """Images and masks in tmp_path/scans, all on one 8x8x6 LAS grid except the 'bad' ones."""
  d = tmp_path / "scans"
  d.mkdir()
  aff = affine_for((1.0, 1.0, 2.0), LAS)
  ct = np.random.default_rng(0).integers(-1000, 200, size=(8, 8, 6)).astype(np.int16)
  m = np.zeros((8, 8, 6), np.uint8)
  m[2:6, 2:6, 1:5] = 1
  for name in ("a", "b", "c"):
    save_nifti(d / f"{name}.nii.gz", ct, aff)
    save_nifti(d / f"{name}_lung.nii.gz", m, aff)
    save_nifti(d / f"{name}_inf.nii.gz", m, aff)
  save_nifti(d / "wrong_shape.nii.gz", np.zeros((8, 8, 5), np.uint8), aff)
  shifted = aff.copy()
  shifted[:3, 3] += 3.0
  save_nifti(d / "wrong_affine.nii.gz", m, shifted)
  # Same grid stored in another orientation (RAS instead of LAS): accepted.
  ras = aff.copy()
  ras[0, 0] = 1.0
  ras[0, 3] = aff[0, 3] - 7.0
  save_nifti(d / "a_lung_ras.nii.gz", m[::-1], ras)
  save_nifti(d / "twod.nii.gz", np.zeros((8, 8), np.int16), np.eye(4))
  (d / "junk.nii.gz").write_bytes(b"not an image at all")
  return tmp_path


def _write(root, body, header=HEADER):
  p = root / "manifest.csv"
  p.write_text(header + body)
  return p


def test_good_manifest(files):
  p = _write(files, "a,p1,covid,scans/a.nii.gz,scans/a_lung.nii.gz,scans/a_inf.nii.gz,0.25,\n"
                    "b,p1,COVID,scans/b.nii.gz,,,,tv\n"
                    "c,p2, cap ,scans/c.nii.gz,scans/a_lung_ras.nii.gz,,,test\n")
  m = manifest_lib.load_manifest(p)
  assert len(m) == 3 and m.skipped == []
  a, b, c = m.cases
  assert (a.label, b.label, c.label) == (1, 1, 0)
  assert a.image == files / "scans" / "a.nii.gz" and a.image.is_absolute()
  assert a.has_lung_mask and a.has_infection_mask and a.infection_ratio == 0.25
  assert not b.has_lung_mask and not b.has_infection_mask and math.isnan(b.infection_ratio)
  assert c.is_test and not a.is_test and b.split == "tv"
  assert (a.row, b.row, c.row) == (2, 3, 4)
  assert m.root == files.resolve()


@pytest.mark.parametrize("row,message", [
    ("a,p1,flu,scans/a.nii.gz,,,,", "row 2 \\(a\\): unknown label 'flu'"),
    ("a,p1,covid,scans/missing.nii.gz,,,,",
     "row 2 \\(a\\): image file not found: .*missing.nii.gz"),
    ("a,p1,covid,scans/a.nii.gz,scans/nolung.nii.gz,,,", "lung mask file not found"),
    ("a,p1,covid,scans/a.nii.gz,,scans/wrong_shape.nii.gz,,",
     "infection mask .*wrong_shape.nii.gz does not match its image in shape"),
    ("a,p1,covid,scans/a.nii.gz,scans/wrong_affine.nii.gz,,,",
     "lung mask .*wrong_affine.nii.gz does not match its image in affine"),
    ("a,p1,covid,scans/a.nii.gz,,,1.5,", "infection_ratio '1.5' is not in \\[0, 1\\]"),
    ("a,p1,covid,scans/a.nii.gz,,,abc,", "infection_ratio 'abc' is not a number"),
    ("a,p1,covid,scans/a.nii.gz,,,nan,", "infection_ratio 'nan' is not in"),
    ("a,p1,covid,scans/a.nii.gz,,,,holdout", "unknown split 'holdout'"),
    (",p1,covid,scans/a.nii.gz,,,,", "row 2: empty case_id"),
    ("a,,covid,scans/a.nii.gz,,,,", "empty patient_id"),
    ("a,p1,covid,,,,,", "empty image path"),
    ("a,p1,covid,scans/twod.nii.gz,,,,", "image .*twod.nii.gz: 2D image"),
    ("a,p1,covid,scans/junk.nii.gz,,,,", "image .*junk.nii.gz: not a readable NIfTI"),
])
def test_each_problem_has_its_message(files, row, message):
  p = _write(files, row + "\n")
  with pytest.raises(ManifestError, match=message) as info:
    manifest_lib.load_manifest(p)
  assert len(info.value.problems) == 1, info.value.problems


def test_duplicate_case_ids(files):
  p = _write(files, "a,p1,covid,scans/a.nii.gz,,,,\nb,p2,cap,scans/b.nii.gz,,,,\n"
                    "a,p3,cap,scans/c.nii.gz,,,,\n")
  with pytest.raises(ManifestError, match="row 4 \\(a\\): duplicate case_id 'a' "
                     "\\(first at row 2\\)"):
    manifest_lib.load_manifest(p)


def test_missing_columns_and_empty(files):
  p = _write(files, "a,covid,scans/a.nii.gz\n", header="case_id,label,image\n")
  with pytest.raises(ManifestError, match="missing required column\\(s\\): patient_id"):
    manifest_lib.load_manifest(p)
  p.write_text("")
  with pytest.raises(ManifestError, match="empty file"):
    manifest_lib.load_manifest(p)
  p.write_text(HEADER)
  with pytest.raises(ManifestError, match="no cases"):
    manifest_lib.load_manifest(p)
  with pytest.raises(ManifestError, match="manifest file not found"):
    manifest_lib.load_manifest(files / "nope.csv")


def test_many_bad_rows_all_listed_and_skip_bad(files):
  rows = ["a,p1,covid,scans/a.nii.gz,,,,"]
  rows += [f"x{i},p{i},covid,scans/missing{i}.nii.gz,,,," for i in range(20)]
  rows += ["b,p2,pneumonia,scans/b.nii.gz,,,,", "c,p3,cap,scans/c.nii.gz,,,2,",
           "a,p9,cap,scans/c.nii.gz,,,,"]
  p = _write(files, "\n".join(rows) + "\n")
  with pytest.raises(ManifestError) as info:
    manifest_lib.load_manifest(p)
  problems = info.value.problems
  assert len(problems) == 23
  for i in range(20):
    assert any(f"row {i + 3} (x{i}): image file not found" in q for q in problems)
  assert "23 problems" in str(info.value)

  m = manifest_lib.load_manifest(p, skip_bad=True)
  assert [c.case_id for c in m.cases] == ["a"]
  assert len(m.skipped) == 23
  assert m.skipped[0][0] == "x0" and "image file not found" in m.skipped[0][1]
  assert ("b", "unknown label 'pneumonia' (expected one of ['cap', 'covid'])") in m.skipped
  assert m.skipped[-1][0] == "a" and "duplicate" in m.skipped[-1][1]


def test_check_files_false_only_checks_existence(files):
  p = _write(files, "a,p1,covid,scans/junk.nii.gz,scans/wrong_shape.nii.gz,,,\n")
  assert len(manifest_lib.load_manifest(p, check_files=False)) == 1
  p = _write(files, "a,p1,covid,scans/missing.nii.gz,,,,\n")
  with pytest.raises(ManifestError, match="not found"):
    manifest_lib.load_manifest(p, check_files=False)


def test_write_manifest_roundtrip(files, tmp_path):
  p = _write(files, "a,p1,covid,scans/a.nii.gz,scans/a_lung.nii.gz,scans/a_inf.nii.gz,0.125,\n"
                    "c,p2,cap,scans/c.nii.gz,,,,test\n")
  m = manifest_lib.load_manifest(p)
  out = manifest_lib.write_manifest(m.cases, files / "sub" / "copy.csv")
  text = out.read_text()
  assert "../scans/a.nii.gz" in text  # Relative to the new CSV.
  m2 = manifest_lib.load_manifest(out)
  for c1, c2 in zip(m.cases, m2.cases):
    assert (c1.case_id, c1.patient_id, c1.label, c1.image, c1.lung_mask, c1.infection_mask,
            c1.split) == (c2.case_id, c2.patient_id, c2.label, c2.image, c2.lung_mask,
                          c2.infection_mask, c2.split)
  assert m2.cases[0].infection_ratio == 0.125 and math.isnan(m2.cases[1].infection_ratio)
  assert sorted(x.name for x in out.parent.iterdir()) == ["copy.csv"]
