"""The paper's preprocessing (Section IV-B): resampling, fitting, padding, window, geometry."""

import importlib.util
import time

import chex
import nibabel as nib
import numpy as np
import pytest

from dsan_jax.data import io, preprocess
from dsan_jax.errors import DataError
from tests.data.conftest import LAS, affine_for, save_nifti


def _data_config(**overrides):
  cfg = {"target_spacing": (0.7168, 0.7168, 1.25), "scale_factor": 0.5,
         "target_shape": (138, 256, 256), "hu_window": (-1350.0, 150.0),
         "apply_lung_mask": False, "lung_mask_fallback": False}
  cfg.update(overrides)
  return type("DataConfig", (), cfg)()


def _volume(array_zyx, spacing_zyx, orientation=None):
  aff = affine_for(spacing_zyx[::-1], orientation)
  return io.Volume(array=np.asarray(array_zyx, np.float32), spacing_zyx=tuple(spacing_zyx),
                   affine=affine_for(spacing_zyx[::-1]), original_affine=aff,
                   original_shape=tuple(np.asarray(array_zyx).shape[::-1]), path=None)


def test_settings_defaults_match_configs_default(repo_root):
  spec = importlib.util.spec_from_file_location("cfg_default", repo_root / "configs/default.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert preprocess.PreprocessSettings.from_config(mod.get_config()) == \
      preprocess.PreprocessSettings()


@pytest.mark.parametrize("shape_in,spacing_in", [((13, 40, 37), (2.0, 0.6, 0.55)),
                                                 ((7, 9, 11), (5.0, 3.1, 2.9))],
                         ids=["shrink", "grow"])
def test_separable_trilinear_equals_affine_transform(shape_in, spacing_in, monkeypatch):
  """The three 1D passes = ndimage.affine_transform (order 1, mode nearest), float32 rounding.

  Bound: each output is a convex combination computed in float32 with 3 roundings per pass
  (~4 eps32 relative per pass) against affine_transform's float64 sum: 16 eps32 of max |x|.
  The bands of rows shared among threads give the single thread's values exactly.
  """
  from scipy import ndimage
  rng = np.random.default_rng(3)
  vol = _volume((rng.random(shape_in) * 3000.0 - 1024.0).astype(np.float32), spacing_in)
  g = preprocess.plan_geometry(vol, preprocess.PreprocessSettings(target_shape=(64, 64, 64)))
  step = g.step
  c_in = (np.asarray(g.canonical_shape) - 1) / 2
  c_out = (np.asarray(g.resampled_shape) - 1) / 2
  ref = ndimage.affine_transform(vol.array, step, offset=c_in - step * c_out,
                                 output_shape=g.resampled_shape, order=1, mode="nearest",
                                 prefilter=False)
  out = preprocess.resample_to_output(vol.array, g)
  assert out.dtype == np.float32 and out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0,
                             atol=16 * np.finfo(np.float32).eps * np.abs(vol.array).max())
  monkeypatch.setattr(preprocess, "RESAMPLE_THREADS", 1)
  np.testing.assert_array_equal(preprocess.resample_to_output(vol.array, g), out)


def test_window_exact_at_edges():
  hu = np.array([-3000.0, -1350.0, -600.0, 150.0, 151.0, 3000.0], np.float32)
  np.testing.assert_array_equal(preprocess.window(hu, (-1350.0, 150.0)),
                                np.array([0.0, 0.0, 0.5, 1.0, 1.0, 1.0], np.float32))
  assert preprocess.window(hu, (-1350.0, 150.0)).dtype == np.float32


