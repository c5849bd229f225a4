"""The lung-mask fallback with juxtapleural consolidation: before (no bay filling), after, +cavity.

1. Phantoms (``dsan_jax.data.synthetic``, SYNTHETIC), each with a dense blob against the chest
   wall rendered in (``ratio_validation.add_pleural_consolidation``, lateral and posterior in
   turn), on the network's grid (as the cache runs the fallback): the fraction of infection
   voxels (the phantom's lesions and the blob) inside the fallback mask, the same for the blob
   alone, and the Dice against the phantom's true lung mask, with ``pleural_bays=False``
   (before), ``True`` (after) and ``True`` with step 7b (``pleural_cavity=True``: "+cavity").
2. Real CTs (``../shared/data/ct``, skipped when absent): lung volumes (both, left, right)
   before, after and +cavity, the volume added (after vs before, +cavity vs after), and with
   ``--png-dir`` pictures of the added voxels (red) over the mask before them (green) on the
   six slices that gained most (``*_fallback_added.png``; ``*_fallback_cavity_added.png`` for
   step 7b, when it added anything).

Usage:
  python benchmarks/validate_lung_fallback.py [--cases 16] [--seed 0] [--ct_dir DIR]
      [--png-dir DIR] [--skip-phantoms] [--skip-real]
"""

import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsan_jax.data import io  # pylint: disable=wrong-import-position
from dsan_jax.data import lung_mask  # pylint: disable=wrong-import-position
from dsan_jax.data import preprocess  # pylint: disable=wrong-import-position
from dsan_jax.data import ratio_validation as rv  # pylint: disable=wrong-import-position
from validate_ratio_estimate import (  # pylint: disable=wrong-import-position
    phantom_and_ct_parser, phantom_volume)


# The fallback without bay filling, with it (step 7), and with step 7b as well.
VARIANTS = {"before": dict(pleural_bays=False),
            "after": dict(pleural_bays=True, pleural_cavity=False),
            "cavity": dict(pleural_bays=True, pleural_cavity=True)}


def dice(a, b) -> float:
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def phantom_rows(num_cases: int, seed: int, size_scale: float) -> list[dict]:
  """Section 1 of the module docstring, one row per phantom."""
  from dsan_jax.data import synthetic
  settings = preprocess.PreprocessSettings()
  rows = []
  for i, spec in enumerate(synthetic.plan_cases(num_cases, seed=seed, size_scale=size_scale)):
    case = synthetic.render_case(spec)
    sp = tuple(float(s) for s in np.asarray(case["spacing"])[::-1])
    side = ("lateral", "posterior")[i % 2]
    hu, lung, inf, blob = rv.add_pleural_consolidation(
        case["hu"].astype(np.float32), case["lung"], case["infection"], sp,
        np.random.default_rng([seed, i]), side=side)
    vol = phantom_volume(dict(case, hu=hu), spec.case_id)
    g = preprocess.plan_geometry(vol, settings)
    hu_out = preprocess.resample_to_output(hu, g)
    truth = preprocess.resample_mask(lung, g).astype(bool)
    inf_out = preprocess.resample_mask(inf, g).astype(bool)
    blob_out = preprocess.resample_mask(blob, g).astype(bool)
    row = dict(case_id=spec.case_id, side=side, r=float(inf.sum() / max(lung.sum(), 1)))
    for name, kw in VARIANTS.items():
      t0 = time.perf_counter()
      m = lung_mask.segment_lungs(hu_out, g.output_spacing, **kw).astype(bool)
      row[name] = dict(seconds=time.perf_counter() - t0, inf_inside=int((m & inf_out).sum()),
                       inf=int(inf_out.sum()), blob_inside=int((m & blob_out).sum()),
                       blob=int(blob_out.sum()), dice=dice(m, truth))
    rows.append(row)
  return rows


def _print_phantoms(rows: list[dict], args) -> None:
  print(f"### Phantoms with a dense blob against the chest wall ({len(rows)} cases, seed "
        f"{args.seed}, SYNTHETIC), on the network's grid\n")
  print("| case | blob | r (with blob) | infection inside before -> after -> +cavity | blob "
        "inside before -> after -> +cavity | Dice before -> after -> +cavity |")
  print("| --- | --- | --- | --- | --- | --- |")
  arrow = lambda r, f: " -> ".join(f"{f(r[k]):.3f}" for k in VARIANTS)
  for r in rows:
    print(f"| {r['case_id']} | {r['side']} | {r['r']:.3f} | "
          f"{arrow(r, lambda v: v['inf_inside'] / v['inf'])} | "
          f"{arrow(r, lambda v: v['blob_inside'] / v['blob'])} | "
          f"{arrow(r, lambda v: v['dice'])} |")
  for label, sel in (("all cases", rows), ("cases with r < 0.4", [r for r in rows
                                                                  if r["r"] < 0.4])):
    if not sel:
      continue
    parts = []
    for name in VARIANTS:
      inf = sum(r[name]["inf_inside"] for r in sel) / sum(r[name]["inf"] for r in sel)
      blob = sum(r[name]["blob_inside"] for r in sel) / sum(r[name]["blob"] for r in sel)
      d = [r[name]["dice"] for r in sel]
      t = np.median([r[name]["seconds"] for r in sel])
      parts.append(f"{name}: infection inside {inf:.3f}, blob inside {blob:.3f}, Dice median "
                   f"{np.median(d):.3f} (min {min(d):.3f}), median {t:.2f} s")
    print(f"\n- pooled over {label} ({len(sel)}): " + "; ".join(parts))


