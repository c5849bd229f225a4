"""Preprocessing time of real chest CTs (``dsan_jax.data.preprocess.load_and_preprocess``).

For each CT in ``../shared/data/ct/`` (relative to the repository root; skipped cleanly when
absent), and each DICOM series in its ``dicom/`` folder (``--nodicom`` skips them), times the
paper's preprocessing (read NIfTI or DICOM, one trilinear resampling to the output grid,
window, lung mask, pad to 138x256x256) with the classical lung-mask fallback and without any lung
mask (``lung_mask_fallback=False``, i.e. the cost of reading + resampling + windowing alone).
The two variants alternate inside every repetition; medians (and minima) are reported.

Then "file -> cached network input" (issue 14's target: <= 2 s on 2 cores): ``cache.
preprocess_case`` of each CT into a temporary cache (read, resample, lung-mask fallback,
infection-ratio estimate, window, pad, uint8 + CRC + fsync'd write), and where its time goes,
stage by stage (wall and CPU seconds: on a shared machine the CPU time is the steadier one).

For a DICOM series, the read split into parsing + checking the headers and decoding +
rescaling the pixels.

Last, an archive: every CT ``--archive`` times through ``cache.build_cache`` with ``--workers``
processes (the way a whole archive is preprocessed), wall seconds per scan.

Usage:
  python benchmarks/bench_preprocess.py [--reps 3] [--ct_dir ../shared/data/ct] [--nodicom]
      [--stages-only] [--archive 2] [--workers 2]
"""

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from configs import default as default_config  # pylint: disable=wrong-import-position
from dsan_jax.data.preprocess import load_and_preprocess  # pylint: disable=wrong-import-position

CASES = ("P002.nii.gz", "cap002.nii.gz")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ct_dir", "--ct-dir", default=os.path.join(_ROOT, "..", "shared", "data", "ct"))
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--dicom", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the DICOM series in <ct_dir>/dicom/ (read with pydicom)")
  parser.add_argument("--archive", type=int, default=2,
                      help="copies of each CT in the build_cache run (0: skip it)")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--stages-only", action="store_true",
                      help="skip the load_and_preprocess table (fallback vs no lung mask)")
  args = parser.parse_args(argv)

  print("## Preprocessing of a real CT (`bench_preprocess.py`)\n")
  paths = [os.path.join(args.ct_dir, c) for c in CASES]
  paths = [p for p in paths if os.path.exists(p)]
  if args.dicom:  # Each folder of <ct_dir>/dicom/ is a DICOM series, timed like the NIfTI files.
    dicom_dir = os.path.join(args.ct_dir, "dicom")
    if os.path.isdir(dicom_dir):
      paths += sorted(os.path.join(dicom_dir, d) for d in os.listdir(dicom_dir)
                      if os.path.isdir(os.path.join(dicom_dir, d)))
  if not paths:
    print(f"- skipped: no CT found in `{os.path.normpath(args.ct_dir)}` ({', '.join(CASES)})")
    return 0
  load0 = os.getloadavg()
  print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; single process (NumPy/SciPy)")
  print(f"- command: `python benchmarks/bench_preprocess.py --reps {args.reps}`")
  print(f"- load average at start: {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}\n", flush=True)

  variants = {}
  for fallback in (True, False):
    config = default_config.get_config()
    config.data.lung_mask_fallback = fallback
    variants["lung-mask fallback" if fallback else "no lung mask"] = config

  if args.stages_only:
    print_to_cache(paths, args.reps)
    print_dicom_read(paths, args.reps)
    if args.archive:
      print_archive(paths, args.archive, args.workers)
    return 0
  print("| CT | stored shape (i, j, k) | variant | median s (min) | output | lung voxels |")
  print("| --- | --- | --- | --- | --- | --- |")
  for path in paths:
    times = {name: [] for name in variants}
    info = {}
    for _ in range(args.reps):
      for name, config in variants.items():
        t0 = time.perf_counter()
        pre = load_and_preprocess(path, config=config)
        times[name].append(time.perf_counter() - t0)
        info[name] = (pre.image.shape, int(pre.lung_mask.sum()),
                      tuple(int(n) for n in pre.geometry.original_shape),
                      tuple(int(n) for n in pre.geometry.resampled_shape))
    for name in variants:
      shape, lung, in_shape, resampled = info[name]
      t = times[name]
      print(f"| {os.path.relpath(path, args.ct_dir)} | {in_shape or '-'} | {name} | "
            f"{statistics.median(t):.2f} ({min(t):.2f}) | {'x'.join(map(str, shape))} "
            f"(resampled {'x'.join(map(str, resampled))}) | "
            f"{lung if name != 'no lung mask' else '-'} |", flush=True)
  load1 = os.getloadavg()
  print(f"\n- {args.reps} repetitions, variants alternated; load average at end: "
        f"{load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}")
  print_to_cache(paths, args.reps)
  print_dicom_read(paths, args.reps)
  if args.archive:
    print_archive(paths, args.archive, args.workers)
  return 0


def _timed(fn, *a, **kw):
  w0, c0 = time.perf_counter(), time.process_time()
  out = fn(*a, **kw)
  return out, time.perf_counter() - w0, time.process_time() - c0


STAGES = ("read", "resample", "lung fallback", "ratio estimate", "window, pad, write")


