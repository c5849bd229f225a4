"""Testbed calibration: how the synthetic phantoms look to the network, and reference classifiers.

Measures, on a phantom manifest (or real CTs), after the project's preprocessing with a config:

* ``frame``: extent of the lung mask in the preprocessed frame (fraction of each axis) and the
  lungs' physical size in mm; run it on ../shared/data/ct/*.nii.gz (lung-mask fallback) to get
  the real-CT reference.
* ``calibrate``: the size-only oracle AUC (true infection ratio), the AUC of the "visible size"
  (fraction of lung input voxels above -600 HU), and a 5-fold cross-validated logistic regression
  on seven hand-made lung-density features of the network's input (docs/testbed.md).

* ``phantoms``: the config's phantom set (same cases, labels, ratios and splits) rendered with
  the ablation knobs of ``synthetic.Diagnostic`` (lesion / vessel contrast): a DIAGNOSTIC set
  for ablations, not the testbed.
* ``crop``: a copy of a manifest's scans cropped to the lung bounding box plus a margin, so that
  the preprocessing fits the lungs, not the chest, into the frame (lung-size ablation).
* ``runs``: one table row per ablation run (AUC per epoch, best / last, final training loss).
* ``visibility``: a DIAGNOSTIC copy of a built cache whose images show the lesions differently
  (``perfect``: 0.31 in the lung, 0.90 on the infection mask, no vessels, rim or noise;
  ``rimless``: the CT, with the lung mask's outer voxel layer, where not infected, set to the
  median of the lung's inner non-infected voxels). Training on it separates "the network cannot
  see the lesions" from "it cannot learn from them" (docs/testbed.md, section 4).
* ``voxels``: HU percentiles of a cache's infected inner, non-infected inner and non-infected
  outer-layer lung voxels, and the voxel AUC of lesion against inner lung.
* ``head``: pooled validation AUCs of logistic regressions (fitted fold by fold, as the
  reference rows are) on the density features, on subsets of them, and on quantities the
  paper's GAP -> Dense(1) head can form (``gap_features``: frame means of per-voxel functions of
  the input), for a workdir whose data is prepared (docs/testbed.md, section 5).

Run:
    python benchmarks/testbed.py frame --config configs/quickstart.py ../shared/data/ct/*.nii.gz
    python benchmarks/testbed.py calibrate --config configs/quickstart.py --manifest M.csv
    python benchmarks/testbed.py phantoms --config configs/quickstart.py --out DIR --vessel-contrast 0
    python benchmarks/testbed.py crop --manifest M.csv --out DIR [--margin-mm 10]
    python benchmarks/testbed.py runs RUN_DIR...
    python benchmarks/testbed.py visibility --cache CACHE --out DIR --mode perfect|rimless
    python benchmarks/testbed.py voxels --cache CACHE [--limit 150]
    python benchmarks/testbed.py head --config configs/protocol_cpu.py --workdir W [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

import numpy as np

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ importable.

from dsan_jax.evaluation import reference  # noqa: E402
from dsan_jax.data import preprocess  # noqa: E402

FEATURES = reference.FEATURES


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def lung_extent(lung: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
  """Bounding box of a [D, H, W] mask: (fraction of each axis, extent in mm (z, y, x))."""
  idx = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
  n = np.array([i[-1] - i[0] + 1 if i.size else 0 for i in idx], np.float64)
  return n / np.asarray(lung.shape), n * np.asarray(spacing_zyx)


def features(img: np.ndarray, lung: np.ndarray, hu_window) -> np.ndarray:
  """Seven crude density features of one preprocessed input (``reference.density_features``)."""
  return reference.density_features(img, lung, hu_window)


APPEARANCE = ("lesion mean HU", "consolidated share", "minor-lung share",
              "median depth under the lung surface (mm)", "log number of foci")


def appearance(hu: np.ndarray, lung: np.ndarray, inf: np.ndarray, spacing_xyz) -> np.ndarray:
  """Size-free features of the true lesion on the native grid (what the lesion looks like).

  Returns:
    float64 [5] (see ``APPEARANCE``); zeros when the mask is empty.
  """
  from scipy import ndimage
  m = inf.astype(bool)
  if not m.any():
    return np.zeros(len(APPEARANCE))
  h = hu[m].astype(np.float64)
  w = lung.shape[2]
  right = m[..., w // 2:].sum()
  minor = min(right, m.sum() - right) / m.sum()
  depth = ndimage.distance_transform_edt(lung.astype(bool), sampling=tuple(spacing_xyz)[::-1])
  n_foci = ndimage.label(m)[1]
  return np.array([h.mean(), np.mean(h > -300), minor, np.median(depth[m]), np.log(n_foci)])


def _preprocess_rows(manifest: Path, config, limit: int, with_appearance: bool = False):
  with open(manifest, newline="") as f:
    rows = list(csv.DictReader(f))[: limit or None]
  out = []
  for r in rows:
    p = preprocess.load_and_preprocess(manifest.parent / r["image"],
                                       manifest.parent / r["lung_mask"],
                                       manifest.parent / r["infection_mask"], config)
    frac, mm = lung_extent(p.lung_mask, p.geometry.output_spacing)
    app = np.zeros(len(APPEARANCE))
    if with_appearance:
      from dsan_jax.data import synthetic
      hu, sp = synthetic.read_canonical(manifest.parent / r["image"])
      lung, _ = synthetic.read_canonical(manifest.parent / r["lung_mask"])
      inf, _ = synthetic.read_canonical(manifest.parent / r["infection_mask"])
      app = appearance(hu, lung, inf, sp)
    lo, hi = config.data.hu_window
    bright = (p.image * (hi - lo) + lo > -600) & p.lung_mask.astype(bool)
    mimic_vox = bright & ~p.infection_mask.astype(bool)
    mimic = float(mimic_vox.sum() / p.lung_mask.sum())
    from scipy import ndimage
    outer = p.lung_mask.astype(bool) & ~ndimage.binary_erosion(p.lung_mask.astype(bool))
    out.append(dict(label=int(r["label"] == "covid"), ratio=float(r["infection_ratio"]),
                    mimic=mimic, app=app, outer=float(outer.sum() / p.lung_mask.sum()),
                    mimic_outer=float((mimic_vox & outer).sum() / max(mimic_vox.sum(), 1)),
                    feats=features(p.image, p.lung_mask, config.data.hu_window), frac=frac,
                    mm=mm, lung_vox=int(p.lung_mask.sum()),
                    inf_vox=int(p.infection_mask.sum())))
  return out


def _cv_auc(x: np.ndarray, y: np.ndarray) -> float:
  """5-fold cross-validated AUC of a standardised logistic regression."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from sklearn.model_selection import StratifiedKFold, cross_val_predict
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  if min(y.sum(), (1 - y).sum()) < 5:
    return float("nan")
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  cv = StratifiedKFold(5, shuffle=True, random_state=0)
  return float(roc_auc_score(y, cross_val_predict(clf, x, y, cv=cv, method="predict_proba")[:, 1]))