def test_resampling_lands_on_target_spacing_and_keeps_extent():
  spacing_in = (3.0, 0.8, 0.7)  # (z, y, x) mm, anisotropic like a real CT.
  shape_in = (20, 30, 40)
  # A linear function of the physical position: trilinear interpolation reproduces it exactly.
  z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape_in, spacing_in)], indexing="ij")
  vol = _volume(2.0 * z - 3.0 * y + 5.0 * x - 400.0, spacing_in)
  settings = preprocess.PreprocessSettings(target_spacing=(0.35, 0.4, 1.25), scale_factor=0.5,
                                           target_shape=(64, 64, 64))
  geom = preprocess.plan_geometry(vol, settings)
  eff = np.array([2.5, 0.8, 0.7])  # target_spacing (x, y, z) reversed / scale_factor.
  np.testing.assert_allclose(geom.output_spacing, eff)
  extent = np.array(shape_in) * spacing_in
  np.testing.assert_array_equal(geom.resampled_shape, np.round(extent / eff).astype(int))
  assert np.all(np.abs(np.array(geom.resampled_shape) * eff - extent) <= eff / 2 + 1e-9)
  assert geom.fit_factor == 1.0

  out = preprocess.resample_to_output(vol.array, geom)
  chex.assert_shape(out, geom.resampled_shape)
  # Output voxel centres, centre-aligned with the input, in mm from input voxel 0.
  centre_in = (np.array(shape_in) - 1) / 2 * spacing_in
  pos = [centre_in[a] + (np.arange(geom.resampled_shape[a]) - (geom.resampled_shape[a] - 1) / 2)
         * eff[a] for a in range(3)]
  zo, yo, xo = np.meshgrid(*pos, indexing="ij")
  expected = 2.0 * zo - 3.0 * yo + 5.0 * xo - 400.0
  inside = ((zo >= 0) & (zo <= extent[0] - spacing_in[0]) & (yo >= 0)
            & (yo <= extent[1] - spacing_in[1]) & (xo >= 0) & (xo <= extent[2] - spacing_in[2]))
  assert inside.mean() > 0.8
  np.testing.assert_allclose(out[inside], expected[inside], atol=2e-3)


def test_padding_centred_exact(tmp_path):
  # Input spacing = effective spacing, so resampling is the identity and padding is visible.
  shape_zyx = (10, 21, 30)
  spacing_zyx = (2.5, 1.4336, 1.4336)
  rng = np.random.default_rng(0)
  hu = rng.uniform(-1400, 200, size=shape_zyx).astype(np.float32)
  hu = np.round(hu)
  path = save_nifti(tmp_path / "ct.nii.gz", hu.transpose(2, 1, 0).astype(np.int16),
                    affine_for(spacing_zyx[::-1]))
  out = preprocess.load_and_preprocess(path, config=_data_config(target_shape=(16, 32, 32)))
  g = out.geometry
  assert g.resampled_shape == shape_zyx
  assert g.pad_before == (3, 5, 1)  # (16-10)//2, (32-21)//2, (32-30)//2.
  expected = np.zeros((16, 32, 32), np.float32)
  expected[3:13, 5:26, 1:31] = np.clip((hu + 1350.0) / 1500.0, 0, 1)
  np.testing.assert_allclose(out.image, expected, atol=1e-6)
  assert out.image.dtype == np.float32 and out.lung_mask.dtype == np.uint8
  assert out.infection_mask is None and np.isnan(out.ratio)


def test_larger_than_target_uses_one_common_factor():
  spacing_zyx = (2.5, 1.4336, 1.4336)
  vol = _volume(np.zeros((40, 80, 60)), spacing_zyx)
  settings = preprocess.PreprocessSettings(target_shape=(20, 32, 32))
  g = preprocess.plan_geometry(vol, settings)
  assert g.fit_factor == pytest.approx(2.5)  # max(40/20, 80/32, 60/32).
  np.testing.assert_allclose(np.array(g.output_spacing) / np.array(spacing_zyx), 2.5)
  assert g.resampled_shape == (16, 32, 24)  # Aspect ratio kept: 40/2.5, 80/2.5, 60/2.5.
  assert g.pad_before == (2, 0, 4)
  out = preprocess.pad_to_target(preprocess.resample_to_output(vol.array, g), g)
  assert out.shape == (20, 32, 32)


def test_much_smaller_than_target_is_padded():
  vol = _volume(np.zeros((4, 6, 6)), (2.5, 1.4336, 1.4336))
  g = preprocess.plan_geometry(vol, preprocess.PreprocessSettings())
  assert g.resampled_shape == (4, 6, 6) and g.fit_factor == 1.0
  assert g.pad_before == (67, 125, 125)


