"""Preprocess every case once into an on-disk cache that training reads memory-mapped.

Layout of ``cache_dir``, one entry per case, named by its key::

  <key>.image.npy   uint8 [D, H, W]: round(255 * image), image = windowed CT x lung mask
  <key>.mask.npy    uint8 [ceil(D*H*W / 8)]: np.packbits of the infection mask (absent
                    when the case has none)
  <key>.json        sidecar written LAST: shapes, ratio and its source ("mask", "estimate",
                    "none"; the mask's and the estimate's values apart), lung volume, CRC32 of
                    each .npy, source files

The key is a SHA-256 of the case's input files (absolute path, size, mtime; for a DICOM series
folder, a hash of its files' names, sizes and mtimes) and of the
preprocessing settings (``PreprocessSettings`` + ``CACHE_VERSION``): changing a file or a
setting gives a new key, so the entry is rebuilt (old entries stay until ``prune``).
Every file is written to a temporary name of its own in the same folder (``dsan_jax.files``)
and renamed (``os.replace``); the sidecar comes last, so an entry is complete iff its sidecar
exists and matches. A killed build leaves only temporary files, which the next build removes
when their writer is dead.

Several processes may build one cache at once (two jobs, or the processes of a multi-host run):
a case already complete is not preprocessed again, and an entry is committed (its renames) under
an exclusive ``flock`` on ``.commit.lock`` after checking, under the lock, that no other process
committed it first; if one did, its entry is kept and this process's copy discarded. So every
entry's files come from one writer, whatever the interleaving.

uint8 quantisation of [0, 1] has steps of 1/255 (max error 1/510 ~ 0.002, about 3 HU in the
1500 HU window), far below CT noise; the image then takes 9 MB per 138x256x256 case instead
of 36 MB in float32, and the infection mask 1.1 MB bit-packed.

Checking an entry (``verify``): "size" (default) checks the sidecar and that both arrays
open memory-mapped with the recorded shape and dtype (catches truncation and missing files
at no cost); "checksum" also recomputes CRC32 (catches flipped bytes; reads everything).
A bad entry is rebuilt.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
import shutil
import zlib

import numpy as np
from tqdm.auto import tqdm

from dsan_jax import files, run_lock
from dsan_jax.data import infection_ratio as ratio_lib
from dsan_jax.data import io
from dsan_jax.data import manifest as manifest_lib
from dsan_jax.data import preprocess
from dsan_jax.errors import DataError, DsanError, ManifestError, ResourceError

CACHE_VERSION = 4  # Bump when the preprocessing code changes its output (3: fallback step 7b;
# 4: step 7b continues consolidated columns below the fitted floor).
COMMIT_LOCK = ".commit.lock"
_ENTRY_OVERHEAD_BYTES = 8192


def case_key(case: manifest_lib.Case, settings: preprocess.PreprocessSettings) -> str:
  """SHA-256 (hex, 32 chars) of the case's input files and the preprocessing settings."""
  files = []
  for p in (case.image, case.lung_mask, case.infection_mask):
    if p is None:
      files.append(None)
      continue
    files.append(io.source_fingerprint(p))  # A DICOM folder: its files' names/sizes/mtimes.
  blob = json.dumps({"files": files, "settings": settings.as_dict(), "version": CACHE_VERSION},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _crc(path: Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _save_npy(path: Path, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array)
    f.flush()
    os.fsync(f.fileno())


def _atomic_write_json(path: Path, obj) -> None:
  files.write_text(path, json.dumps(obj, indent=1), fsync=True)


def entry_paths(cache_dir: Path, key: str) -> dict[str, Path]:
  return {"image": cache_dir / f"{key}.image.npy", "mask": cache_dir / f"{key}.mask.npy",
          "meta": cache_dir / f"{key}.json"}


def check_entry(cache_dir: Path, key: str, verify: str = "size") -> dict | None:
  """Returns the sidecar of a complete, intact entry, or None when it must be (re)built."""
  paths = entry_paths(cache_dir, key)
  try:
    meta = json.loads(paths["meta"].read_text())
    img = np.load(paths["image"], mmap_mode="r")
    if (list(img.shape) != meta["shape"] or img.dtype != np.uint8
        or meta.get("version") != CACHE_VERSION):
      return None
    if meta["has_mask"]:
      m = np.load(paths["mask"], mmap_mode="r")
      if m.shape != (math.ceil(math.prod(meta["shape"]) / 8),) or m.dtype != np.uint8:
        return None
    if verify == "checksum":
      if _crc(paths["image"]) != meta["crc_image"]:
        return None
      if meta["has_mask"] and _crc(paths["mask"]) != meta["crc_mask"]:
        return None
  except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
    return None
  return meta


def preprocess_case(case: manifest_lib.Case, settings: preprocess.PreprocessSettings,
                    cache_dir: Path, key: str, verify: str = "size") -> dict:
  """Preprocesses one case and writes its cache entry (runs in a worker process).

  An entry that another process completed meanwhile (checked with ``verify``) is kept.

  Returns:
    The entry's sidecar dict.
  """
  existing = check_entry(cache_dir, key, verify)
  if existing is not None:  # Another process built it since this build's plan.
    return existing
  out = preprocess.load_and_preprocess(case.image, case.lung_mask, case.infection_mask,
                                       config=_settings_as_config(settings), uint8_image=True)
  paths = entry_paths(cache_dir, key)
  image_u8 = out.image
  tmps = {"image": files.temp_path(paths["image"])}
  has_mask = out.infection_mask is not None
  if has_mask:
    tmps["mask"] = files.temp_path(paths["mask"])
  try:
    _save_npy(tmps["image"], image_u8)
    if has_mask:
      _save_npy(tmps["mask"], np.packbits(out.infection_mask.ravel() > 0))
    crcs = {k: _crc(tmp) for k, tmp in tmps.items()}
  except BaseException:
    _remove(tmps)
    raise
  meta = {
      "case_id": case.case_id,
      "shape": list(image_u8.shape),
      "has_mask": has_mask,
      "ratio": _json_float(out.ratio),
      "ratio_source": out.ratio_source,
      "ratio_estimated": out.ratio_source == ratio_lib.SOURCE_ESTIMATE,
      "ratio_mask": _json_float(out.ratio_mask),
      "ratio_estimate": _json_float(out.ratio_estimate),
      "lung_ml": _json_float(out.lung_ml),
      "lung_mask_source": out.lung_mask_source,
      "crc_image": crcs["image"],
      "crc_mask": crcs.get("mask"),
      "fit_factor": out.geometry.fit_factor,
      "output_spacing": list(out.geometry.output_spacing),
      "sources": [None if p is None else str(p) for p in
                  (case.image, case.lung_mask, case.infection_mask)],
      "version": CACHE_VERSION,
  }
  return _commit(cache_dir, key, tmps, meta, verify)


def _remove(tmps: dict[str, Path]) -> None:
  for tmp in tmps.values():
    tmp.unlink(missing_ok=True)


def _commit(cache_dir: Path, key: str, tmps: dict[str, Path], meta: dict, verify: str) -> dict:
  """Renames an entry's arrays (``tmps``) into place, sidecar last, unless another process was
  first (checked under the commit lock); the temporary files are gone afterwards either way.

  Returns:
    The sidecar of the entry now in place (``meta``, or the other process's).
  """
  try:
    with run_lock.locked(cache_dir / COMMIT_LOCK):
      existing = check_entry(cache_dir, key, verify)
      if existing is not None:  # Another process committed it first: keep theirs.
        return existing
      paths = entry_paths(cache_dir, key)
      for k, tmp in tmps.items():
        os.replace(tmp, paths[k])
      _atomic_write_json(paths["meta"], meta)
  finally:
    _remove(tmps)
  return meta


def _json_float(x: float):
  return None if math.isnan(x) else float(x)


class _SettingsConfig:
  """Duck-typed ``config.data`` carrying PreprocessSettings into worker processes."""

  def __init__(self, settings: preprocess.PreprocessSettings):
    for k, v in settings.as_dict().items():
      setattr(self, k, v)


def _settings_as_config(settings):
  return _SettingsConfig(settings)


def _worker(args):
  case, settings, cache_dir, key, verify = args
  try:
    return key, preprocess_case(case, settings, cache_dir, key, verify), None
  except DsanError as e:
    return key, None, str(e)
  except MemoryError:
    return key, None, f"{case.image}: out of memory while preprocessing"


def estimate_entry_bytes(target_shape) -> int:
  """Upper bound of one entry's size on disk (image + packed mask + sidecar)."""
  n = math.prod(target_shape)
  return n + math.ceil(n / 8) + _ENTRY_OVERHEAD_BYTES


def _check_resources(cache_dir: Path, n_todo: int, target_shape) -> None:
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    probe = files.temp_path(cache_dir / "write-probe")
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    raise ResourceError(f"{cache_dir}: cache folder is not writable ({e.strerror or e})") from None
  need = n_todo * estimate_entry_bytes(target_shape)
  free = shutil.disk_usage(cache_dir).free
  # 10 % + 100 MB margin: the file system and the rest of the run need room too.
  if need and free < need * 1.1 + 100e6:
    raise ResourceError(
        f"{cache_dir}: not enough free disk space for the cache: {n_todo} entries need about "
        f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


@dataclasses.dataclass
class CachedDataset:
  """Random-access view of a built cache (the grain data source).

  Attributes:
    cases: manifest cases, ``infection_ratio`` filled from the cache (mask or estimate, see
      ``ratio_source``) when the manifest had none.
    keys: cache key of each case.
    cache_dir: the cache folder.
    skipped: (case_id, reason) for cases dropped by ``skip_bad``.
  """
  cases: list[manifest_lib.Case]
  keys: list[str]
  cache_dir: Path
  shapes: list[tuple[int, int, int]]
  has_masks: list[bool]
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.labels = np.asarray([c.label for c in self.cases], np.int32)
    self.ratios = np.asarray([c.infection_ratio for c in self.cases], np.float32)
    self.ratio_sources = [c.ratio_source for c in self.cases]
    self.ratio_estimated = np.asarray(
        [s == ratio_lib.SOURCE_ESTIMATE for s in self.ratio_sources], bool)
    self.patient_ids = [c.patient_id for c in self.cases]
    self.case_ids = [c.case_id for c in self.cases]

  def __len__(self) -> int:
    return len(self.cases)

  def __getitem__(self, i: int) -> dict:
    """One case as numpy arrays.

    Returns:
      dict(image float32 [D, H, W] in [0, 1], infection_mask uint8 [D, H, W], has_mask bool,
      label int, ratio float (NaN when unknown), index int, case_id str).
    """
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} cases")
    i %= len(self)
    paths = entry_paths(self.cache_dir, self.keys[i])
    shape = self.shapes[i]
    try:
      img = np.load(paths["image"], mmap_mode="r")
      image = np.multiply(img, np.float32(1.0 / 255.0), dtype=np.float32)
      if self.has_masks[i]:
        packed = np.load(paths["mask"], mmap_mode="r")
        mask = np.unpackbits(packed, count=math.prod(shape)).reshape(shape)
      else:
        mask = np.zeros(shape, np.uint8)
    except (OSError, ValueError) as e:
      raise DataError(paths["image"], f"unreadable cache entry of case {self.case_ids[i]} "
                      f"({e}); rebuild the cache") from None
    if image.shape != tuple(shape):
      raise DataError(paths["image"], f"cache entry has shape {image.shape}, expected {shape}; "
                      "rebuild the cache")
    return {
        "image": image,
        "infection_mask": mask,
        "has_mask": bool(self.has_masks[i]),
        "label": int(self.labels[i]),
        "ratio": float(self.ratios[i]),
        "index": i,
        "case_id": self.case_ids[i],
    }


def build_cache(manifest: manifest_lib.Manifest, data_config, cache_dir: str | os.PathLike,
                num_workers: int | None = None, skip_bad: bool = False, verify: str = "size",
                progress: bool | None = None) -> CachedDataset:
  """Preprocesses every case not yet cached, in parallel, and opens the cache.

  Args:
    manifest: a loaded Manifest (or any object with ``.cases``).
    data_config: ``config.data`` (or a full config, or None for the paper's defaults).
    cache_dir: cache folder (created).
    num_workers: worker processes; 0 = in this process; None = ``os.cpu_count()``.
    skip_bad: drop cases whose preprocessing fails and list them in ``.skipped`` instead
      of raising.
    verify: "size" or "checksum" (see module docstring).
    progress: show a tqdm bar (None: only on a terminal).

  Returns:
    CachedDataset over the cached cases, in manifest order.

  Raises:
    ResourceError: cache folder not writable or not enough free disk space.
    ManifestError: one or more cases failed to preprocess (all listed), unless ``skip_bad``.
  """
  if verify not in ("size", "checksum"):
    raise ValueError(f"verify must be 'size' or 'checksum', got {verify!r}")
  settings = preprocess.PreprocessSettings.from_config(data_config)
  cache_dir = Path(cache_dir)
  cases = list(manifest.cases)
  keys, metas, todo, failures = _plan(cases, settings, cache_dir, verify)
  _check_resources(cache_dir, len(todo), settings.target_shape)
  files.remove_stale_temps(cache_dir)  # Left by killed builds.
  if todo:
    _preprocess_all(todo, settings, cache_dir, verify, num_workers, progress, metas, failures)
  if failures and not skip_bad:
    raise ManifestError(getattr(manifest, "path", None) or cache_dir,
                        [f"case {cid}: {msg}" for cid, msg in failures.items()])
  skipped = list(getattr(manifest, "skipped", [])) + sorted(failures.items())
  return _open(cases, keys, metas, cache_dir, skipped)


def _plan(cases, settings, cache_dir: Path, verify: str):
  """Each case's key (None: its input cannot be read) and what is cached already.

  Returns:
    (keys, one per case; metas: key -> sidecar of the valid entries; todo: [(case, key)] to
    preprocess, one per distinct key; failures: case id -> reason).
  """
  keys, metas, todo, failures, seen = [], {}, [], {}, set()
  for case in cases:
    try:
      key = case_key(case, settings)
    except OSError as e:
      key = None
      failures[case.case_id] = f"{case.image}: cannot stat input ({e.strerror or e})"
    keys.append(key)
    if key is None or key in seen:
      continue
    seen.add(key)
    meta = check_entry(cache_dir, key, verify) if cache_dir.is_dir() else None
    if meta is None:
      todo.append((case, key))
    else:
      metas[key] = meta
  return keys, metas, todo, failures


def _preprocess_all(todo, settings, cache_dir: Path, verify: str, num_workers: int | None,
                    progress: bool | None, metas: dict, failures: dict) -> None:
  """Preprocesses ``todo`` (in this process or in spawned workers) into ``metas``/``failures``."""
  jobs = [(case, settings, cache_dir, key, verify) for case, key in todo]
  bar = tqdm(total=len(jobs), desc="preprocessing", unit="case", disable=(
      None if progress is None else not progress))
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  by_key = {key: case for case, key in todo}
  try:
    if num_workers <= 0 or len(jobs) == 1:
      for key, meta, err in map(_worker, jobs):
        _collect(key, meta, err, by_key, metas, failures)
        bar.update()
    else:
      # spawn: the parent may hold JAX/threads, which fork would copy in a broken state.
      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(jobs)),
                                                  mp_context=ctx) as ex:
        futures = [ex.submit(_worker, j) for j in jobs]
        for fut in concurrent.futures.as_completed(futures):
          key, meta, err = fut.result()
          _collect(key, meta, err, by_key, metas, failures)
          bar.update()
  except concurrent.futures.process.BrokenProcessPool:
    raise ResourceError(
        f"{cache_dir}: a preprocessing worker died (killed, e.g. out of memory); entries "
        "finished so far are kept; retry with fewer workers (num_workers)") from None
  finally:
    bar.close()


