"""Preprocessing cache: built once, reused, rebuilt on change, corruption detected, resources."""

import json
import os
import time

import numpy as np
import pytest

from dsan_jax.data import cache as cache_lib
from dsan_jax.data import manifest as manifest_lib
from dsan_jax.data import preprocess
from dsan_jax.errors import ManifestError, ResourceError
from tests.data.conftest import save_nifti


def _cfg(**overrides):
  cfg = {"target_spacing": (5.0, 5.0, 5.0), "scale_factor": 0.5,
         "target_shape": (16, 32, 32), "hu_window": (-1350.0, 150.0),
         "apply_lung_mask": True, "lung_mask_fallback": True}
  cfg.update(overrides)
  return type("DataConfig", (), cfg)()


@pytest.fixture
def dataset(ct_case, tmp_path):
  """Manifest of 3 cases over the same tiny CT: with masks, without masks, with a ratio."""
  rows = [
      manifest_lib.Case("c0", "p0", 1, ct_case["image"], ct_case["lung_mask"],
                        ct_case["infection_mask"]),
      manifest_lib.Case("c1", "p1", 0, ct_case["image"]),
      manifest_lib.Case("c2", "p1", 0, ct_case["image"], ct_case["lung_mask"],
                        infection_ratio=0.5),
  ]
  path = manifest_lib.write_manifest(rows, tmp_path / "m.csv")
  return manifest_lib.load_manifest(path)


class _Counter:

  def __init__(self, monkeypatch):
    self.calls = []
    real = cache_lib.preprocess_case

    def counted(case, *args):
      self.calls.append(case.case_id)
      return real(case, *args)

    monkeypatch.setattr(cache_lib, "preprocess_case", counted)


def test_build_read_and_reuse(dataset, ct_case, tmp_path, monkeypatch):
  counter = _Counter(monkeypatch)
  cdir = tmp_path / "cache"
  ds = cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  assert sorted(counter.calls) == ["c0", "c1", "c2"]
  assert len(ds) == 3
  np.testing.assert_array_equal(ds.labels, np.array([1, 0, 0], np.int32))
  assert ds.labels.dtype == np.int32 and ds.ratios.dtype == np.float32
  assert ds.patient_ids == ["p0", "p1", "p1"]
  ref = preprocess.load_and_preprocess(ct_case["image"], ct_case["lung_mask"],
                                       ct_case["infection_mask"], config=_cfg())
  # Ratio filled from the masks for c0, estimated for c1 (no masks), the manifest's for c2.
  assert ds.ratios[0] == pytest.approx(ref.ratio) and ds.cases[0].infection_ratio == ds.ratios[0]
  est = preprocess.load_and_preprocess(ct_case["image"], config=_cfg())
  assert est.ratio_source == "estimate" and ds.ratios[1] == np.float32(est.ratio_estimate)
  assert ds.ratios[2] == 0.5
  assert ds.ratio_sources == ["mask", "estimate", "manifest"]
  np.testing.assert_array_equal(ds.ratio_estimated, [False, True, False])
  meta = json.loads((cdir / f"{ds.keys[1]}.json").read_text())
  assert meta["ratio_estimated"] and meta["ratio_source"] == "estimate"
  assert meta["ratio_mask"] is None and meta["ratio_estimate"] == pytest.approx(est.ratio)
  assert cache_lib.ratio_summary(ds) == (
      "infection ratios: 1 from infection masks (1 COVID, 0 CAP), 1 ESTIMATED from the CT "
      "(0 COVID, 1 CAP), 1 from the manifest (0 COVID, 1 CAP), 0 unknown (0 COVID, 0 CAP)")

  item = ds[0]
  assert set(item) == {"image", "infection_mask", "has_mask", "label", "ratio", "index",
                       "case_id"}
  assert item["image"].dtype == np.float32 and item["image"].shape == (16, 32, 32)
  # uint8 storage: error at most half a step of 1/255.
  assert np.abs(item["image"] - ref.image).max() <= 0.5 / 255 + 1e-7
  np.testing.assert_array_equal(item["image"] * 255, np.round(ref.image * 255))
  np.testing.assert_array_equal(item["infection_mask"], ref.infection_mask)
  assert item["infection_mask"].dtype == np.uint8
  assert item["has_mask"] is True and item["label"] == 1 and item["index"] == 0
  item1 = ds[1]
  assert item1["has_mask"] is False and not item1["infection_mask"].any()
  assert item1["case_id"] == "c1" and item1["ratio"] == pytest.approx(est.ratio)
  assert ds[-1]["index"] == 2
  with pytest.raises(IndexError):
    ds[3]

  mtimes = {p.name: p.stat().st_mtime_ns for p in cdir.iterdir()}
  counter.calls.clear()
  ds2 = cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  assert counter.calls == []  # Second call: all hits, nothing recomputed or rewritten.
  assert {p.name: p.stat().st_mtime_ns for p in cdir.iterdir()} == mtimes
  np.testing.assert_array_equal(ds2[0]["image"], item["image"])
  assert not [p for p in cdir.iterdir() if ".tmp-" in p.name]