def test_to_original_grid_identity_roundtrip(tmp_path):
  """Identity resampling: mapping back gives the windowed input in the stored orientation."""
  shape_zyx = (10, 12, 14)
  spacing_zyx = (2.5, 1.4336, 1.4336)
  hu = np.round(np.random.default_rng(1).uniform(-1300, 100, size=shape_zyx))
  aff = affine_for(spacing_zyx[::-1], LAS)
  stored = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1]).astype(np.int16)
  path = save_nifti(tmp_path / "ct.nii.gz", stored, aff)
  out = preprocess.load_and_preprocess(path, config=_data_config(target_shape=(16, 16, 16)))
  back = preprocess.to_original_grid(out.image, out.geometry)
  assert back.shape == stored.shape
  np.testing.assert_allclose(back, (stored + 1350.0) / 1500.0, atol=1e-6)
  written = io.write_nifti(tmp_path / "att.nii.gz", back, out.geometry.original_affine)
  img = nib.load(str(written))
  assert img.shape == nib.load(str(path)).shape
  np.testing.assert_allclose(img.affine, nib.load(str(path)).affine, atol=1e-5)


def test_to_original_grid_after_downsampling_smooth_volume(tmp_path):
  shape_zyx = (20, 40, 40)
  spacing_zyx = (1.25, 0.7168, 0.7168)  # Exactly 2x the effective spacing.
  z, y, x = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
  hu = np.round(-1000 + 20 * z + 10 * y + 5 * x).astype(np.int16)
  aff = affine_for(spacing_zyx[::-1], LAS)
  stored = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1])
  path = save_nifti(tmp_path / "ct.nii.gz", stored, aff)
  out = preprocess.load_and_preprocess(path, config=_data_config(target_shape=(12, 24, 24)))
  assert out.geometry.resampled_shape == (10, 20, 20)
  back = preprocess.to_original_grid(out.image, out.geometry)
  assert back.shape == stored.shape
  expected = (stored + 1350.0) / 1500.0
  # Linear data: only the outermost half output voxel (extrapolated to 0 padding) differs.
  interior = (slice(2, -2),) * 3
  np.testing.assert_allclose(back[interior], expected[interior], atol=1e-4)
  # A coarse map (e.g. a CAM at 1/4) covering the padded field of view maps to the same place.
  coarse = out.image.reshape(3, 4, 6, 4, 6, 4).mean(axis=(1, 3, 5))
  assert preprocess.to_original_grid(coarse, out.geometry).shape == stored.shape
  np.testing.assert_allclose(
      preprocess.to_original_grid(np.full((3, 6, 6), 0.25), out.geometry), 0.25, atol=1e-6)
  # A coarse map that is 1 on one coarse voxel lands on the right part of the original grid:
  # target voxels [4:8, 8:12, 4:8] (z, y, x) = resampled [3:7, 6:10, 2:6] (pad 1, 2, 2)
  # = canonical input voxels [6:14, 12:20, 4:12].
  coarse = np.zeros((3, 6, 6))
  coarse[1, 2, 1] = 1.0
  back = preprocess.to_canonical_grid(coarse, out.geometry, order=0)
  expected = np.zeros(shape_zyx)
  expected[6:14, 12:20, 4:12] = 1.0
  np.testing.assert_array_equal(back, expected)


def test_target_affine_maps_to_same_world_point():
  vol = _volume(np.zeros((30, 50, 40)), (2.0, 0.6, 0.6), LAS)
  g = preprocess.plan_geometry(vol, preprocess.PreprocessSettings(target_shape=(40, 64, 64)))
  t = np.array([7.0, 11.0, 13.0])  # (z, y, x) on the target grid.
  world_via_target = g.target_affine() @ np.r_[t[::-1], 1.0]
  j = g.target_to_canonical(t)
  world_via_canonical = g.canonical_affine @ np.r_[j[::-1], 1.0]
  np.testing.assert_allclose(world_via_target, world_via_canonical, atol=1e-9)
  np.testing.assert_allclose(np.linalg.norm(g.target_affine()[:3, :3], axis=0),
                             np.array(g.output_spacing)[::-1])


