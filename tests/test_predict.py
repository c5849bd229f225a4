"""Prediction for one CT (dsan_jax.predict)."""

import json
import pathlib

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from dsan_jax import predict
from dsan_jax.errors import DataError
from tests.test_end_to_end import (read_csv, run_cli, smoke_manifest,  # noqa: F401
                                   trained_workdir, VARIANTS)


def _rotation_z(deg: float) -> np.ndarray:
  a = np.deg2rad(deg)
  return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _phantom(shape=(36, 40, 14)):
  """A small chest-like volume in HU (x, y, z order) with lungs and a lesion, and its masks."""
  x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  body = (x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1
  # An asymmetric left lung (x > 0), so that a flipped axis would show in the results.
  lung = (((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 <= 1) | (((x + 0.4) / 0.25) ** 2 +
                                                           ((y - 0.1) / 0.4) ** 2 <= 1)
  lung &= np.abs(z) < 0.9
  lesion = lung & (((x - 0.45) / 0.25) ** 2 + ((y + 0.1) / 0.3) ** 2 + (z / 0.6) ** 2 <= 1)
  hu = np.full(shape, -1000.0, np.float32)
  hu[body] = 40.0
  hu[lung] = -850.0
  hu[lesion] = -300.0
  rng = np.random.default_rng(0)
  hu += rng.normal(0, 15, shape).astype(np.float32)
  return hu.astype(np.int16), lung.astype(np.uint8), lesion.astype(np.uint8)


def _las_affine(spacing=(0.9, 0.8, 2.5)) -> np.ndarray:
  """Voxel -> world (RAS mm): i runs to the patient's Left (x decreasing), slightly oblique."""
  a = np.eye(4)
  a[:3, :3] = _rotation_z(4.0) @ np.diag([-spacing[0], spacing[1], spacing[2]])
  a[:3, 3] = (30.0, -12.0, 40.0)
  return a


def _save(path, data, affine):
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, str(path))
  return path


def _write_case(folder: pathlib.Path, flip_to_ras: bool = False):
  """Writes image, lung and infection masks; ``flip_to_ras`` stores the same world grid with
  the first axis reversed (RAS-like storage of the identical image)."""
  hu, lung, lesion = _phantom()
  affine = _las_affine()
  if flip_to_ras:
    n = hu.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n - 1  # Voxel i' = n - 1 - i.
    affine = affine @ flip
    hu, lung, lesion = hu[::-1], lung[::-1], lesion[::-1]
  folder.mkdir(parents=True, exist_ok=True)
  return (_save(folder / "ct.nii.gz", np.ascontiguousarray(hu), affine),
          _save(folder / "lung.nii.gz", np.ascontiguousarray(lung), affine),
          _save(folder / "inf.nii.gz", np.ascontiguousarray(lesion), affine))


# ------------------------------------------------------------------------ errors (fast).


def _error_line(res) -> str:
  assert res.returncode != 0
  assert "Traceback" not in res.stderr, res.stderr
  lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, res.stderr
  return lines[0]


def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path):
  ct, lung, _ = _write_case(tmp_path / "case")
  empty_workdir = tmp_path / "work"
  empty_workdir.mkdir()
  bad = tmp_path / "bad.nii.gz"
  bad.write_bytes(b"this is not a NIfTI file at all" * 10)
  missing = tmp_path / "missing.nii.gz"
  out = tmp_path / "out"
  cases = [
      (["--image", str(missing)], str(missing)),  # Missing image.
      (["--image", str(bad)], str(bad)),  # Not a NIfTI.
      (["--image", str(ct), "--lung-mask", str(bad)], str(bad)),  # Bad mask.
      (["--image", str(ct)], str(empty_workdir)),  # No trained runs.
  ]
  for args, named in cases:
    res = run_cli(["-m", "dsan_jax.predict", "--workdir", str(empty_workdir), "--out", str(out),
                   *args], timeout=300)
    line = _error_line(res)
    assert line.startswith(f"error: {named}: "), line
    assert not out.exists()  # Nothing half-written.
  assert not list(tmp_path.glob(".out*"))


def test_refuses_to_replace_a_foreign_output_folder(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "thesis.tex").write_text("precious")
  with pytest.raises(DataError, match="refusing"):
    predict._check_out(out)
  (tmp_path / "file").write_text("x")
  with pytest.raises(DataError, match="not a directory"):
    predict._check_out(tmp_path / "file")


# ------------------------------------------------------------- with trained models (slow).


@pytest.fixture(scope="module")
def las_and_ras_predictions(trained_workdir, tmp_path_factory):
  base = tmp_path_factory.mktemp("predict")
  out = {}
  for name, flip in (("las", False), ("ras", True)):
    ct, lung, inf = _write_case(base / name, flip_to_ras=flip)
    res = predict.predict_case(trained_workdir, ct, lung, inf, out=base / f"out_{name}")
    out[name] = (res, base / f"out_{name}", ct)
  ct, lung, _ = _write_case(base / "noinf")
  out["noinf"] = (predict.predict_case(trained_workdir, ct, lung, None, out=None), None, ct)
  out["given"] = (predict.predict_case(trained_workdir, ct, lung, None, out=None,
                                       infection_ratio=0.5), None, ct)
  return out


@pytest.mark.slow
def test_attention_nifti_has_the_input_shape_and_affine(las_and_ras_predictions):
  for name in ("las", "ras"):
    res, out, ct = las_and_ras_predictions[name]
    src = nib.load(str(ct))
    assert nib.aff2axcodes(src.affine)[0] == ("L" if name == "las" else "R")
    for f in ("attention.nii.gz", "attention_att_rn34_us.nii.gz", "gradcam_rn34_us.nii.gz"):
      att = nib.load(str(out / f))
      assert att.shape == src.shape == tuple(res["input_shape"])
      np.testing.assert_allclose(att.affine, src.affine, atol=1e-5)
      np.testing.assert_allclose(att.header.get_zooms(), src.header.get_zooms(), rtol=1e-6)
      data = np.asarray(att.dataobj)
      assert data.dtype == np.float32
      assert np.all(np.isfinite(data)) and data.min() >= 0 and data.max() <= 1 + 1e-6


@pytest.mark.slow
def test_same_world_image_gives_the_same_map_in_world_space(las_and_ras_predictions):
  """The same image stored LAS and RAS: same probabilities, maps equal after the flip."""
  las, out_las, _ = las_and_ras_predictions["las"]
  ras, out_ras, _ = las_and_ras_predictions["ras"]
  assert las["probability"] == pytest.approx(ras["probability"], abs=1e-6)
  a = np.asarray(nib.load(str(out_las / "attention.nii.gz")).dataobj)
  b = np.asarray(nib.load(str(out_ras / "attention.nii.gz")).dataobj)
  np.testing.assert_allclose(a[::-1], b, atol=1e-6)


@pytest.mark.slow
def test_prediction_json_keys_and_values(las_and_ras_predictions):
  res, out, _ = las_and_ras_predictions["las"]
  on_disk = json.loads((out / "prediction.json").read_text())
  assert on_disk == json.loads(json.dumps(res))
  for key in ("probability", "label", "label_index", "probability_model", "threshold",
              "ensemble", "models", "folds", "ratio", "ratio_source", "lung_mask_source",
              "attention_map", "inputs", "input_shape", "input_affine", "files",
              "ratio_estimated", "ratio_group", "ensemble_ratio_band", "lung_volume_ml",
              "model_weights"):
    assert key in res, key
  assert set(res["models"]) == set(VARIANTS) and res["folds"] == [0]
  for v, m in res["models"].items():
    assert 0 <= m["prob"] <= 1
    assert m["prob"] == pytest.approx(np.mean(list(m["prob_per_fold"].values())))
    assert m["label"] == ("COVID" if m["prob"] >= 0.5 else "CAP")
  # The ratio from the masks, computed here independently: |I| / |L u I| voxels.
  _, lung, lesion = _phantom()
  assert res["ratio"] == pytest.approx(lesion.sum() / (lung | lesion).sum(), rel=1e-9)
  assert res["ratio_source"] == "mask" and res["ratio_estimated"] is False
  assert res["ratio_group"] == ("< 0.005" if res["ratio"] < 0.005 else
                                "> 0.03" if res["ratio"] > 0.030 else "0.005 - 0.03")
  # Lung volume: the lung mask resampled to the network's grid; the true volume within the
  # partial-volume error of that coarse (2.87 x 2.87 x 5 mm) grid on a ~30 mm phantom.
  true_ml = lung.sum() * float(np.prod(nib.load(str(out.parent / "las" / "lung.nii.gz"))
                                       .header.get_zooms()[:3])) / 1000.0
  assert abs(res["lung_volume_ml"] - true_ml) < 0.35 * true_ml
  assert {(m["variant"], m["fold"]) for m in res["model_weights"]} == {(v, 0) for v in VARIANTS}
  for m in res["model_weights"]:
    assert m["checkpoint"] == "best" and isinstance(m["step"], int) and m["step"] > 0
    assert pathlib.Path(m["run_dir"]).is_dir()
  assert "summary.png" in res["files"] and (out / "summary.png").stat().st_size > 10_000
  ens = res["ensemble"]
  w = 0.35 if (res["ratio"] < 0.001 or res["ratio"] > 0.030) else 0.96
  assert ens["w_us"] == w
  p = w * res["models"]["att_rn34_us"]["prob"] + (1 - w) * res["models"]["att_rn34_ss"]["prob"]
  assert ens["prob"] == pytest.approx(p, abs=1e-12) and res["probability"] == ens["prob"]
  assert res["label"] == ("COVID" if p >= 0.5 else "CAP") and res["label_index"] == int(p >= 0.5)
  np.testing.assert_allclose(res["input_affine"], _las_affine(), atol=1e-5)
  assert sorted(res["files"]) == sorted(f.name for f in out.iterdir())


@pytest.mark.slow
def test_without_infection_mask_the_ratio_is_estimated(las_and_ras_predictions,
                                                        trained_workdir):
  res, _, ct = las_and_ras_predictions["noinf"]
  assert res["ratio_source"] == "estimate" and res["ratio_estimated"] is True
  assert "ESTIMATED" in res["ratio_note"] and res["ratio_from_mask"] is None
  from dsan_jax.training import run_folder
  from dsan_jax.data import preprocess
  config = run_folder.load_config(trained_workdir / "att_rn34_us" / "fold_0" / "config.json")
  pre = preprocess.load_and_preprocess(ct, ct.parent / "lung.nii.gz", None, config=config)
  assert res["ratio"] == pre.ratio_estimate
  w = 0.35 if (res["ratio"] < 0.001 or res["ratio"] > 0.030) else 0.96
  assert res["ensemble"]["w_us"] == w and "ESTIMATED" in res["ensemble"]["weight_rule"]
  given = las_and_ras_predictions["given"][0]
  assert given["ratio"] == 0.5 and given["ratio_source"] == "given"
  assert given["ratio_estimated"] is False and given["ensemble"]["w_us"] == 0.35
  with_mask = las_and_ras_predictions["las"][0]
  for v in VARIANTS:  # The infection mask only changes the ratio, not the network's input.
    assert res["models"][v]["prob"] == pytest.approx(with_mask["models"][v]["prob"], abs=1e-6)


@pytest.mark.slow
def test_matches_the_evaluation_of_a_validation_case(trained_workdir, tmp_path):
  """Preprocessing at prediction time = the training cache's (up to its uint8 quantisation)."""
  preds = read_csv(trained_workdir / "evaluation" / "predictions.csv")
  manifest = {r["case_id"]: r for r in read_csv(smoke_manifest(trained_workdir))}
  case_id = next(r["case_id"] for r in preds if r["split"] == "val")
  row = manifest[case_id]
  root = smoke_manifest(trained_workdir).parent
  res = predict.predict_case(trained_workdir, root / row["image"], root / row["lung_mask"],
                             None, out=None, fold=0)
  for v in VARIANTS:
    expected = next(float(r["prob"]) for r in preds
                    if r["model"] == v and r["case_id"] == case_id and r["split"] == "val")
    assert res["models"][v]["prob"] == pytest.approx(expected, abs=5e-3), v
  with pytest.raises(DataError, match="no trained run for fold 2"):
    predict.predict_case(trained_workdir, root / row["image"], fold=2)


@pytest.mark.slow
def test_a_model_trained_masked_on_the_input_grid_gets_that_input(trained_workdir,
                                                                   monkeypatch):
  """With ``data.mask_on_input_grid`` the network input is masked first, as in the cache."""
  from dsan_jax.data import preprocess
  row = next(iter(read_csv(smoke_manifest(trained_workdir))))
  root = smoke_manifest(trained_workdir).parent
  image, lung = root / row["image"], root / row["lung_mask"]
  runs_and_config, predict_runs = predict._runs_and_config, predict._predict_runs
  seen = {}

  def masked_first(*args):
    runs, unfinished, config = runs_and_config(*args)
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.mask_on_input_grid = True
    seen["config"] = config
    return runs, unfinished, config

  def record(runs, net_image):
    seen["image"] = np.asarray(net_image)
    return predict_runs(runs, net_image)

  monkeypatch.setattr(predict, "_runs_and_config", masked_first)
  monkeypatch.setattr(predict, "_predict_runs", record)
  predict.predict_case(trained_workdir, image, lung, None, out=None, fold=0)
  expected = preprocess.load_and_preprocess(image, lung, config=seen["config"]).image
  np.testing.assert_array_equal(seen["image"], expected)
  seen["config"].data.mask_on_input_grid = False
  resampled_first = preprocess.load_and_preprocess(image, lung, config=seen["config"]).image
  assert not np.array_equal(expected, resampled_first)  # The order matters on this grid.