def test_config_or_input_change_rebuilds(dataset, ct_case, tmp_path, monkeypatch):
  counter = _Counter(monkeypatch)
  cdir = tmp_path / "cache"
  cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  counter.calls.clear()
  ds = cache_lib.build_cache(dataset, _cfg(hu_window=(-1000.0, 200.0)), cdir, num_workers=0)
  assert sorted(counter.calls) == ["c0", "c1", "c2"]
  assert ds[1]["image"].max() > 0
  counter.calls.clear()
  # Touch the lung mask (new mtime): only the cases using it are rebuilt.
  st = os.stat(ct_case["lung_mask"])
  os.utime(ct_case["lung_mask"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  assert sorted(counter.calls) == ["c0", "c2"]


def test_corrupt_entries_detected_and_rebuilt(dataset, tmp_path, monkeypatch):
  counter = _Counter(monkeypatch)
  cdir = tmp_path / "cache"
  ds = cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  good = ds[0]["image"].copy()
  paths = [cache_lib.entry_paths(cdir, k) for k in ds.keys]
  # c0: truncated image; c1: sidecar garbage; c2: one flipped byte (needs the checksum).
  blob = paths[0]["image"].read_bytes()
  paths[0]["image"].write_bytes(blob[: len(blob) // 2])
  paths[1]["meta"].write_text("{not json")
  data = bytearray(paths[2]["image"].read_bytes())
  data[-5] ^= 0xFF
  paths[2]["image"].write_bytes(bytes(data))
  counter.calls.clear()
  ds = cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  assert sorted(counter.calls) == ["c0", "c1"]  # "size" check misses the flipped byte ...
  counter.calls.clear()
  ds = cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0, verify="checksum")
  assert counter.calls == ["c2"]  # ... "checksum" finds it.
  np.testing.assert_array_equal(ds[0]["image"], good)
  assert json.loads(paths[1]["meta"].read_text())["case_id"] == "c1"


def test_bad_case_reported_or_skipped(dataset, tmp_path):
  bad = save_nifti(tmp_path / "const.nii.gz", np.full((8, 8, 8), -1000, np.int16), np.eye(4))
  cases = dataset.cases + [manifest_lib.Case("bad", "p9", 1, bad)]
  m = manifest_lib.Manifest(cases=cases, root=tmp_path, path=tmp_path / "m.csv")
  with pytest.raises(ManifestError, match="case bad: .*const.nii.gz: constant image"):
    cache_lib.build_cache(m, _cfg(), tmp_path / "cache", num_workers=0)
  ds = cache_lib.build_cache(m, _cfg(), tmp_path / "cache", num_workers=0, skip_bad=True)
  assert ds.case_ids == ["c0", "c1", "c2"]
  assert len(ds.skipped) == 1 and ds.skipped[0][0] == "bad"
  assert "constant image" in ds.skipped[0][1]


def test_all_failing_cases_listed_at_once(dataset, tmp_path):
  """Voxel-level problems (not visible in headers) surface at build time, all together."""
  bad_nan = np.zeros((8, 8, 8), np.float32)
  bad_nan[0, 0, 0] = np.nan
  bad_raw = np.random.default_rng(0).integers(0, 4096, size=(8, 8, 8)).astype(np.uint16)
  files = {"nan": save_nifti(tmp_path / "nan.nii.gz", bad_nan, np.eye(4)),
           "raw": save_nifti(tmp_path / "raw.nii.gz", bad_raw, np.eye(4))}
  ok = save_nifti(tmp_path / "ok.nii.gz", np.zeros((16, 16, 16), np.int16), np.eye(4))
  blob = (tmp_path / "ok.nii.gz").read_bytes()
  files["trunc"] = tmp_path / "trunc.nii.gz"
  files["trunc"].write_bytes(blob[: len(blob) - 20])
  del ok
  cases = dataset.cases + [manifest_lib.Case(k, k, 1, p) for k, p in files.items()]
  m = manifest_lib.Manifest(cases=cases, root=tmp_path, path=tmp_path / "m.csv")
  with pytest.raises(ManifestError) as info:
    cache_lib.build_cache(m, _cfg(), tmp_path / "cache", num_workers=0)
  problems = "\n".join(info.value.problems)
  assert len(info.value.problems) == 3
  assert "case nan: " in problems and "NaN or Inf" in problems
  assert "case raw: " in problems and "raw unsigned" in problems
  assert "case trunc: " in problems and "truncated or corrupt" in problems
  # The good cases were built anyway: a rerun after fixing the manifest does no work.
  assert len(cache_lib.build_cache(dataset, _cfg(), tmp_path / "cache", num_workers=0)) == 3


def test_prune_removes_stale_entries(dataset, tmp_path):
  cdir = tmp_path / "cache"
  old = cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  new = cache_lib.build_cache(dataset, _cfg(hu_window=(-1000.0, 0.0)), cdir, num_workers=0)
  (cdir / "notes.txt").write_text("keep me")
  removed = cache_lib.prune(cdir, new.keys)
  assert removed == 3 + 3 + 1  # 3 images, 3 sidecars, 1 packed mask of the old settings.
  assert (cdir / "notes.txt").exists()
  assert all(not cache_lib.entry_paths(cdir, k)["meta"].exists() for k in old.keys)
  assert new[0]["image"].shape == (16, 32, 32)


def test_not_enough_disk_space(dataset, tmp_path, monkeypatch):
  real = cache_lib.shutil.disk_usage
  monkeypatch.setattr(cache_lib.shutil, "disk_usage",
                      lambda p: real(p)._replace(free=1000))
  with pytest.raises(ResourceError, match="not enough free disk space.*3 entries"):
    cache_lib.build_cache(dataset, _cfg(), tmp_path / "cache", num_workers=0)


def test_unwritable_cache_dir(dataset, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ResourceError, match="not writable"):
    cache_lib.build_cache(dataset, _cfg(), blocker / "cache", num_workers=0)


def test_stale_tmp_files_removed(dataset, tmp_path):
  cdir = tmp_path / "cache"
  cdir.mkdir()
  stale = cdir / ".abc.image.npy.tmp-999999999-deadbeef"  # No such pid.
  stale.write_bytes(b"half")
  mine = cdir / f".abc.image.npy.tmp-{os.getpid()}-deadbeef"  # A live writer: kept.
  mine.write_bytes(b"half")
  cache_lib.build_cache(dataset, _cfg(), cdir, num_workers=0)
  assert not stale.exists() and mine.exists()


@pytest.mark.slow
def test_parallel_build_matches_serial(dataset, tmp_path):
  serial = cache_lib.build_cache(dataset, _cfg(), tmp_path / "a", num_workers=0)
  parallel = cache_lib.build_cache(dataset, _cfg(), tmp_path / "b", num_workers=2)
  assert serial.keys == parallel.keys
  for i in range(len(serial)):
    np.testing.assert_array_equal(serial[i]["image"], parallel[i]["image"])
    np.testing.assert_array_equal(serial[i]["infection_mask"], parallel[i]["infection_mask"])


def test_read_speed(tmp_path):
  """Reads/s of one 64x128x128 entry (recorded in docs/data.md); a loose floor only."""
  key = "k" * 32
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(64, 128, 128)).astype(np.uint8)
  mask = np.packbits(rng.random(64 * 128 * 128) < 0.1)
  paths = cache_lib.entry_paths(tmp_path, key)
  np.save(paths["image"], img)
  np.save(paths["mask"], mask)
  case = manifest_lib.Case("x", "p", 1, tmp_path / "x.nii.gz")
  ds = cache_lib.CachedDataset(cases=[case], keys=[key], cache_dir=tmp_path,
                               shapes=[(64, 128, 128)], has_masks=[True])
  ds[0]
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < 0.5:
    ds[0]
    n += 1
  rate = n / (time.perf_counter() - t0)
  print(f"cache reads of a 64x128x128 entry: {rate:.0f}/s")
  assert rate > 5


def test_entry_damaged_after_build_raises_data_error(dataset, tmp_path):
  from dsan_jax.errors import DataError
  ds = cache_lib.build_cache(dataset, _cfg(), tmp_path / "cache", num_workers=0)
  p = cache_lib.entry_paths(ds.cache_dir, ds.keys[1])["image"]
  p.write_bytes(p.read_bytes()[:200])
  with pytest.raises(DataError, match="unreadable cache entry of case c1.*rebuild the cache"):
    ds[1]


def test_to_uint8_equals_the_whole_array_rounding():
  rng = np.random.default_rng(0)
  image = rng.random((19, 6, 5), dtype=np.float32)
  image[0, 0, :3] = [0.5 / 255, 1.5 / 255, 1.0]  # Rounding ties and the top.
  image[3] = 0.0
  want = np.round(image * 255.0).astype(np.uint8)
  for slab in (1, 4, 8, 64):
    np.testing.assert_array_equal(preprocess.to_uint8(image, slab), want)