def test_masks_ratio_and_lung_masking(ct_case):
  cfg = _data_config(target_shape=(16, 32, 32), target_spacing=(5.0, 5.0, 5.0),
                     apply_lung_mask=True)
  out = preprocess.load_and_preprocess(ct_case["image"], ct_case["lung_mask"],
                                       ct_case["infection_mask"], config=cfg)
  lung, inf = ct_case["lung"], ct_case["infection"]
  assert out.ratio == pytest.approx(inf.sum() / (lung | inf).sum())
  assert out.lung_mask_source == "file"
  np.testing.assert_array_equal(out.lung_mask, lung)  # Identity grid (10 mm in, 10 mm out).
  np.testing.assert_array_equal(out.infection_mask, inf)
  expected = np.clip((ct_case["hu"] + 1350.0) / 1500.0, 0, 1) * lung
  np.testing.assert_allclose(out.image, expected, atol=1e-6)


def test_mask_on_input_grid_equals_resample_first_on_an_identity_grid(ct_case):
  # 10 mm in, 10 mm out: resampling is the identity, so the order cannot matter.
  cfg = dict(target_shape=(16, 32, 32), target_spacing=(5.0, 5.0, 5.0), apply_lung_mask=True)
  first = [preprocess.load_and_preprocess(ct_case["image"], ct_case["lung_mask"],
                                          config=_data_config(mask_on_input_grid=m, **cfg))
           for m in (False, True)]
  np.testing.assert_array_equal(first[0].image, first[1].image)
  np.testing.assert_array_equal(first[0].lung_mask, first[1].lung_mask)


_COARSE = dict(target_shape=(8, 16, 16), target_spacing=(5.0, 5.0, 5.0), scale_factor=0.2,
               apply_lung_mask=True)  # 10 mm in, 25 mm out.


def _both_orders(ct_case, lung_file, **cfg):
  return [preprocess.load_and_preprocess(ct_case["image"], lung_file,
                                         config=_data_config(mask_on_input_grid=m, **cfg))
          for m in (False, True)]


@pytest.mark.parametrize("mask_first", [False, True])
def test_keep_ct_is_the_windowed_ct_without_the_lung_multiplication(ct_case, mask_first):
  # What predict's overview shows: the same preprocessing with apply_lung_mask False, while the
  # network input stays the configured product (both orders of masking).
  cfg = dict(_COARSE, mask_on_input_grid=mask_first)
  out = preprocess.load_and_preprocess(ct_case["image"], ct_case["lung_mask"],
                                       config=_data_config(**cfg), keep_ct=True)
  plain = preprocess.load_and_preprocess(ct_case["image"], ct_case["lung_mask"],
                                         config=_data_config(**dict(cfg, apply_lung_mask=False)))
  default = preprocess.load_and_preprocess(ct_case["image"], ct_case["lung_mask"],
                                           config=_data_config(**cfg))
  np.testing.assert_array_equal(out.ct, plain.image)
  np.testing.assert_array_equal(out.image, default.image)
  assert default.ct is None
  assert (out.ct > out.image).any()  # The chest wall is outside the lung.


def test_mask_on_input_grid_darkens_only_the_rim(ct_case):
  # The outer layer mixes the lung with the chest wall (resample first) or with zeros (mask
  # first). Linear weights and windowed values are >= 0, so masked-first is never brighter;
  # where the whole 2x2x2 interpolation stencil lies in the lung both interpolate the same
  # values (float32 rounding: a few ulp of 1).
  after, first = _both_orders(ct_case, ct_case["lung_mask"], **_COARSE)
  np.testing.assert_array_equal(after.lung_mask, first.lung_mask)
  inside = after.lung_mask.astype(bool)
  assert inside.sum() > 20
  np.testing.assert_array_equal(first.image[~inside], 0.0)
  assert np.all(first.image <= after.image + 1e-6)
  assert (first.image[inside] < after.image[inside] - 0.05).any()  # The rim got darker.
  g = after.geometry
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in g.target_shape], indexing="ij"), -1)
  src = g.target_to_canonical(grid.reshape(-1, 3).astype(np.float64))
  lung_in = ct_case["lung"].astype(bool)
  lo = np.clip(np.floor(src).astype(int), 0, np.array(lung_in.shape) - 1)
  hi = np.minimum(lo + 1, np.array(lung_in.shape) - 1)
  stencil_in = np.ones(len(src), bool)
  for corner in np.ndindex(2, 2, 2):
    idx = np.where(np.array(corner, bool), hi, lo)
    stencil_in &= lung_in[idx[:, 0], idx[:, 1], idx[:, 2]]
  core = stencil_in.reshape(g.target_shape) & inside
  assert core.sum() > 0
  np.testing.assert_allclose(first.image[core], after.image[core], atol=1e-6)


