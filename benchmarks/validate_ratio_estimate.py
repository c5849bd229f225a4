"""Validates the infection-ratio estimate (``dsan_jax.data.infection_ratio``).

1. Phantoms (``dsan_jax.data.synthetic``, rendered in memory): the estimate through the same
   code path as the cache (``preprocess.preprocess_volume`` with ``infection_ratio="estimate"``
   and the lung-mask fallback) against the true r = |I| / |L u I| of the phantom's masks:
   Spearman correlation, and the fraction of cases whose size-balanced group
   (``sampling.size_groups``) and Table III group (``metrics.group_of_ratio``) agree. Also with
   the TRUE lung mask, to separate the estimator's error from the lung mask's.
2. Real CTs (``../shared/data/ct``, skipped when absent): the per-slice estimate against the
   radiologists' slice labels (``slice_labels.csv``): per-slice AUC. The labels follow the
   slices sorted by DICOM SliceLocation, index 0 at the HIGHEST location (the most superior
   slice, P002's IM0001.dcm): established by reading P002's slices where the two orders
   disagree (canonical slices 50-60 show ground glass and consolidation in the left lower lobe:
   label 1 in this order, 0 in the ascending one; docs/data.md), not from the estimate. With
   pydicom and ``dicom/P002`` the slice of each label is matched from the headers; cap002 (no
   DICOM here) is assumed to follow the same convention. ``--label-order ascending`` gives
   the other reading.

Rerun it on a new phantom testbed by changing ``--cases/--seed/--size-scale`` (or the generator).

Usage:
  python benchmarks/validate_ratio_estimate.py [--cases 40] [--seed 0] [--size-scale 1.0]
      [--ct_dir ../shared/data/ct] [--skip-phantoms] [--skip-real] [--json out.json]
"""

import argparse
import csv
import json
import os
import platform
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from dsan_jax.data import io  # pylint: disable=wrong-import-position
from dsan_jax.data import preprocess  # pylint: disable=wrong-import-position
from dsan_jax.data import ratio_validation as rv  # pylint: disable=wrong-import-position

REAL_CASES = ("P002", "cap002")


def phantom_volume(case: dict, case_id: str) -> io.Volume:
  """A rendered phantom (canonical RAS+ arrays) as an ``io.Volume``."""
  spacing_xyz = np.asarray(case["spacing"], np.float64)
  affine = np.diag(list(spacing_xyz) + [1.0])
  hu = case["hu"].astype(np.float32)
  return io.Volume(array=hu, spacing_zyx=tuple(float(s) for s in spacing_xyz[::-1]),
                   affine=affine, original_affine=affine,
                   original_shape=tuple(hu.shape[::-1]), path=f"<phantom {case_id}>")


def validate_phantoms(num_cases: int, seed: int, size_scale: float) -> dict:
  """Section 1 of the module docstring. Returns the figures and the per-case rows."""
  from dsan_jax.data import synthetic
  settings = preprocess.PreprocessSettings(infection_ratio="estimate")
  rows = []
  for spec in synthetic.plan_cases(num_cases, seed=seed, size_scale=size_scale):
    case = synthetic.render_case(spec)
    vol = phantom_volume(case, spec.case_id)
    true_r = preprocess.infection_ratio(case["lung"], case["infection"])
    fallback = preprocess.preprocess_volume(vol, settings)
    truth_lung = (case["lung"] | case["infection"]).astype(np.float32)
    given = preprocess.preprocess_volume(vol, settings, lung_full=truth_lung)
    rows.append(dict(case_id=spec.case_id, label=spec.label, true=true_r,
                     est_fallback=fallback.ratio_estimate, est_true_lung=given.ratio_estimate))
  labels = np.array([r["label"] for r in rows])
  true = np.array([r["true"] for r in rows])
  out = dict(n=len(rows), n_covid=int(labels.sum()), rows=rows)
  for key in ("est_fallback", "est_true_lung"):
    est = np.array([r[key] for r in rows])
    out[key] = dict(spearman=rv.spearman(true, est),
                    spearman_covid=rv.spearman(true[labels == 1], est[labels == 1]),
                    spearman_cap=rv.spearman(true[labels == 0], est[labels == 0]),
                    median_abs_error=float(np.median(np.abs(est - true))),
                    median_ratio_est_over_true=float(np.median(est / np.maximum(true, 1e-6))),
                    **rv.group_agreement(labels, true, est))
  return out