def calibrate(manifest: Path, config, limit: int = 0, with_appearance: bool = False) -> dict:
  """Size-only, visible-size, density-feature (and lesion-appearance) AUCs on a manifest."""
  from sklearn.metrics import roc_auc_score

  rows = _preprocess_rows(manifest, config, limit, with_appearance)
  y = np.array([r["label"] for r in rows])
  ratio = np.array([r["ratio"] for r in rows])
  x = np.stack([r["feats"] for r in rows])
  frac = np.stack([r["frac"] for r in rows])
  mm = np.stack([r["mm"] for r in rows])
  res = dict(n=len(rows), covid=int(y.sum()), auc_size=roc_auc_score(y, ratio),
             auc_visible=roc_auc_score(y, x[:, 6]), auc_features=_cv_auc(x, y),
             auc_features_and_ratio=_cv_auc(np.concatenate([x, np.log(ratio)[:, None]], 1), y),
             frame_frac_median=np.median(frac, 0), lung_mm_median=np.median(mm, 0),
             bright_outside_infection_median=float(np.median([r["mimic"] for r in rows])),
             # Share of those bright voxels on the lung mask's outer voxel layer; that layer's
             # share of the lung (partial volume of the chest wall and mediastinum).
             bright_outside_on_outer_layer_median=float(np.median([r["mimic_outer"] for r in rows])),
             outer_layer_of_lung_median=float(np.median([r["outer"] for r in rows])),
             ratio_median_covid=float(np.median(ratio[y == 1])),
             ratio_median_cap=float(np.median(ratio[y == 0])),
             lung_vox_median=float(np.median([r["lung_vox"] for r in rows])),
             inf_vox_cap_small=float(np.median([r["inf_vox"] for r in rows
                                                if r["label"] == 0 and r["ratio"] <= 1e-3] or [0])))
  if with_appearance:
    app = np.stack([r["app"] for r in rows])
    small = ratio < 0.005
    large = ratio > 0.03
    res.update(auc_appearance=_cv_auc(app, y), auc_appearance_small=_cv_auc(app[small], y[small]),
               auc_appearance_large=_cv_auc(app[large], y[large]),
               auc_features_small=_cv_auc(x[small], y[small]),
               auc_features_large=_cv_auc(x[large], y[large]),
               n_small=int(small.sum()), n_large=int(large.sum()))
  return res


