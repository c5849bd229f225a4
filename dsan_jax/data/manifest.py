"""Dataset manifests: one CSV row per scan, validated completely before any work starts.

Columns (header row required, order free, extra columns ignored):

=================  ========  ============================================================
column             required  meaning
=================  ========  ============================================================
case_id            yes       unique id of the scan
patient_id         yes       patient (folds never split a patient)
label              yes       ``covid`` or ``cap`` (case-insensitive); 1 = COVID, 0 = CAP
image              yes       CT in HU: NIfTI, or a DICOM series folder (``folder#SeriesUID`` picks
                             one of several; see ``dicom``); relative to the CSV's folder
lung_mask          no        lung mask on the image's grid (empty -> classical fallback)
infection_mask     no        infection mask on the image's grid
infection_ratio    no        r in [0, 1] (empty -> computed from the masks when both exist)
split              no        ``""``/``tv``/``train``/``val`` (training-validation set) or ``test``
=================  ========  ============================================================

``load_manifest`` checks every row (and, with ``check_files``, every file's header: 3D,
readable, plausible spacing, masks on the same grid as their image within
``io.AFFINE_ATOL_MM``) and raises ONE ``ManifestError`` listing every problem with its row
number (the CSV line, header = line 1) and file. With ``skip_bad=True`` the bad rows are dropped
instead and listed in ``Manifest.skipped``. Problems with the file itself (missing, no header,
missing required columns) always raise.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
import uuid

from dsan_jax.data import io
from dsan_jax.errors import DataError, ManifestError

REQUIRED_COLUMNS = ("case_id", "patient_id", "label", "image")
OPTIONAL_COLUMNS = ("lung_mask", "infection_mask", "infection_ratio", "split")
LABELS = {"covid": 1, "cap": 0}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
SPLITS = ("", "tv", "train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Case:
  """One scan of the manifest.

  Attributes:
    case_id, patient_id: identifiers.
    label: 1 = COVID, 0 = CAP.
    image, lung_mask, infection_mask: absolute paths (masks None when absent).
    infection_ratio: r in [0, 1], NaN when unknown.
    split: normalised split name ("" when absent).
    row: line of the CSV it came from (header = 1); -1 when not from a CSV.
    ratio_source: where ``infection_ratio`` came from: "manifest", or after ``build_cache``
      "mask" / "estimate" (``infection_ratio.SOURCE_*``); "" when unknown.
  """
  case_id: str
  patient_id: str
  label: int
  image: Path
  lung_mask: Path | None = None
  infection_mask: Path | None = None
  infection_ratio: float = math.nan
  split: str = ""
  row: int = -1
  ratio_source: str = ""

  @property
  def has_lung_mask(self) -> bool:
    return self.lung_mask is not None

  @property
  def has_infection_mask(self) -> bool:
    return self.infection_mask is not None

  @property
  def has_ratio(self) -> bool:
    return not math.isnan(self.infection_ratio)

  @property
  def label_name(self) -> str:
    return LABEL_NAMES[self.label]

  @property
  def is_test(self) -> bool:
    return self.split == "test"


@dataclasses.dataclass
class Manifest:
  """A validated manifest.

  Attributes:
    cases: the good rows, in file order.
    root: folder that relative paths are resolved against.
    path: the CSV (None when built in memory).
    skipped: (case_id or "row N", reason) for every row dropped by ``skip_bad``.
  """
  cases: list[Case]
  root: Path
  path: Path | None = None
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.cases)

  def __iter__(self):
    return iter(self.cases)

  def __getitem__(self, i: int) -> Case:
    return self.cases[i]


def _resolve(root: Path, value: str) -> Path:
  p = Path(os.path.expanduser(value))
  return Path(os.path.normpath(p if p.is_absolute() else (root / p)))


def _check_file(path: Path, what: str, problems: list[str]):
  """Reads a header; appends a problem and returns None on failure."""
  if not io.source_exists(path):
    problems.append(f"{what} file not found: {path}")
    return None
  try:
    return io.read_header(path, is_mask=what != "image")
  except DataError as e:
    problems.append(f"{what} {e}")
    return None


def _parse_fields(get, problems: list[str]) -> tuple[str, str, int | None, float, str, str]:
  """(case_id, patient_id, label, ratio, the ratio's text, split) of a row; appends problems."""
  case_id, patient_id = get("case_id"), get("patient_id")
  if not case_id:
    problems.append("empty case_id")
  if not patient_id:
    problems.append("empty patient_id (needed for patient-level folds)")
  label_raw = get("label").lower()
  label = LABELS.get(label_raw)
  if label is None:
    problems.append(f"unknown label {get('label')!r} (expected one of {sorted(LABELS)})")
  ratio = math.nan
  ratio_raw = get("infection_ratio")
  if ratio_raw:
    try:
      ratio = float(ratio_raw)
    except ValueError:
      problems.append(f"infection_ratio {ratio_raw!r} is not a number")
    else:
      if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        problems.append(f"infection_ratio {ratio_raw!r} is not in [0, 1]")
        ratio = math.nan
  split = get("split").lower()
  if split not in SPLITS:
    problems.append(f"unknown split {get('split')!r} (expected one of {list(SPLITS)})")
  return case_id, patient_id, label, ratio, ratio_raw, split


def _parse_paths(get, root: Path, check_files: bool, problems: list[str]
                 ) -> dict[str, Path | None]:
  """The row's image and mask paths; checks they exist (and, with ``check_files``, that the
  masks' grids match the image's); appends problems."""
  paths: dict[str, Path | None] = {}
  headers = {}
  for col in ("image", "lung_mask", "infection_mask"):
    value = get(col)
    if not value:
      paths[col] = None
      if col == "image":
        problems.append("empty image path")
      continue
    p = _resolve(root, value)
    paths[col] = p
    if check_files:
      headers[col] = _check_file(p, col.replace("_", " "), problems)
    elif not io.source_exists(p):
      problems.append(f"{col.replace('_', ' ')} file not found: {p}")
  image_header = headers.get("image")
  for col in ("lung_mask", "infection_mask"):
    h = headers.get(col)
    if image_header is None or h is None:
      continue
    same_stored = io.same_grid(h.shape, h.affine, image_header.shape, image_header.affine)
    same_canonical = io.same_grid(h.canonical_shape_zyx, h.canonical_affine,
                                  image_header.canonical_shape_zyx,
                                  image_header.canonical_affine)
    if not (same_stored or same_canonical):
      what = "shape" if h.canonical_shape_zyx != image_header.canonical_shape_zyx else "affine"
      problems.append(
          f"{col.replace('_', ' ')} {paths[col]} does not match its image in {what} "
          f"(mask shape {h.shape}, image shape {image_header.shape})")
  return paths


def _parse_row(row_no: int, rec: dict[str, str], root: Path, check_files: bool):
  """Returns (Case or None, list of problems) for one CSV row."""
  problems: list[str] = []
  get = lambda k: (rec.get(k) or "").strip()
  case_id, patient_id, label, ratio, ratio_raw, split = _parse_fields(get, problems)
  paths = _parse_paths(get, root, check_files, problems)
  if problems:
    return None, problems
  return Case(case_id=case_id, patient_id=patient_id, label=label, image=paths["image"],
              lung_mask=paths["lung_mask"], infection_mask=paths["infection_mask"],
              infection_ratio=ratio, split=split, row=row_no,
              ratio_source="manifest" if ratio_raw and not problems else ""), []


def _read_rows(path: Path) -> list[dict[str, str]]:
  """The CSV's rows (header names stripped); ManifestError for an unreadable or empty file or
  missing required columns."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      fieldnames = [c.strip() for c in (reader.fieldnames or [])]
      reader.fieldnames = fieldnames
      rows = list(reader)
  except (UnicodeDecodeError, csv.Error) as e:
    raise ManifestError(path, [f"not a readable CSV file ({e})"]) from None
  if not fieldnames:
    raise ManifestError(path, ["empty file (expected a header row with columns "
                               f"{', '.join(REQUIRED_COLUMNS)})"])
  missing = [c for c in REQUIRED_COLUMNS if c not in fieldnames]
  if missing:
    raise ManifestError(path, [f"missing required column(s): {', '.join(missing)} "
                               f"(found: {', '.join(fieldnames)})"])
  return rows


def _parse_rows(rows: list[dict[str, str]], root: Path, check_files: bool
                ) -> tuple[list[Case], list[str], list[tuple[str, str]]]:
  """(good cases, every problem as "row N (id): ...", skipped (id, why)) of the CSV's rows."""
  problems: list[str] = []
  skipped: list[tuple[str, str]] = []
  cases: list[Case] = []
  first_row: dict[str, int] = {}
  for i, rec in enumerate(rows):
    row_no = i + 2  # Line in the file; the header is line 1.
    case, row_problems = _parse_row(row_no, rec, root, check_files)
    case_id = (rec.get("case_id") or "").strip()
    if case_id:
      if case_id in first_row:
        row_problems.append(f"duplicate case_id {case_id!r} (first at row {first_row[case_id]})")
        case = None
      else:
        first_row[case_id] = row_no
    if row_problems:
      name = f"row {row_no}" + (f" ({case_id})" if case_id else "")
      problems.extend(f"{name}: {p}" for p in row_problems)
      skipped.append((case_id or f"row {row_no}", "; ".join(row_problems)))
      continue
    cases.append(case)
  return cases, problems, skipped


def load_manifest(path: str | os.PathLike, check_files: bool = True,
                  skip_bad: bool = False) -> Manifest:
  """Loads and validates a manifest CSV.

  Args:
    path: the CSV.
    check_files: also read every image/mask header (cheap: no voxel data) and compare mask
      grids with their image. Without it only the files' existence is checked.
    skip_bad: drop bad rows and report them in ``Manifest.skipped`` instead of raising.

  Returns:
    Manifest.

  Raises:
    ManifestError: listing every problem (all rows), unless ``skip_bad``; always for a missing
      or empty CSV, missing required columns, or no usable row.
  """
  path = Path(path)
  if not path.is_file():
    raise ManifestError(path, ["manifest file not found"])
  root = path.resolve().parent
  cases, problems, skipped = _parse_rows(_read_rows(path), root, check_files)
  if problems and not skip_bad:
    raise ManifestError(path, problems)
  if not cases:
    raise ManifestError(path, problems or ["no cases (the file has a header but no rows)"])
  return Manifest(cases=cases, root=root, path=path, skipped=skipped)


def write_manifest(cases, path: str | os.PathLike) -> Path:
  """Writes cases as a manifest CSV (paths relative to the CSV's folder), atomically.

  Args:
    cases: iterable of Case.
    path: destination CSV.

  Returns:
    The destination path.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  root = path.resolve().parent

  def rel(p):
    return "" if p is None else os.path.relpath(Path(p).resolve(), root)

  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      w = csv.writer(f)
      w.writerow(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
      for c in cases:
        w.writerow([c.case_id, c.patient_id, LABEL_NAMES[c.label], rel(c.image),
                    rel(c.lung_mask), rel(c.infection_mask),
                    "" if math.isnan(c.infection_ratio) else repr(float(c.infection_ratio)),
                    c.split])
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