def label_order(ct_dir: str, vol: io.Volume, descending: bool) -> tuple[np.ndarray, str]:
  """Canonical slice index of each label index, and how it was found.

  Labels follow SliceLocation, highest first when ``descending``. Canonical z grows towards
  the head, like the DICOM patient z and (for these axial head-first scans) SliceLocation.
  """
  n = vol.array.shape[0]
  assumed = np.arange(n)[::-1] if descending else np.arange(n)
  rule = f"{'descending' if descending else 'ascending'} SliceLocation"
  dicom_dir = os.path.join(ct_dir, "dicom", "P002")
  try:
    import pydicom
  except ImportError:
    return assumed, f"{rule}, assumed = {rule.split()[0]} world z (no pydicom)"
  if not os.path.isdir(dicom_dir) or "P002" not in str(vol.path):
    return assumed, f"{rule}, assumed = {rule.split()[0]} world z as for P002 (no DICOM here)"
  world_z = (vol.affine @ np.stack([np.zeros(n), np.zeros(n), np.arange(n), np.ones(n)]))[2]
  locs, zs = [], []
  for name in sorted(os.listdir(dicom_dir)):
    ds = pydicom.dcmread(os.path.join(dicom_dir, name), stop_before_pixels=True)
    locs.append(float(ds.SliceLocation))
    zs.append(float(ds.ImagePositionPatient[2]))
  by_loc = np.argsort(locs)[::-1] if descending else np.argsort(locs)
  # NIfTI world z is RAS (superior +), DICOM patient z is LPS (superior + too): same axis.
  order = np.array([int(np.argmin(np.abs(world_z - zs[i]))) for i in by_loc])
  same = "the assumed order" if np.array_equal(order, assumed) else "NOT the assumed order"
  return order, f"{rule}, matched slice by slice from the DICOM headers ({same})"


def per_original_slice(pre: preprocess.Preprocessed) -> np.ndarray:
  """The per-slice estimate of the output grid, interpolated at each canonical input slice."""
  g = pre.geometry
  k = np.arange(g.canonical_shape[0], dtype=np.float64)
  t = (k - (g.canonical_shape[0] - 1) / 2) / g.step[0] + (g.resampled_shape[0] - 1) / 2
  vals = np.nan_to_num(pre.ratio_per_slice, nan=0.0)  # No lung in a slice: no infection.
  return np.interp(t, np.arange(vals.size), vals)


def validate_real(ct_dir: str, descending: bool = True) -> list[dict]:
  """Section 2 of the module docstring."""
  labels_path = os.path.join(ct_dir, "slice_labels.csv")
  if not os.path.exists(labels_path):
    return []
  with open(labels_path) as f:
    table = list(csv.DictReader(f))
  settings = preprocess.PreprocessSettings(infection_ratio="estimate")
  out = []
  for name in REAL_CASES:
    path = os.path.join(ct_dir, f"{name}.nii.gz")
    if not os.path.exists(path):
      continue
    vol = io.read_volume(path)
    pre = preprocess.preprocess_volume(vol, settings)
    lab = np.array([int(r["infected"]) for r in sorted(
        (r for r in table if r["case_id"] == name), key=lambda r: int(r["slice_index"]))])
    order, how = label_order(ct_dir, vol, descending)
    frac = per_original_slice(pre)[order]
    lung_px = _lung_per_original_slice(pre)[order]
    # An independent check of the order: label-1 slices must hold lung (reversed order too).
    no_lung = int(((lung_px == 0) & (lab == 1)).sum())
    no_lung_rev = int(((lung_px[::-1] == 0) & (lab == 1)).sum())
    out.append(dict(case=name, slices=int(lab.size), infected=int(lab.sum()), order=how,
                    ratio_estimate=pre.ratio_estimate, lung_ml=pre.lung_ml,
                    auc_fraction=rv.auc(lab, frac), auc_volume=rv.auc(lab, frac * lung_px),
                    auc_fraction_other_order=rv.auc(lab, frac[::-1]),
                    infected_slices_without_lung=no_lung,
                    infected_slices_without_lung_reversed=no_lung_rev))
  return out