def stage_times(path: str) -> dict:
  """(wall, CPU) seconds of each stage of ``cache.preprocess_case``, run stage by stage once."""
  from dsan_jax.data import cache, infection_ratio, io, lung_mask, preprocess
  settings = preprocess.PreprocessSettings()
  t = {}
  vol, *t["read"] = _timed(io.read_volume, path)
  geometry = preprocess.plan_geometry(vol, settings)
  hu, *t["resample"] = _timed(preprocess.resample_to_output, vol.array, geometry)
  lung, *t["lung fallback"] = _timed(lung_mask.segment_lungs, hu, geometry.output_spacing)
  _, *t["ratio estimate"] = _timed(infection_ratio.estimate, hu, lung, geometry.output_spacing)

  def finish():  # As preprocess_volume(..., uint8_image=True) and cache.preprocess_case.
    img = preprocess.window(hu, settings.hu_window) * lung
    img = preprocess.pad_to_target(preprocess.to_uint8(img), geometry)
    with tempfile.TemporaryDirectory() as d:
      cache._save_npy(pathlib.Path(d) / "x.npy", img)
  _, *t["window, pad, write"] = _timed(finish)
  return t


def print_to_cache(paths, reps: int) -> None:
  """The "file -> cached network input" section of the module docstring."""
  from dsan_jax.data import cache, manifest, preprocess
  settings = preprocess.PreprocessSettings()
  print("\n### File -> cached network input (`cache.preprocess_case`: fallback + ratio "
        "estimate), one process\n")
  print("| CT | wall s, median (min) | CPU s, median (min) | " + " | ".join(
      f"{name}: wall / CPU s" for name in STAGES) + " |")
  print("| --- | --- | --- |" + " --- |" * len(STAGES))
  for path in paths:
    wall, cpu, stages = [], [], []
    for _ in range(reps):
      case = manifest.Case(os.path.basename(path), "p", 1, pathlib.Path(path))
      with tempfile.TemporaryDirectory() as d:
        _, w, c = _timed(cache.preprocess_case, case, settings, pathlib.Path(d), "k" * 32)
      wall.append(w)
      cpu.append(c)
      stages.append(stage_times(path))
    parts = " | ".join(
        f"{statistics.median(s[name][0] for s in stages):.2f} / "
        f"{statistics.median(s[name][1] for s in stages):.2f}" for name in STAGES)
    print(f"| {os.path.relpath(path, os.path.dirname(paths[0]))} | {statistics.median(wall):.2f} "
          f"({min(wall):.2f}) | {statistics.median(cpu):.2f} ({min(cpu):.2f}) | {parts} |",
          flush=True)
  load = os.getloadavg()
  print(f"\n- {reps} repetitions; load average at end: {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (2 cores: above 2 every wall time is inflated by other jobs). The work "
        "is mostly single-threaded (2 threads: the NIfTI read's conversion beside its "
        "decompression, the DICOM decoding, the resampling's bands, the fallback's step 7): "
        "with a second core free the wall time drops below the CPU time.")


def print_dicom_read(paths, reps: int) -> None:
  """Where a DICOM series' read goes: parsing and checking the headers, decoding the pixels."""
  from dsan_jax.data import dicom, io
  series = [p for p in paths if io.is_dicom_source(p)]
  if not series:
    return
  print("\n### DICOM read, by part (`dicom._series` with pixel data, then `dicom._decode`: "
        f"{dicom.DECODE_THREADS} threads, decoder "
        f"{getattr(dicom._fast_decoder(), '__name__', 'pydicom')})\n")
  print("| series | parse + check headers: wall / CPU s | decode + rescale: wall / CPU s |")
  print("| --- | --- | --- |")
  for path in series:
    t = {"headers": [], "pixels": []}
    for _ in range(reps):
      with dicom._quiet():
        (ims, header), *w_c = _timed(dicom._series, path, False, True)
        t["headers"].append(w_c)
        _, *w_c = _timed(dicom._decode, ims, header.shape[1], header.shape[0])
        t["pixels"].append(w_c)
    print(f"| {os.path.basename(path)} | " + " | ".join(
        f"{statistics.median(w for w, _ in v):.2f} / {statistics.median(c for _, c in v):.2f}"
        for v in t.values()) + " |", flush=True)


def print_archive(paths, copies: int, workers: int) -> None:
  """An archive through ``cache.build_cache`` with ``workers`` processes: wall s per scan."""
  from dsan_jax.data import cache, manifest
  rows = [(f"c{i:03d}", p) for i in range(copies) for p in paths]
  with tempfile.TemporaryDirectory() as d:
    csv_path = pathlib.Path(d) / "manifest.csv"
    csv_path.write_text("case_id,patient_id,label,image\n" + "".join(
        f"{cid}_{k},p{k},cap,{os.path.abspath(p)}\n" for k, (cid, p) in enumerate(rows)))
    m = manifest.load_manifest(csv_path)
    w0, c0 = time.perf_counter(), time.process_time()
    cache.build_cache(m, None, pathlib.Path(d) / "cache", num_workers=workers, progress=False)
    wall = time.perf_counter() - w0
  load = os.getloadavg()
  print(f"\n### Archive: {len(rows)} scans ({copies} x each CT) through `cache.build_cache`, "
        f"{workers} worker processes\n")
  print(f"- {wall:.1f} s wall = **{wall / len(rows):.2f} s per scan** (worker start-up "
        f"included); load average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
  sys.exit(main())