def _open(cases, keys, metas: dict, cache_dir: Path, skipped: list) -> CachedDataset:
  """The CachedDataset of the cases whose entry exists, in manifest order, with their ratios."""
  kept_cases, kept_keys, shapes, has_masks = [], [], [], []
  for case, key in zip(cases, keys):
    if key is None or key not in metas:
      continue
    meta = metas[key]
    if case.has_ratio:  # The manifest's ratio wins.
      case = dataclasses.replace(case, ratio_source=ratio_lib.SOURCE_MANIFEST)
    elif meta.get("ratio") is not None:
      case = dataclasses.replace(case, infection_ratio=float(meta["ratio"]),
                                 ratio_source=meta["ratio_source"])
    kept_cases.append(case)
    kept_keys.append(key)
    shapes.append(tuple(meta["shape"]))
    has_masks.append(bool(meta["has_mask"]))
  return CachedDataset(cases=kept_cases, keys=kept_keys, cache_dir=cache_dir, shapes=shapes,
                       has_masks=has_masks, skipped=skipped)


def prune(cache_dir: str | os.PathLike, keep_keys) -> int:
  """Deletes the entries of ``cache_dir`` whose key is not in ``keep_keys``.

  Typical use: ``prune(ds.cache_dir, ds.keys)`` after a build, to drop entries of changed
  inputs or settings. Other files are left alone.

  Returns:
    Number of files deleted.
  """
  keep = set(keep_keys)
  removed = 0
  for p in Path(cache_dir).glob("*"):
    parts = p.name.split(".")
    if (len(parts) >= 2 and len(parts[0]) == 32 and parts[0] not in keep
        and p.name.endswith((".image.npy", ".mask.npy", ".json"))):
      p.unlink(missing_ok=True)
      removed += 1
  return removed


def _collect(key, meta, err, by_key, metas, failures):
  if err is None:
    metas[key] = meta
  else:
    failures[by_key[key].case_id] = err


def ratio_summary(dataset: CachedDataset) -> str:
  """One line: where the infection ratios of ``dataset`` come from, per class.

  Example: ``infection ratios: 40 from infection masks (40 COVID, 0 CAP), 38 ESTIMATED from the
  CT (2 COVID, 36 CAP), 0 from the manifest, 0 unknown``. A source that differs between the
  classes leaks the label into the ratio (docs/data.md, "Infection-ratio estimate").
  """
  parts = []
  for source, what in ((ratio_lib.SOURCE_MASK, "from infection masks"),
                       (ratio_lib.SOURCE_ESTIMATE, "ESTIMATED from the CT"),
                       (ratio_lib.SOURCE_MANIFEST, "from the manifest"),
                       (ratio_lib.SOURCE_NONE, "unknown")):
    sel = [c for c in dataset.cases if (c.ratio_source or ratio_lib.SOURCE_NONE) == source]
    covid = sum(c.label == 1 for c in sel)
    parts.append(f"{len(sel)} {what} ({covid} COVID, {len(sel) - covid} CAP)")
  return "infection ratios: " + ", ".join(parts)
