"""Synthetic phantom generator: files, dtypes, masks, ratios, groups, determinism."""

import collections
import csv
import hashlib

import nibabel as nib
import numpy as np
import pytest

from dsan_jax.data import synthetic
from dsan_jax.data.sampling import size_groups

SCALE = 0.3  # ~19 x 34 x 34 voxels: 200 cases in a few seconds


def _rows(manifest):
  with open(manifest, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def syn200(tmp_path_factory):
  out = tmp_path_factory.mktemp("syn200")
  manifest = synthetic.generate(out, 200, seed=0, size_scale=SCALE, num_workers=1,
                                progress=False)
  return manifest, _rows(manifest)


def test_manifest_columns_and_values(syn200):
  manifest, rows = syn200
  assert manifest.name == "manifest.csv" and len(rows) == 200
  assert tuple(rows[0].keys()) == synthetic.MANIFEST_COLUMNS
  assert {r["label"] for r in rows} == {"covid", "cap"}
  assert {r["split"] for r in rows} == {"train"}
  assert len({r["case_id"] for r in rows}) == 200
  for r in rows[:5]:
    for col in ("image", "lung_mask", "infection_mask"):
      assert (manifest.parent / r[col]).is_file() and not r[col].startswith("/")


def test_files_dtypes_header_and_masks(syn200):
  manifest, rows = syn200
  orientations = set()
  for r in rows[:12]:
    img = nib.load(manifest.parent / r["image"])
    lung_img = nib.load(manifest.parent / r["lung_mask"])
    inf_img = nib.load(manifest.parent / r["infection_mask"])
    assert img.get_data_dtype() == np.int16
    assert lung_img.get_data_dtype() == np.uint8 and inf_img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(lung_img.affine, img.affine)
    np.testing.assert_allclose(inf_img.affine, img.affine)
    sx, sy, sz = img.header.get_zooms()
    assert 0.6 <= sx == sy <= 0.9 and 1.0 <= sz <= 2.5
    orientations.add("".join(nib.aff2axcodes(img.affine)))
    hu, _ = synthetic.read_canonical(manifest.parent / r["image"])
    lung, _ = synthetic.read_canonical(manifest.parent / r["lung_mask"])
    inf, _ = synthetic.read_canonical(manifest.parent / r["infection_mask"])
    assert set(np.unique(lung).tolist()) <= {0, 1} and set(np.unique(inf).tolist()) <= {0, 1}
    assert not (inf & ~lung.astype(bool)).any()  # infection inside the lungs
    assert hu.min() >= -1024 and hu.max() > 300  # air and bone present, in HU
    assert np.median(hu[lung.astype(bool) & ~inf.astype(bool)]) < -700  # aerated parenchyma
    ratio = float(inf.sum(dtype=np.int64)) / float(lung.sum(dtype=np.int64))
    assert float(r["infection_ratio"]) == ratio
  assert orientations <= set(synthetic.ORIENTATIONS) and len(orientations) >= 2


def test_stored_file_round_trips_to_rendered_case(syn200):
  manifest, rows = syn200
  specs = synthetic.plan_cases(200, seed=0, size_scale=SCALE)
  for k in range(4):
    case = synthetic.render_case(specs[k])
    hu, spacing = synthetic.read_canonical(manifest.parent / rows[k]["image"])
    np.testing.assert_array_equal(hu, case["hu"])  # orientation and intercept undone exactly
    np.testing.assert_allclose(spacing, case["spacing"], rtol=1e-6)
  assert any(synthetic._draw_grid(s).intercept for s in specs[:12])


def test_all_size_groups_populated_and_ratio_skew(syn200):
  _, rows = syn200
  labels = np.array([r["label"] == "covid" for r in rows], np.int32)
  ratios = np.array([float(r["infection_ratio"]) for r in rows])
  counts = np.bincount(size_groups(labels, ratios), minlength=4)
  assert (counts >= 15).all(), counts
  # COVID mostly large, CAP mostly small, overlapping.
  assert np.median(ratios[labels == 1]) > 0.03 > np.median(ratios[labels == 0])
  assert np.median(ratios[labels == 0]) < 0.003


def test_patients_with_two_scans_share_anatomy(syn200):
  manifest, rows = syn200
  by_patient = collections.defaultdict(list)
  for r in rows:
    by_patient[r["patient_id"]].append(r)
  pairs = [v for v in by_patient.values() if len(v) == 2]
  assert len(pairs) >= 1 and max(len(v) for v in by_patient.values()) == 2
  a, b = pairs[0]
  assert a["label"] == b["label"] and a["case_id"] != b["case_id"]
  la, sa = synthetic.read_canonical(manifest.parent / a["lung_mask"])
  lb, sb = synthetic.read_canonical(manifest.parent / b["lung_mask"])
  assert la.shape == lb.shape and np.allclose(sa, sb)
  dice = 2 * (la & lb).sum() / (la.sum() + lb.sum())
  assert dice > 0.8, dice


def _digest(folder):
  return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*"))
          if p.is_file() and not p.name.startswith(".generate.")}  # Lock, parameters.


def test_same_seed_identical_files_different_seed_differs(tmp_path):
  kw = dict(size_scale=0.25, num_workers=1, progress=False)
  synthetic.generate(tmp_path / "a", 4, seed=5, **kw)
  synthetic.generate(tmp_path / "b", 4, seed=5, num_workers=2, size_scale=0.25, progress=False)
  synthetic.generate(tmp_path / "c", 4, seed=6, **kw)
  da, db, dc = (_digest(tmp_path / x) for x in "abc")
  assert len(da) == 13 and da == db
  assert da["images/syn00000.nii.gz"] != dc["images/syn00000.nii.gz"]


def test_cli_and_preview(tmp_path):
  png = tmp_path / "preview.png"
  assert synthetic.main(["--out", str(tmp_path / "cli"), "--cases", "3", "--seed", "1",
                         "--size-scale", "0.25", "--workers", "1", "--test-fraction", "1.0",
                         "--preview", str(png)]) == 0
  rows = _rows(tmp_path / "cli" / "manifest.csv")
  assert len(rows) == 3 and {r["split"] for r in rows} == {"test"}
  assert png.stat().st_size > 1000