@pytest.mark.parametrize("with_infection_mask", [False, True])
def test_mask_on_input_grid_without_a_lung_file_resamples_first(ct_case, with_infection_mask):
  # The fallback's mask is made on the output grid: there is nothing to mask first (also when
  # an infection mask makes the fallback's mask go back to the input grid for the ratio).
  inf = ct_case["infection_mask"] if with_infection_mask else None
  after, first = [preprocess.load_and_preprocess(
      ct_case["image"], None, inf,
      config=_data_config(mask_on_input_grid=m, lung_mask_fallback=True, **_COARSE))
      for m in (False, True)]
  assert after.lung_mask_source == "fallback"
  np.testing.assert_array_equal(first.image, after.image)


def test_mask_grid_mismatch_and_empty_mask(ct_case, tmp_path):
  cfg = _data_config(target_shape=(16, 32, 32), target_spacing=(5.0, 5.0, 5.0))
  small = save_nifti(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.uint8), ct_case["affine"])
  with pytest.raises(DataError, match="does not match its image"):
    preprocess.load_and_preprocess(ct_case["image"], small, config=cfg)
  shifted_aff = ct_case["affine"].copy()
  shifted_aff[0, 3] += 5.0
  shifted = save_nifti(tmp_path / "shifted.nii.gz",
                       np.asarray(nib.load(str(ct_case["lung_mask"])).dataobj), shifted_aff)
  with pytest.raises(DataError, match="does not match its image"):
    preprocess.load_and_preprocess(ct_case["image"], None, shifted, config=cfg)
  empty = save_nifti(tmp_path / "empty.nii.gz", np.zeros((32, 32, 16), np.uint8),
                     ct_case["affine"])
  with pytest.raises(DataError, match="lung mask is empty"):
    preprocess.load_and_preprocess(ct_case["image"], empty, config=cfg)


def test_fallback_lung_mask_used_without_lung_file(ct_case):
  cfg = _data_config(target_shape=(16, 32, 32), target_spacing=(5.0, 5.0, 5.0),
                     apply_lung_mask=True, lung_mask_fallback=True)
  out = preprocess.load_and_preprocess(ct_case["image"], None, ct_case["infection_mask"],
                                       config=cfg)
  assert out.lung_mask_source == "fallback"
  truth = ct_case["lung"].astype(bool)
  found = out.lung_mask.astype(bool)
  dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
  print(f"fallback Dice on the 10 mm phantom: {dice:.3f}")
  assert dice > 0.85
  assert np.isfinite(out.ratio) and 0 < out.ratio < 1


@pytest.mark.slow
def test_real_ct_preprocess_time(real_ct_dir):
  t0 = time.perf_counter()
  out = preprocess.load_and_preprocess(real_ct_dir / "P002.nii.gz")
  seconds = time.perf_counter() - t0
  print(f"P002 512x512x133 load_and_preprocess: {seconds:.2f} s")
  chex.assert_shape(out.image, (138, 256, 256))
  assert out.image.min() == 0.0 and out.image.max() <= 1.0
  assert out.lung_mask_source == "fallback"
  assert out.geometry.fit_factor == 1.0
  np.testing.assert_allclose(out.geometry.output_spacing, (2.5, 1.4336, 1.4336))
  back = preprocess.to_original_grid(out.lung_mask.astype(np.float32), out.geometry, order=0)
  assert back.shape == (512, 512, 133)
  assert seconds < 30