def frame(paths, config) -> list[dict]:
  """Lung extent in the preprocessed frame for CTs without masks (lung-mask fallback)."""
  out = []
  for p in paths:
    pp = preprocess.load_and_preprocess(p, None, None, config)
    frac, mm = lung_extent(pp.lung_mask, pp.geometry.output_spacing)
    lo, hi = config.data.hu_window
    m = pp.lung_mask.astype(bool)
    bright = float(np.mean(pp.image[m] * (hi - lo) + lo > -600))
    vol_l = float(m.sum() * np.prod(pp.geometry.output_spacing) / 1e6)
    out.append(dict(path=str(p), frame_frac_zyx=frac.round(3), lung_mm_zyx=mm.round(0),
                    bright_fraction=round(bright, 3), lung_litres=round(vol_l, 2),
                    spacing=np.round(pp.geometry.output_spacing, 2)))
  return out


def diagnostic_phantoms(out: Path, config, lesion_contrast: float, vessel_contrast: float,
                        workers: int) -> Path:
  """The config's phantom set rendered with ``synthetic.Diagnostic`` knobs; returns the manifest."""
  from dsan_jax.data import synthetic
  s = config.data.synthetic
  return synthetic.generate(out, s.num_cases, s.seed, s.size_scale, test_fraction=s.test_fraction,
                            num_workers=workers, diagnostic=synthetic.Diagnostic(
                                lesion_contrast=lesion_contrast, vessel_contrast=vessel_contrast))


