"""The ablation knobs of the phantoms (``synthetic.Diagnostic``, docs/testbed.md): their defaults
leave the testbed unchanged, and each knob changes only what it names."""

import dataclasses
import json

import numpy as np
import pytest

from dsan_jax.data import synthetic

SCALE = 0.4  # ~9 mm voxels: a case renders in a few hundredths of a second.


@pytest.fixture(scope="module")
def spec():
  # A COVID case with a lesion of a few percent of the lung (seed 1, first COVID of the plan).
  specs = synthetic.plan_cases(12, seed=1, size_scale=SCALE)
  return next(s for s in specs if s.label == 1 and s.target_ratio > 0.01)


def _render(spec, **knobs):
  dg = synthetic.Diagnostic(**knobs)
  return synthetic.render_case(dataclasses.replace(spec, diagnostic=dg))


def test_default_knobs_render_the_testbed_exactly(spec):
  ref = synthetic.render_case(spec)  # diagnostic=None: the committed testbed.
  same = _render(spec)  # Diagnostic() with every knob at its default.
  for key in ("hu", "lung", "infection"):
    np.testing.assert_array_equal(same[key], ref[key])


def test_generate_parameters_name_the_knobs_only_when_given(tmp_path):
  synthetic.generate(tmp_path / "a", 1, seed=0, size_scale=0.3, num_workers=1, progress=False)
  synthetic.generate(tmp_path / "b", 1, seed=0, size_scale=0.3, num_workers=1, progress=False,
                     diagnostic=synthetic.Diagnostic(vessel_contrast=0.0))
  plain = json.loads((tmp_path / "a" / synthetic.PARAMS_FILE).read_text())
  diag = json.loads((tmp_path / "b" / synthetic.PARAMS_FILE).read_text())
  assert "diagnostic" not in plain
  assert diag["diagnostic"] == {"lesion_contrast": 1.0, "vessel_contrast": 0.0}


def _bright_outside(case):
  lung = case["lung"].astype(bool) & ~case["infection"].astype(bool)
  return float(np.mean(case["hu"][lung] > -700))


def test_no_vessels_removes_the_bright_lung_outside_the_lesion(spec):
  ref, novessel = synthetic.render_case(spec), _render(spec, vessel_contrast=0.0)
  np.testing.assert_array_equal(novessel["infection"], ref["infection"])
  outside = ~ref["lung"].astype(bool)
  np.testing.assert_array_equal(novessel["hu"][outside], ref["hu"][outside])
  # Parenchyma (-865 + 15 noise + 45 dependent HU, scanner noise <= 20 HU std) and lesion
  # margins (+35 % of the way to ground glass, <= -720 HU) stay below -700 HU; vessels do not
  # (4 % of these voxels at ~9 mm).
  assert _bright_outside(ref) > 0.02
  assert _bright_outside(novessel) < 0.005


def test_lesion_contrast_brightens_only_the_lesion_and_its_margin(spec):
  ref, strong = synthetic.render_case(spec), _render(spec, lesion_contrast=2.0)
  inf = ref["infection"].astype(bool)
  margin = synthetic._halo(inf, ref["lung"].astype(bool))
  untouched = ~(inf | margin)
  np.testing.assert_array_equal(strong["hu"][untouched], ref["hu"][untouched])
  np.testing.assert_array_equal(strong["infection"], ref["infection"])
  # The lesion's HU change from the parenchyma (>= 250 HU for ground glass) doubles; vessels
  # mixed in afterwards and the window clip take some of it back.
  assert float(np.mean(strong["hu"][inf].astype(np.float64) - ref["hu"][inf])) > 100.0