def _lung_per_original_slice(pre: preprocess.Preprocessed) -> np.ndarray:
  g = pre.geometry
  sl = tuple(slice(b, b + n) for b, n in zip(g.pad_before, g.resampled_shape))
  area = pre.lung_mask[sl].sum(axis=(1, 2)).astype(np.float64)
  k = np.arange(g.canonical_shape[0], dtype=np.float64)
  t = (k - (g.canonical_shape[0] - 1) / 2) / g.step[0] + (g.resampled_shape[0] - 1) / 2
  return np.interp(t, np.arange(area.size), area, left=0.0, right=0.0)


def _print_phantoms(res: dict, args) -> None:
  print(f"### Phantoms: {res['n']} cases of `dsan_jax.data.synthetic` (seed {args.seed}, "
        f"size scale {args.size_scale}; {res['n_covid']} COVID), SYNTHETIC\n")
  print("| lung mask | Spearman (all / COVID / CAP) | size-balanced group agrees | "
        "Table III group agrees | median abs error | median est / true |")
  print("| --- | --- | --- | --- | --- | --- |")
  for key, name in (("est_fallback", "fallback (as in the cache)"),
                    ("est_true_lung", "true L u I")):
    r = res[key]
    print(f"| {name} | {r['spearman']:.3f} / {r['spearman_covid']:.3f} / "
          f"{r['spearman_cap']:.3f} | {r['size_groups']:.2f} | {r['table3']:.2f} | "
          f"{r['median_abs_error']:.4f} | {r['median_ratio_est_over_true']:.2f} |")
  r = res["est_fallback"]
  print(f"\nSize-balanced groups, true (rows) x estimated (columns), order covid_small, "
        f"covid_large, cap_small, cap_large: {r['size_confusion']}")
  print(f"Table III groups (< 0.005, 0.005-0.030, > 0.030), true x estimated: "
        f"{r['table3_confusion']}\n")


def phantom_and_ct_parser(doc: str, cases: int) -> argparse.ArgumentParser:
  """The options both validation scripts share (phantom count, seed, size, CT folder, skips)."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("--cases", type=int, default=cases)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size-scale", "--size_scale", dest="size_scale", type=float, default=1.0)
  parser.add_argument("--ct_dir", "--ct-dir", default=os.path.join(_ROOT, "..", "shared", "data",
                                                                   "ct"))
  parser.add_argument("--skip-phantoms", action="store_true")
  parser.add_argument("--skip-real", action="store_true")
  return parser


def main(argv=None) -> int:
  parser = phantom_and_ct_parser(__doc__, 40)
  parser.add_argument("--label-order", choices=("descending", "ascending"),
                      default="descending", help="SliceLocation order of the slice labels")
  parser.add_argument("--json", help="also write every figure (and per-case rows) here")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  print("## Infection-ratio estimate: validation (`benchmarks/validate_ratio_estimate.py`)\n")
  print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}\n")
  result = {}
  if not args.skip_phantoms:
    result["phantoms"] = validate_phantoms(args.cases, args.seed, args.size_scale)
    _print_phantoms(result["phantoms"], args)
  if not args.skip_real:
    result["real"] = validate_real(args.ct_dir, args.label_order == "descending")
    if not result["real"]:
      print(f"- real CTs skipped: nothing found in `{os.path.normpath(args.ct_dir)}`")
    else:
      print("### Real CTs: per-slice estimate against the radiologists' slice labels\n")
      print("| CT | slices (infected) | whole-scan estimate | lung mL | per-slice AUC (fraction) "
            "| AUC (dense volume) | AUC in the other order | infected slices "
            "without lung (other order) |")
      print("| --- | --- | --- | --- | --- | --- | --- | --- |")
      for r in result["real"]:
        print(f"| {r['case']} | {r['slices']} ({r['infected']}) | {r['ratio_estimate']:.4f} | "
              f"{r['lung_ml']:.0f} | {r['auc_fraction']:.3f} | {r['auc_volume']:.3f} | "
              f"{r['auc_fraction_other_order']:.3f} | {r['infected_slices_without_lung']} "
              f"({r['infected_slices_without_lung_reversed']}) |")
      for r in result["real"]:
        print(f"\n- {r['case']} label order: {r['order']}")
  print(f"\n- total {time.perf_counter() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