def crop_to_lungs(manifest: Path, out: Path, margin_mm: float = 10.0) -> Path:
  """Copies a manifest's scans cropped to the lung bounding box + ``margin_mm`` (all three axes).

  The crop keeps every lung (and so every infection) voxel, so the ratios do not change; the
  rows are copied with the paths of the copies (``images/``, ``lung_masks/``,
  ``infection_masks/`` under ``out``). Returns the new manifest.
  """
  import nibabel as nib
  if out.resolve() == manifest.parent.resolve():
    raise ValueError(f"{out}: the cropped copy needs a folder of its own")
  with open(manifest, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    lung_img = nib.load(manifest.parent / r["lung_mask"])
    lung = np.asanyarray(lung_img.dataobj) > 0
    pad = np.ceil(margin_mm / np.asarray(lung_img.header.get_zooms()[:3])).astype(int)
    box = []
    for k in range(3):
      idx = np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != k)))
      box.append(slice(max(int(idx[0]) - pad[k], 0), int(idx[-1]) + 1 + pad[k]))
    for col in ("image", "lung_mask", "infection_mask"):
      src, r[col] = manifest.parent / r[col], f"{col}s/{Path(r[col]).name}"
      (out / r[col]).parent.mkdir(parents=True, exist_ok=True)
      nib.load(src).slicer[tuple(box)].to_filename(str(out / r[col]))
  with open(out / "manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
  return out / "manifest.csv"


def _cache_entries(cache: Path, limit: int = 0):
  """(key, image uint8 [D, H, W], infection mask bool [D, H, W]) of a cache's entries."""
  import math
  from dsan_jax.data import cache as cache_lib
  sidecars = sorted(cache.glob("*.json"))
  for js in sidecars[:limit] if limit else sidecars:
    key = js.name[:-len(".json")]
    paths = cache_lib.entry_paths(cache, key)
    img = np.load(paths["image"])
    inf = (np.unpackbits(np.load(paths["mask"]), count=math.prod(img.shape)).reshape(img.shape)
           .astype(bool) if paths["mask"].exists() else np.zeros(img.shape, bool))
    yield key, img, inf


def _layers(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inner, outer layer) of the lung, which is where the cached image is > 0."""
  from scipy import ndimage
  lung = img > 0
  inner = ndimage.binary_erosion(lung)
  return inner, lung & ~inner


def visibility_cache(cache: Path, out: Path, mode: str) -> int:
  """Writes the diagnostic copy of ``cache`` (see the module docstring); returns the entries.

  Only ``<key>.image.npy`` is new (same shape and dtype, so the sidecar's size check holds);
  sidecars and masks are hard links, so training finds every entry under its usual key.
  """
  import os
  from dsan_jax.data import cache as cache_lib
  if mode not in ("perfect", "rimless"):
    raise ValueError(f"unknown mode {mode!r} (perfect, rimless)")
  if out.resolve() == cache.resolve():
    raise ValueError(f"{out}: the diagnostic copy needs a folder of its own")
  out.mkdir(parents=True, exist_ok=True)
  n = 0
  for key, img, inf in _cache_entries(cache):
    inner, outer = _layers(img)
    if mode == "perfect":
      new = np.where(inf, 230, np.where(img > 0, 80, 0)).astype(np.uint8)
    else:  # rimless
      new = img.copy()
      ref = img[inner & ~inf]
      new[outer & ~inf] = np.uint8(np.median(ref)) if ref.size else 80
    np.save(cache_lib.entry_paths(out, key)["image"], new)
    src = cache_lib.entry_paths(cache, key)
    for f in (src["meta"], src["mask"]):
      if f.exists() and not (out / f.name).exists():
        os.link(f, out / f.name)
    n += 1
  return n


def voxel_stats(cache: Path, hu_window, limit: int = 150) -> dict[str, str]:
  """HU percentiles (10/50/90) and the share above -600 HU of three kinds of lung voxel."""
  from sklearn.metrics import roc_auc_score
  lo, hi = hu_window
  kinds = {"infected, inner": [], "not infected, inner": [], "not infected, outer layer": []}
  for _, img, inf in _cache_entries(cache, limit):
    if not inf.any():
      continue
    inner, outer = _layers(img)
    for k, m in zip(kinds, (inf & inner, inner & ~inf, outer & ~inf)):
      kinds[k].append(img[m])
  res = {}
  for k, v in kinds.items():
    hu = np.concatenate(v).astype(np.float64) / 255 * (hi - lo) + lo
    kinds[k] = hu
    res[k] = (f"n={hu.size}, HU p10/p50/p90 {np.percentile(hu, [10, 50, 90]).round(0)}, "
              f"> -600 HU {np.mean(hu > -600):.3f}")
  a, b = kinds["infected, inner"], kinds["not infected, inner"]
  res["voxel AUC, infected vs not (inner)"] = f"{roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b]):.3f}"
  return res


GAP_FEATURES = ("GGO band", "dense band", "bright", "lung", "HU", "HU^2 / 1000",
                "bright near the pleura", "bright, left half", "bright, right half")


def gap_features(image: np.ndarray, hu_window) -> np.ndarray:
  """Frame means of per-voxel functions of one network input (``GAP_FEATURES``).

  A linear function of these is what GAP -> Dense(1) computes on feature maps that are those
  functions; unlike ``reference.density_features`` there is no logarithm, ratio or balance.

  Args:
    image: float [D, H, W] in [0, 1] (windowed CT, times the lung mask; lung = image > 0).
    hu_window: (low, high) HU of the window.

  Returns:
    float64 [9]: the GGO band (-750, -300] HU, the dense band > -300 HU and bright > -600 HU,
    all within the lung; the lung; HU and HU^2 / 1000 within the lung; bright voxels within 2
    voxels of the lung's surface; bright voxels in the left and right halves of the frame.
  """
  from scipy import ndimage
  lo, hi = hu_window
  lung = image > 0
  hu = image.astype(np.float64) * (hi - lo) + lo
  bright = (hu > -600) & lung
  near = bright & ~ndimage.binary_erosion(lung, iterations=2)
  w = image.shape[2] // 2
  parts = [(hu > -750) & (hu <= -300) & lung, (hu > -300) & lung, bright, lung,
           np.where(lung, hu, 0.0), np.where(lung, hu * hu / 1e3, 0.0), near,
           bright[..., :w], bright[..., w:]]
  return np.array([p.sum() / image.size for p in parts], np.float64)


def head_table(config, workdir: Path) -> list[tuple[str, float]]:
  """(name, pooled validation AUC) of logistic regressions on feature sets (``head``)."""
  from sklearn.metrics import roc_auc_score
  from dsan_jax.data import prepare
  data = prepare.prepare_data(config, workdir, progress=False)
  ds, folds = data.dataset, data.folds
  y = np.asarray(ds.labels)
  f7, g = [], []
  for i in range(len(y)):  # One image at a time: a protocol's cache is ~0.9 GB as float32.
    im = ds[i]["image"].astype(np.float32)
    f7.append(reference.density_features(im, im > 0, config.data.hu_window))
    g.append(gap_features(im, config.data.hu_window))
  f7, g = np.stack(f7), np.stack(g)
  tv = folds >= 0

  def pooled(x):
    p = np.zeros(len(y))
    for _, _, _, idx, prob in reference.cross_fitted({"x": x}, y, folds, splits=("val",)):
      p[idx] = prob
    return float(roc_auc_score(y[tv], p[tv]))

  rows = [("size oracle (log true ratio)",
           pooled(np.log(np.maximum(np.asarray(ds.ratios), 1e-6))[:, None])),
          ("the 7 density features", pooled(f7))]
  rows += [(f"density feature alone: {n}", pooled(f7[:, [j]])) for j, n in enumerate(FEATURES)]
  rows += [("the 7 without the peripheral share", pooled(np.delete(f7, 5, 1))),
           ("the 9 GAP-representable frame means", pooled(g)),
           ("the same without the left / right halves", pooled(g[:, :7]))]
  return rows


def run_rows(run_dirs) -> list[str]:
  """Markdown rows: run, AUC per epoch, best / last, final training loss (``metrics.csv``)."""
  out = []
  for d in run_dirs:
    for m in sorted(Path(d).rglob("metrics.csv")):
      with open(m, newline="") as f:
        rows = list(csv.DictReader(f))
      auc = [float(r["val_auc"]) for r in rows]
      out.append(f"| {d} | {', '.join(f'{a:.3f}' for a in auc)} | {max(auc):.3f} / {auc[-1]:.3f}"
                 f" | {float(rows[-1]['train_loss']):.3f} |")
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("what", choices=("frame", "calibrate", "phantoms", "crop", "runs", "visibility",
                                   "voxels", "head"))
  ap.add_argument("paths", nargs="*")
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--out", help="output folder (phantoms, crop)")
  ap.add_argument("--lesion-contrast", type=float, default=1.0)
  ap.add_argument("--vessel-contrast", type=float, default=1.0)
  ap.add_argument("--margin-mm", type=float, default=10.0)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--manifest")
  ap.add_argument("--cache", help="a built cache folder (visibility, voxels)")
  ap.add_argument("--mode", default="perfect", help="visibility: perfect or rimless")
  ap.add_argument("--limit", type=int, default=0)
  ap.add_argument("--workdir", help="head: a workdir whose data (phantoms, cache) is prepared")
  ap.add_argument("--seed", type=int, help="head: config.data.synthetic.seed")
  ap.add_argument("--appearance", action="store_true",
                  help="also the size-free lesion-appearance features (native grid, slower)")
  args = ap.parse_intermixed_args(argv)
  if args.what == "runs":
    print("\n".join(run_rows(args.paths)))
    return 0
  if args.what == "crop":
    print(crop_to_lungs(Path(args.manifest), Path(args.out), args.margin_mm))
    return 0
  if args.what == "visibility":
    print(visibility_cache(Path(args.cache), Path(args.out), args.mode), "entries ->", args.out)
    return 0
  config = load_config(args.config)
  if args.what == "phantoms":
    print(diagnostic_phantoms(Path(args.out), config, args.lesion_contrast, args.vessel_contrast,
                              args.workers))
    return 0
  if args.what == "voxels":
    for k, v in voxel_stats(Path(args.cache), config.data.hu_window, args.limit or 150).items():
      print(f"{k}: {v}")
    return 0
  if args.what == "head":
    if args.seed is not None:
      config.data.synthetic.seed = args.seed
    for name, auc in head_table(config, Path(args.workdir)):
      print(f"| {name} | {auc:.3f} |")
    return 0
  if args.what == "frame":
    for r in frame(args.paths, config):
      print(r)
  else:
    res = calibrate(Path(args.manifest), config, args.limit, args.appearance)
    for k, v in res.items():
      print(f"{k}: {np.round(v, 3) if isinstance(v, (float, np.ndarray)) else v}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