def real_rows(ct_dir: str, png_dir: str | None) -> list[dict]:
  """Section 2 of the module docstring."""
  settings = preprocess.PreprocessSettings()
  rows = []
  for name in ("P002", "cap002"):
    path = os.path.join(ct_dir, f"{name}.nii.gz")
    if not os.path.exists(path):
      continue
    vol = io.read_volume(path)
    g = preprocess.plan_geometry(vol, settings)
    hu = preprocess.resample_to_output(vol.array, g)
    masks = {k: lung_mask.segment_lungs(hu, g.output_spacing, **kw)
             for k, kw in VARIANTS.items()}
    row = dict(case=name)
    for k, m in masks.items():
      row[k] = dict(total=lung_mask.lung_volume_litres(m, g.output_spacing),
                    sides=dict((s, v) for s, v in lung_mask.left_right_volumes(
                        m, g.output_spacing)))
    ml = float(np.prod(g.output_spacing)) / 1000.0
    m = {k: v.astype(bool) for k, v in masks.items()}
    added = m["after"] & ~m["before"]
    row["added_ml"] = float(added.sum() * ml)
    row["removed_ml"] = float((m["before"] & ~m["after"]).sum() * ml)
    cavity = m["cavity"] & ~m["after"]
    row["cavity_added_ml"] = float(cavity.sum() * ml)
    row["cavity_removed_ml"] = float((m["after"] & ~m["cavity"]).sum() * ml)
    if png_dir:
      os.makedirs(png_dir, exist_ok=True)
      row["png"] = _added_png(hu, masks["before"], added, os.path.join(
          png_dir, f"{name}_fallback_added.png"), name)
      if cavity.any():
        _added_png(hu, masks["after"], cavity, os.path.join(
            png_dir, f"{name}_fallback_cavity_added.png"), name)
      lung_mask.save_overlay_png(hu, masks["after"], g.output_spacing,
                                 os.path.join(png_dir, f"{name}_fallback_overlay.png"),
                                 title=f"{name}: {row['after']['total']:.2f} L (after)")
    rows.append(row)
  return rows


def _added_png(hu, before, added, path, name) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  per = added.sum(axis=(1, 2))
  zs = sorted(np.argsort(per)[::-1][:6])
  fig, axes = plt.subplots(2, 3, figsize=(12, 8))
  for ax, z in zip(axes.ravel(), zs):
    ax.imshow(hu[z][::-1, ::-1], cmap="gray", vmin=-1350, vmax=150)
    ax.contour(before[z][::-1, ::-1], [0.5], colors="lime", linewidths=0.6)
    if added[z].any():
      ax.contour(added[z][::-1, ::-1].astype(float), [0.5], colors="red", linewidths=0.9)
    ax.set_title(f"{name} z={z}: +{int(per[z])} voxels", fontsize=9)
    ax.axis("off")
  fig.suptitle("green: fallback before; red: added (radiological view)")
  fig.tight_layout()
  fig.savefig(path, dpi=60)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  parser = phantom_and_ct_parser(__doc__, 16)
  parser.add_argument("--png-dir", "--png_dir", dest="png_dir", default=None)
  args = parser.parse_args(argv)
  print("## Lung-mask fallback and juxtapleural consolidation (`benchmarks/validate_lung_"
        "fallback.py`)\n")
  if not args.skip_phantoms:
    _print_phantoms(phantom_rows(args.cases, args.seed, args.size_scale), args)
  if not args.skip_real:
    rows = real_rows(args.ct_dir, args.png_dir)
    if not rows:
      print(f"\n- real CTs skipped: nothing found in `{os.path.normpath(args.ct_dir)}`")
    else:
      print("\n### Real CTs (no juxtapleural consolidation marked; the volume must not grow "
            "into the mediastinum or the chest wall)\n")
      print("| CT | before L (right / left) | after L (right / left) | +cavity L (right / "
            "left) | added mL (removed) | +cavity: added mL (removed) |")
      print("| --- | --- | --- | --- | --- | --- |")
      for r in rows:
        vols = " | ".join(f"{r[k]['total']:.3f} ({r[k]['sides'].get('right', 0):.3f} / "
                          f"{r[k]['sides'].get('left', 0):.3f})" for k in VARIANTS)
        print(f"| {r['case']} | {vols} | {r['added_ml']:.1f} ({r['removed_ml']:.1f}) | "
              f"{r['cavity_added_ml']:.1f} ({r['cavity_removed_ml']:.1f}) |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