def _testbed_tool():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "testbed.py"
  spec = importlib.util.spec_from_file_location("testbed_tool", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_crop_to_lungs_keeps_every_lung_voxel_and_its_hu(tmp_path):
  manifest = synthetic.generate(tmp_path / "full", 2, seed=0, size_scale=0.3, num_workers=1,
                                progress=False)
  cropped = _testbed_tool().crop_to_lungs(manifest, tmp_path / "crop", margin_mm=10.0)
  assert cropped.read_text() == manifest.read_text()  # Same rows, same relative paths.
  for case in ("syn00000", "syn00001"):
    read = {d: [synthetic.read_canonical(tmp_path / d / sub / f"{case}.nii.gz")[0]
                for sub in ("images", "lung_masks", "infection_masks")] for d in ("full", "crop")}
    (hu, lung, inf), (hu_c, lung_c, inf_c) = read["full"], read["crop"]
    assert lung_c.sum() == lung.sum() and inf_c.sum() == inf.sum()
    assert hu_c.size < hu.size
    # The crop is a sub-block: find its offset from the lung masks' bounding boxes.
    lo = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != k)))[0] -
          np.flatnonzero(lung_c.any(axis=tuple(a for a in range(3) if a != k)))[0]
          for k in range(3)]
    block = tuple(slice(o, o + n) for o, n in zip(lo, hu_c.shape))
    np.testing.assert_array_equal(hu_c, hu[block])
    np.testing.assert_array_equal(inf_c, inf[block])


def _fake_cache(folder):
  """One cache entry: a 2-voxel-thick lung slab (outer layer 140, inner 60) with one lesion."""
  folder.mkdir()
  img = np.zeros((6, 8, 8), np.uint8)
  img[1:5, 1:7, 1:7] = 140
  img[2:4, 2:6, 2:6] = 60
  img[2, 3, 3] = 200
  inf = np.zeros(img.shape, bool)
  inf[2, 3, 3] = True
  np.save(folder / "k.image.npy", img)
  np.save(folder / "k.mask.npy", np.packbits(inf.ravel()))
  (folder / "k.json").write_text(json.dumps({"shape": list(img.shape)}))
  return img, inf


@pytest.mark.parametrize("mode", ["perfect", "rimless"])
def test_visibility_cache_rewrites_only_the_image(tmp_path, mode):
  img, inf = _fake_cache(tmp_path / "cache")
  tool = _testbed_tool()
  assert tool.visibility_cache(tmp_path / "cache", tmp_path / mode, mode) == 1
  new = np.load(tmp_path / mode / "k.image.npy")
  assert new.shape == img.shape and new.dtype == np.uint8
  assert (tmp_path / mode / "k.json").samefile(tmp_path / "cache" / "k.json")
  assert (tmp_path / mode / "k.mask.npy").samefile(tmp_path / "cache" / "k.mask.npy")
  lung = img > 0
  np.testing.assert_array_equal(new[~lung], 0)
  if mode == "perfect":
    np.testing.assert_array_equal(new[inf], 230)
    np.testing.assert_array_equal(new[lung & ~inf], 80)
  else:  # The outer layer takes the inner non-infected median (60); the rest is unchanged.
    outer = lung & (img == 140)
    np.testing.assert_array_equal(new[outer], 60)
    np.testing.assert_array_equal(new[~outer], img[~outer])
  with pytest.raises(ValueError, match="folder of its own"):
    tool.visibility_cache(tmp_path / "cache", tmp_path / "cache", mode)


def test_gap_features_count_each_band_in_frame_units():
  # A 6x6x6 lung cube in an 8x8x8 frame, window [-1000, 0]: parenchyma at -900 HU, one
  # ground-glass voxel (-500) deep inside, one consolidated voxel (-100) on the surface.
  lo, hi = -1000.0, 0.0
  img = np.zeros((8, 8, 8), np.float32)
  img[1:7, 1:7, 1:7] = 0.1
  img[3, 3, 3] = 0.5
  img[1, 4, 5] = 0.9
  g = _testbed_tool().gap_features(img, (lo, hi))
  n = img.size
  hu = np.where(img > 0, img.astype(np.float64) * (hi - lo) + lo, 0.0)
  np.testing.assert_allclose(g, [1 / n, 1 / n, 2 / n, 216 / n, hu.sum() / n,
                                 (hu ** 2).sum() / 1e3 / n, 1 / n, 1 / n, 1 / n], rtol=1e-12)
