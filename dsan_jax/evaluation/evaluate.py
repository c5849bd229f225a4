"""Evaluation of a finished (or partly finished) protocol: the paper's tables, figures and more.

``evaluate_workdir(workdir)`` loads the best checkpoint of every ``<workdir>/<variant>/fold_<k>``,
re-predicts its validation fold and the independent test split (cases of fold -1, when there
are any) with the run's own config and data (the preprocessing cache is shared), builds the
dual-sampling ensemble ``att_rn34_ds`` (Eq. 5) from ``att_rn34_us`` and ``att_rn34_ss``, and
writes ``<workdir>/evaluation/``:

  report.md              Tables II and III, paired tests, attention quality, figures (Markdown)
  metrics.json           everything in report.md as numbers (NaN as null), plus the runs, the
                         ensemble weights, the consistency check and the attention summaries
  table2.csv, table3.csv, ttests.csv, delong.csv, predictions.csv, attention.csv
                         (written by ``dsan_jax.evaluation.report.write_report``)
  attention_cases.csv    per (map kind, model, case) attention numbers
  ensemble.json          the ensemble weights used (paper's or searched) and the search result
  runs.csv               one row per run: variant, fold, best epoch, validation AUC, consistency
  roc_val.png, roc_test.png
  attention/<case>.png   Fig. 5-like panels for a few validation cases
  curves/<variant>_fold<k>.png   training curves from metrics.jsonl

The folder is written under a temporary name and renamed when complete, so a reader never sees a
half-written evaluation; the previous one is replaced.

Attention quality (beyond the paper, which shows it only in pictures): for every COVID validation
case with an infection mask, each model's map is compared with the infection mask on the input
grid: ``mass_inside`` (fraction of the map's mass inside the infection) and ``soft_dice`` (map
scaled to [0, 1] by its maximum). Each case is explained by the fold model that did not see it.
Three kinds of map are measured:
  * ``display`` (the paper's Fig. 5, and the main table): Grad-CAM for the baseline ``rn34_us``,
    T(A) (Eq. 2) for the attention models;
  * ``cam``: the up-sampled, min-max normalised CAM for every model (for the baseline this is its
    Grad-CAM, which is proportional to its CAM), the same map type for all;
  * ``t_of_cam``: Eq. 2 applied to every model's CAM (for the baseline, a T(A) it never trained).
Also reported: ``mass_in_lung``, the fraction of the map's mass inside the lung (the non-zero
voxels of the lung-masked input), which shows maps that fall outside the lungs (Section IV-E).
Chance levels are reported with them: a uniform map over the lung gives ``mass_inside`` = the
infection ratio, a uniform map over the whole input volume its volume fraction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dsan_jax import files, run_lock, variants
from dsan_jax.data import cache as cache_lib
from dsan_jax.data import pipeline
from dsan_jax.data import prepare
from dsan_jax.data import preprocess
from dsan_jax.errors import ConfigError, DsanError
from dsan_jax.evaluation import ensemble as ensemble_lib
from dsan_jax.evaluation import explanation, findings, metrics, plots, reference, report
from dsan_jax.evaluation.text import fmt, fmt_p
from dsan_jax.training import loop, run_folder, sharding, steps

log = logging.getLogger("dsan_jax")

OUT_DIR_NAME = run_folder.EVALUATION_DIR
BASELINE = "rn34_us"  # The model the others are compared with.
MAP_KINDS = ("display", "cam", "t_of_cam")
MAP_KIND_TITLES = {
    "display": "Fig. 5 maps: Grad-CAM (baseline) / T(A) (attention models)",
    "cam": "min-max normalised CAM of every model (baseline: its Grad-CAM)",
    "t_of_cam": "T(A) of every model's CAM (Eq. 2; the baseline never trained it)",
}


# ------------------------------------------------------------------------------------ runs.


def _settings(config: ml_collections.ConfigDict, overrides: Any) -> ml_collections.ConfigDict:
  """The run's ``eval`` and ``ensemble`` sections with ``overrides`` applied."""
  out = ml_collections.ConfigDict({"eval": config.eval.to_dict(),
                                   "ensemble": config.ensemble.to_dict()})
  if overrides is None:
    return out
  ov = overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides)
  bad = sorted(set(ov) - {"eval", "ensemble"})
  if bad:
    raise ConfigError(f"evaluation can only override the eval.* and ensemble.* settings, "
                      f"got {bad}")
  for section, values in ov.items():
    values = values.to_dict() if isinstance(values, ml_collections.ConfigDict) else dict(values)
    for k, v in values.items():
      # Fields the run's config lacks (added to configs/default.py later) are accepted too.
      out[section][k] = v
  return out


def _get(section, key: str, default):
  return section[key] if key in section else default


def _data_key(config) -> str:
  d = config.data.to_dict()
  d.pop("sampling", None)  # The sampler does not change the data, folds or cache.
  return json.dumps(d, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- prediction.


def _eval_indices(data: prepare.Data, fold: int) -> dict[str, np.ndarray]:
  out = {report.VAL: np.flatnonzero(data.folds == fold)}
  test = np.flatnonzero(data.folds == -1)
  if test.size:
    out[report.TEST] = test
  return out


def _predict_rows(trained: run_folder.TrainedModel, data: prepare.Data, fold: int, mesh,
                  eval_step, batch_size: int) -> list[dict[str, Any]]:
  rows = []
  for split, idx in _eval_indices(data, fold).items():
    if idx.size == 0:
      continue
    batches = pipeline.make_eval_iterator(data.dataset, idx, batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count(),
                                          num_workers=trained.config.data.num_workers)
    pred = loop.predict(trained.state, eval_step, batches, mesh)
    for r in run_folder.prediction_rows(data.dataset, pred):
      rows.append(dict(model=trained.config.variant, fold=fold, split=split, **r))
  return rows


def _consistency(rd: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> float | None:
  """Largest |prob - training's val_predictions.csv prob| over the validation cases."""
  path = rd / "val_predictions.csv"
  if not path.exists():
    return None
  saved = {r["case_id"]: r["prob"] for r in run_folder.read_predictions(path)}
  diffs = [abs(r["prob"] - saved[r["case_id"]]) for r in rows
           if r["split"] == report.VAL and r["case_id"] in saved]
  return float(max(diffs)) if diffs else None


# -------------------------------------------------------------------------- attention maps.


def _map_of_kind(maps: Mapping[str, np.ndarray], kind: str, attention_model: bool) -> np.ndarray:
  if kind == "display":
    return explanation.display_map(maps, attention_model)
  if kind == "cam":
    return maps["cam_up"] if attention_model else maps["grad_cam_up"]
  if kind == "t_of_cam":
    return maps["attention"]
  raise ValueError(kind)


def _attention_pass(trained: run_folder.TrainedModel, data: prepare.Data,
                    indices: Sequence[int], batch_size: int, keep: set[int], measure: set[int],
                    ) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]]]:
  """Maps of ``indices`` under one model.

  Args:
    trained: the model.
    data: the prepared data.
    indices: dataset indices to explain.
    batch_size: cases per forward pass.
    keep: indices whose maps are returned (for the figures).
    measure: indices whose attention numbers are computed (COVID with a non-empty mask).

  Returns:
    (rows {kind, model, case_id, fold, ratio, mass_inside, soft_dice}, {index: maps} for the
    indices in ``keep``).
  """
  model, variant = trained.model, trained.config.variant
  lung_masked = bool(trained.config.data.apply_lung_mask)
  variables = explanation.variables_of(trained.state)
  rows, kept = [], {}
  indices = list(indices)
  for s in range(0, len(indices), batch_size):
    chunk = indices[s:s + batch_size]
    items = [data.dataset[i] for i in chunk]
    images = np.stack([it["image"] for it in items])
    maps = explanation.batch_maps(model, variables, images)
    for j, (i, it) in enumerate(zip(chunk, items)):
      one = {k: v[j] for k, v in maps.items()}
      if i in keep:
        kept[i] = {k: one[k] for k in ("attention", "cam_up", "grad_cam_up")}
        kept[i]["prob"] = float(one["prob"])
      if i not in measure or not it["has_mask"] or not np.any(it["infection_mask"]):
        continue
      # The network's input is the CT times the lung mask, so its non-zero voxels are the lung
      # (up to voxels at the window's lower end); without lung masking there is no such proxy.
      lung = (it["image"] > 0) if lung_masked else None
      for kind in MAP_KINDS:
        m = _map_of_kind(one, kind, bool(model.attention))
        q = metrics.attention_quality(m, it["infection_mask"])
        total = float(np.sum(m, dtype=np.float64))
        in_lung = (float(np.sum(m * lung, dtype=np.float64)) / total
                   if lung is not None and total > 0 else float("nan"))
        rows.append(dict(kind=kind, model=variant, case_id=it["case_id"], ratio=it["ratio"],
                         volume_fraction=float(np.mean(it["infection_mask"] > 0)),
                         mass_in_lung=in_lung,
                         lung_fraction=float(np.mean(lung)) if lung is not None else float("nan"),
                         **q))
  return rows, kept


def choose_figure_cases(data: prepare.Data, folds: Sequence[int], case_ids: Sequence[str] = (),
                        visible: Callable[[int], bool] | None = None) -> list[tuple[int, str]]:
  """Validation cases for the Fig. 5-like panels.

  Default choice (the paper shows COVID cases of increasing infection; we add a CAP): the COVID
  case with the smallest positive infection ratio, the one with the largest, and the CAP case
  with the median ratio (masked cases preferred), all from the validation parts of ``folds``.

  Args:
    data: the prepared data.
    folds: folds whose models are available for every variant.
    case_ids: explicit case ids instead (those not in the validation parts are ignored).
    visible: optional predicate on a dataset index: whether the case's infection survives on
      the network's grid (a tiny lesion can vanish when down-sampled); COVID cases failing it
      are not chosen while others are available.

  Returns:
    [(dataset index, why)].
  """
  ds = data.dataset
  val = np.flatnonzero(np.isin(data.folds, list(folds)))
  if case_ids:
    pos = {c: i for i, c in enumerate(ds.case_ids)}
    return [(pos[c], "requested") for c in case_ids if c in pos and pos[c] in set(val)]
  ratios = np.asarray(ds.ratios, np.float64)
  labels = np.asarray(ds.labels)
  has = np.asarray(ds.has_masks, bool)
  out = []
  covid = [i for i in val if labels[i] == 1 and has[i] and np.isfinite(ratios[i])
           and ratios[i] > 0]
  if covid:
    ascending = sorted(covid, key=lambda i: (ratios[i], i))
    # Only as many predicate calls as needed: it reads the case's mask.
    seen = (i for i in ascending if visible is None or visible(int(i)))
    small = next(seen, ascending[0])
    seen = (i for i in reversed(ascending) if visible is None or visible(int(i)))
    large = next(seen, ascending[-1])
    out.append((int(small), f"COVID, smallest infection (r = {ratios[small]:.4f})"))
    if large != small:
      out.append((int(large), f"COVID, largest infection (r = {ratios[large]:.4f})"))
  cap = [i for i in val if labels[i] == 0]
  if cap:
    masked = [i for i in cap if has[i] and np.isfinite(ratios[i])] or cap
    masked = sorted(masked, key=lambda i: (np.nan_to_num(ratios[i]), i))
    pick = masked[len(masked) // 2]
    out.append((int(pick), f"CAP, median infection (r = {ratios[pick]:.4f})"))
  return out


def _display_volumes(data: prepare.Data, index: int, config) -> dict[str, Any]:
  """CT (windowed, not lung-masked), lung and infection masks on the network's grid.

  Falls back to the cached (lung-masked) image without a lung mask when the source files
  cannot be read any more.
  """
  case = data.dataset.cases[index]
  item = data.dataset[index]
  try:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.apply_lung_mask = False  # Show the CT itself; the mask is shown beside it.
    pre = preprocess.load_and_preprocess(case.image, case.lung_mask, case.infection_mask,
                                         config=cfg)
    return dict(ct=pre.image, lung=pre.lung_mask, infection=pre.infection_mask,
                spacing=pre.geometry.output_spacing)
  except DsanError as e:
    log.warning("attention figure of %s uses the cached image: %s", case.case_id, e)
    return dict(ct=item["image"], lung=None,
                infection=item["infection_mask"] if item["has_mask"] else None,
                spacing=(1.0, 1.0, 1.0))


def _safe_name(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


# ---------------------------------------------------------------------------------- ensemble.


def _ensemble(rows: list[dict[str, Any]], ens: ml_collections.ConfigDict, threshold: float,
              search: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Adds the ``att_rn34_ds`` rows; returns (rows, description of the weights used)."""
  us, ss = variants.ENSEMBLE_MEMBERS
  low, high = float(ens.low_ratio), float(ens.high_ratio)
  info: dict[str, Any] = dict(name=variants.ENSEMBLE, members=[us, ss], low_ratio=low,
                              high_ratio=high, w_extreme=float(ens.w_extreme),
                              w_middle=float(ens.w_middle), source="config (paper's values)",
                              nan_ratio_weight="w_middle (ensemble.ensemble_weight's default)")
  by_key = {}
  for r in rows:
    if r["model"] in (us, ss):
      by_key.setdefault((r["fold"], r["split"], r["case_id"]), {})[r["model"]] = r
  common = {k: v for k, v in by_key.items() if len(v) == 2}
  if not common:
    info.update(available=False, reason=f"needs predictions of both {us} and {ss}")
    return rows, info
  pairs = list(common.values())
  if search:
    val = [p for p in pairs if p[us]["split"] == report.VAL]
    if not val:
      raise ConfigError("the ensemble weight search needs validation predictions of both members")
    res = ensemble_lib.search_weights(
        [p[us]["label"] for p in val], [p[us]["prob"] for p in val], [p[ss]["prob"] for p in val],
        [p[us]["ratio"] for p in val], grid_step=float(ens.search_grid_step),
        objective=str(ens.search_objective), threshold=threshold, low=low, high=high,
        reference=(float(ens.w_extreme), float(ens.w_middle)))
    info.update(w_extreme=res.w_extreme, w_middle=res.w_middle,
                source=f"searched on {len(val)} pooled validation predictions",
                search=dict(objective=str(ens.search_objective),
                            grid_step=float(ens.search_grid_step), score=res.score,
                            n_cases=len(val)))
  sub = [p[m] for p in pairs for m in (us, ss)]
  cols = report.add_ensemble(sub, us=us, ss=ss, name=variants.ENSEMBLE,
                             w_extreme=info["w_extreme"], w_middle=info["w_middle"],
                             low=low, high=high)
  new = [{k: cols[k][i].item() for k in report.COLUMNS}
         for i in np.flatnonzero(cols["model"] == variants.ENSEMBLE)]
  info.update(available=True, n_rows=len(new),
              n_missing=len(by_key) - len(common))
  return rows + new, info


# ----------------------------------------------------------------------------------- writing.


def _attention_answer(summary: Sequence[Mapping[str, Any]], baseline: str) -> list[str]:
  """One sentence per attention model: does its map overlap the infection more than Grad-CAM?"""
  lines = []
  for e in summary:
    if e["model"] == baseline:
      continue
    parts = []
    for k, name in (("mass_inside", "mass inside the infection"), ("soft_dice", "soft Dice")):
      s = e[k]
      if not s.get("n_paired"):
        parts.append(f"{name}: no paired cases")
        continue
      verdict = "higher" if s["mean_diff"] > 0 else "not higher"
      parts.append(f"{name} {verdict} than the baseline's Grad-CAM by {s['mean_diff']:+.3f} "
                   f"on average (higher in {100 * s['frac_higher']:.0f} % of {s['n_paired']} "
                   f"cases, paired t-test p {fmt_p(s['p'])})")
    lines.append(f"- **{report.MODEL_TITLES.get(e['model'], e['model'])}**: " + "; ".join(parts)
                 + ".")
  return lines


def _ensemble_markdown(ens: Mapping[str, Any]) -> list[str]:
  if not ens.get("available"):
    return [f"No ensemble: {ens.get('reason')}.", ""]
  lines = [f"Dual-sampling ensemble `{ens['name']}` (Eq. 5): P = w P_US + (1 - w) P_SS with "
           f"w = {ens['w_extreme']:.2f} when r < {ens['low_ratio']} or r > "
           f"{ens['high_ratio']}, w = {ens['w_middle']:.2f} otherwise; unknown ratio: "
           f"{ens['nan_ratio_weight']}. Weights: {ens['source']}."]
  if "search" in ens:
    s = ens["search"]
    lines += [f"Search objective: {s['objective']} at the threshold (ties: the other metric, "
              f"then nearest to the paper's weights), grid step {s['grid_step']}, best "
              f"{s['objective']} {fmt(s['score'])} on the pooled validation predictions. "
              "The searched weights are applied to the validation rows they were fitted on "
              "(in-sample, as the paper's TV-set search) and to the test rows (out-of-sample)."]
  return lines + [""]


def _runs_markdown(runs: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = ["Runs (best checkpoint; `max |dp|` compares the re-predicted validation "
           "probabilities with those saved by training):", ""]
  lines += ["| Variant | Fold | Best epoch (from 0) | Val AUC (training) | max \\|dp\\| |",
            "|---|---|---|---|---|"]
  for r in runs:
    lines.append(f"| {r['variant']} | {r['fold']} | {r['best_epoch']} | {fmt(r['best_val_auc'])} "
                 f"| {fmt(r['max_abs_prob_diff'], 6)} |")
  lines += [""]
  unfinished = [f"- {r['variant']} fold {r['fold']}: {r['status']} when evaluated (its best "
                "checkpoint so far; no `max |dp|`)." for r in runs
                if r.get("status", "complete") != "complete"]
  return lines + (unfinished + [""] if unfinished else [])


def _attention_maps_markdown(att: Mapping[str, Any], baseline: str) -> list[str]:
  lines = ["### Do the attention maps overlap the infections more than the baseline's "
           "Grad-CAM?", "",
           f"COVID validation cases with an infection mask, each explained by the fold model "
           f"that did not train on it. Chance levels of the mass inside: a uniform map over "
           f"the lung gives the infection ratio, mean "
           f"{fmt(att.get('chance_mass_inside'))} over these cases; a uniform map over the "
           f"whole input volume gives the infection's volume fraction, mean "
           f"{fmt(att.get('chance_mass_inside_volume'), 4)}, and a mass inside the lung "
           f"equal to the lung's volume fraction, mean "
           f"{fmt(att.get('chance_mass_in_lung_volume'))}.", ""]
  lines += _attention_answer(att["display"], baseline) + [""]
  lines += ["All map kinds (mean over cases; paired differences to the baseline in "
            "attention_cases.csv / metrics.json):", ""]
  lines += ["| Map kind | Model | N | Mass inside the infection | Soft Dice | "
            "Mass inside the lung |", "|---|---|---|---|---|---|"]
  for kind in MAP_KINDS:
    for e in att.get(kind, []):
      lines.append(f"| {kind} | {report.MODEL_TITLES.get(e['model'], e['model'])} | "
                   f"{e['mass_inside']['n']} | {fmt(e['mass_inside']['mean'])} | "
                   f"{fmt(e['soft_dice']['mean'])} | "
                   f"{fmt(e.get('mass_in_lung', {}).get('mean'))} |")
  return lines + ["", "Map kinds: " + "; ".join(f"`{k}`: {v}" for k, v in MAP_KIND_TITLES.items())
                  + ".", ""]


def _extra_markdown(ev: Mapping[str, Any]) -> str:
  """The "Evaluation details" section appended to report.md."""
  lines = ["", "## Evaluation details", ""]
  lines += _ensemble_markdown(ev["ensemble"])
  lines += _runs_markdown(ev["runs"])
  att = ev.get("attention_maps") or {}
  if att.get("display"):
    lines += _attention_maps_markdown(att, ev["baseline"])
  if ev["attention_figures"]:
    lines += ["### Attention figures (like the paper's Fig. 5)", ""]
    for f in ev["attention_figures"]:
      lines += [f"{f['case_id']} (fold {f['fold']}, {f['why']}):", "",
                f"![{f['case_id']}]({f['file']})", ""]
  if ev["training_curves"]:
    lines += ["### Training curves", ""] + [f"- [{os.path.basename(p)}]({p})"
                                            for p in ev["training_curves"]] + [""]
  lines += [f"Evaluated in {ev['seconds']:.1f} s.", ""]
  return "\n".join(lines)


# -------------------------------------------------------------------------------- evaluators.


@dataclasses.dataclass
class Context:
  """What the evaluators share: the settings, the runs, the results so far, the output folder.

  Attributes:
    workdir: the protocol's root folder.
    out: the temporary output folder (renamed to the final one when complete).
    runs: the trained runs, in ``run_folder.find_runs`` order.
    notes: {run: note} for runs still training (None for complete ones).
    mesh: the device mesh.
    settings: the ``eval`` and ``ensemble`` sections in force.
    first: the first run's config (HU window, reference rows).
    names: the evaluators in force, in order.
    search: grid-search the ensemble's weights.
    progress: show progress bars.
  """
  workdir: pathlib.Path
  out: pathlib.Path
  runs: list[run_folder.RunInfo]
  notes: dict[run_folder.RunInfo, str | None]
  mesh: Any
  settings: ml_collections.ConfigDict
  first: ml_collections.ConfigDict
  names: tuple[str, ...]
  search: bool
  progress: bool
  datasets: dict[str, prepare.Data] = dataclasses.field(default_factory=dict)
  eval_steps: dict[Any, Any] = dataclasses.field(default_factory=dict)
  data_note: str | None = None
  rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # report.COLUMNS rows.
  run_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # runs.csv.
  att_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # attention_cases.csv.
  att_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
  figure_cases: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  figure_maps: dict[int, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
  fig_info: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  curves: list[str] = dataclasses.field(default_factory=list)
  ens_info: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
      available=False, reason="the ensemble evaluator is not in eval.evaluators"))
  result_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # -> metrics.json.
  sections: list[str] = dataclasses.field(default_factory=list)  # Appended to report.md.
  extra_files: list[str] = dataclasses.field(default_factory=list)

  @property
  def threshold(self) -> float:
    return float(self.settings.eval.threshold)

  @property
  def edges(self) -> tuple[float, ...]:
    return tuple(float(e) for e in self.settings.eval.ratio_groups)

  @property
  def batch_size(self) -> int:
    return int(self.settings.eval.batch_size)

  def data_for(self, config) -> prepare.Data:
    """The prepared data of a run's config (shared by runs of the same data settings)."""
    key = _data_key(config)
    if key not in self.datasets:
      self.datasets[key] = prepare.prepare_data(config, self.workdir, self.progress)
    return self.datasets[key]

  def any_data(self) -> prepare.Data:
    return next(iter(self.datasets.values()))


@dataclasses.dataclass
class RunEval:
  """One run under evaluation: its model, its data, its predictions and the maps asked for."""
  run: run_folder.RunInfo
  trained: run_folder.TrainedModel
  data: prepare.Data
  pred: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  measure: set[int] = dataclasses.field(default_factory=set)  # Attention numbers of these.
  keep: set[int] = dataclasses.field(default_factory=set)  # Maps kept for the figures.


class Evaluator(NamedTuple):
  """``per_run(ctx, r)`` after each run's model is loaded; ``finish(ctx)`` once after all runs."""
  per_run: Callable[[Context, RunEval], None] | None
  finish: Callable[[Context], None] | None


def _predictions_per_run(ctx: Context, r: RunEval) -> None:
  """Re-predicts the run's validation fold and the test split; one runs.csv row."""
  cfg, run = r.trained.config, r.run
  key = (r.trained.model, float(cfg.loss.attention_weight))
  if key not in ctx.eval_steps:
    ctx.eval_steps[key] = steps.make_eval_step(r.trained.model, ctx.mesh, key[1])
  r.pred = _predict_rows(r.trained, r.data, run.fold, ctx.mesh, ctx.eval_steps[key],
                         ctx.batch_size)
  ctx.rows += r.pred
  done = run.run_dir / "done.json"
  summary = json.loads(done.read_text()) if done.exists() else {}
  val_auc = (summary.get("best_val") or {}).get("auc", r.trained.meta.get("best_metric"))
  ctx.run_rows.append(dict(
      variant=run.variant, fold=run.fold, best_epoch=r.trained.meta.get("best_epoch"),
      best_val_auc=val_auc, complete=done.exists(),
      status=run_folder.run_status(run.run_dir) if ctx.notes[run] else "complete",
      n_val=sum(p["split"] == report.VAL for p in r.pred),
      n_test=sum(p["split"] == report.TEST for p in r.pred),
      max_abs_prob_diff=None, run_dir=str(run.run_dir)))


def _consistency_per_run(ctx: Context, r: RunEval) -> None:
  """The re-predicted validation probabilities against training's val_predictions.csv."""
  # A run in progress may have saved val_predictions.csv of a newer best epoch meanwhile.
  if not ctx.notes[r.run]:
    ctx.run_rows[-1]["max_abs_prob_diff"] = _consistency(r.run.run_dir, r.pred)


def _attention_per_run(ctx: Context, r: RunEval) -> None:
  """Asks for the maps of the run's masked COVID validation cases (``eval.attention_*``)."""
  ev_cfg = ctx.settings.eval
  if not bool(_get(ev_cfg, "attention_quality", True)):
    return
  max_att = int(_get(ev_cfg, "attention_max_cases", 0))
  ds = r.data.dataset
  masked_covid = [int(i) for i in np.flatnonzero(r.data.folds == r.run.fold)
                  if ds.labels[i] == 1 and ds.has_masks[i]]
  r.measure = set(masked_covid[:max_att] if max_att > 0 else masked_covid)


def _attention_finish(ctx: Context) -> None:
  """Summaries per map kind with the chance levels; attention_cases.csv."""
  att_rows = ctx.att_rows
  models = _model_order(ctx.rows)
  att_models = [m for m in models if any(r["model"] == m for r in att_rows)]
  summary = {kind: report.attention_summary(
      [r for r in att_rows if r["kind"] == kind], att_models, BASELINE) for kind in MAP_KINDS}
  for kind in MAP_KINDS:
    for e in summary[kind]:
      v = np.array([r["mass_in_lung"] for r in att_rows
                    if r["kind"] == kind and r["model"] == e["model"]], np.float64)
      v = v[np.isfinite(v)]
      e["mass_in_lung"] = dict(n=int(v.size), mean=float(np.mean(v)) if v.size else float(
          "nan"))
  summary.update(_chance_levels({r["case_id"]: r for r in att_rows}))
  ctx.att_summary = summary if att_rows else {}
  files.write_csv(ctx.out / "attention_cases.csv", att_rows, empty_field="empty")
  ctx.extra_files.append("attention_cases.csv")


def _chance_levels(per_case: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """Mass inside / in the lung of uniform maps, averaged over the measured cases."""
  def mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")

  return dict(
      chance_mass_inside=mean(r["ratio"] for r in per_case.values() if np.isfinite(r["ratio"])),
      chance_mass_inside_volume=mean(r["volume_fraction"] for r in per_case.values()),
      chance_mass_in_lung_volume=mean(r["lung_fraction"] for r in per_case.values()
                                      if np.isfinite(r["lung_fraction"])))


def _full_folds(runs: Sequence[run_folder.RunInfo]) -> list[int]:
  """Folds with every variant trained (the figures compare the three models of one fold)."""
  by_fold: dict[int, set[str]] = {}
  for r in runs:
    by_fold.setdefault(r.fold, set()).add(r.variant)
  return sorted(f for f, v in by_fold.items() if set(variants.VARIANTS) <= v) or sorted(by_fold)


def _figures_per_run(ctx: Context, r: RunEval) -> None:
  """Chooses the figure cases (once) and asks for the maps of this fold's ones."""
  figure_ids = tuple(_get(ctx.settings.eval, "figure_case_ids", ()) or ())
  full_folds = _full_folds(ctx.runs)
  if not ctx.figure_cases and (full_folds or figure_ids):
    ctx.figure_cases = choose_figure_cases(
        r.data, full_folds, figure_ids,
        visible=lambda i, ds=r.data.dataset: bool(np.any(ds[i]["infection_mask"])))
  r.keep = {i for i, _ in ctx.figure_cases if r.data.folds[i] == r.run.fold}


def _maps_per_run(ctx: Context, r: RunEval) -> None:
  """One explanation pass over the cases the attention and figure evaluators asked for."""
  todo = sorted(r.measure | r.keep)
  if not todo or r.run.variant not in variants.VARIANTS:
    return
  a_rows, kept = _attention_pass(r.trained, r.data, todo, ctx.batch_size, r.keep, r.measure)
  ctx.att_rows += [dict(row, fold=r.run.fold) for row in a_rows]
  for i, maps in kept.items():
    ctx.figure_maps.setdefault(i, {})[r.run.variant] = dict(
        maps, attention_model=bool(r.trained.model.attention))


def _figure(ctx: Context, i: int, why: str, per_model: Mapping[str, Mapping[str, Any]]
            ) -> dict[str, Any]:
  """Draws attention/<case>.png for dataset index ``i``; returns its figure entry."""
  data = ctx.any_data()
  ds = data.dataset
  run_cfg = {r.variant: r for r in ctx.runs}
  case_id = ds.case_ids[i]
  cfg = run_folder.load_config(run_cfg[next(iter(per_model))].run_dir / "config.json")
  vols = _display_volumes(data, i, cfg)
  maps = {}
  for variant in variants.VARIANTS:
    if variant in per_model:
      m = per_model[variant]
      label = (f"{report.MODEL_TITLES[variant]} T(A)" if m["attention_model"]
               else f"{report.MODEL_TITLES[variant]} Grad-CAM")
      maps[f"{label}\nP(COVID) = {m['prob']:.2f}"] = explanation.display_map(
          m, m["attention_model"])
  name = f"attention/{_safe_name(case_id)}.png"
  label = "COVID" if ds.labels[i] == 1 else "CAP"
  plots.plot_attention_figure(
      vols["ct"], vols["lung"], vols["infection"], maps, ctx.out / name,
      spacing=vols["spacing"],
      title=f"{case_id}: {label}, fold {int(data.folds[i])} models ({why})")
  return dict(case_id=case_id, fold=int(data.folds[i]), why=why, file=name,
              label=int(ds.labels[i]), ratio=float(ds.ratios[i]))


def _figures_finish(ctx: Context) -> None:
  """The Fig. 5-like panels, attention/<case>.png."""
  for i, why in ctx.figure_cases:
    per_model = ctx.figure_maps.get(i, {})
    if per_model:
      ctx.fig_info.append(_figure(ctx, i, why, per_model))
  ctx.extra_files += [f["file"] for f in ctx.fig_info]


def _curves_per_run(ctx: Context, r: RunEval) -> None:
  """curves/<variant>_fold<k>.png from the run's metrics.jsonl."""
  run = r.run
  metrics_rows = _read_jsonl(run.run_dir / "metrics.jsonl")
  if metrics_rows:
    path = ctx.out / "curves" / f"{_safe_name(run.variant)}_fold{run.fold}.png"
    plots.plot_training_curves(metrics_rows, path,
                               title=f"{run.variant} fold {run.fold} (training)")
    ctx.curves.append(os.path.join("curves", path.name))
    ctx.extra_files.append(ctx.curves[-1])


def _ensemble_finish(ctx: Context) -> None:
  """The dual-sampling ensemble's rows (Eq. 5); ensemble.json."""
  ctx.rows, ctx.ens_info = _ensemble(ctx.rows, ctx.settings.ensemble, ctx.threshold, ctx.search)
  (ctx.out / "ensemble.json").write_text(json.dumps(files.jsonable(ctx.ens_info), indent=1))
  ctx.extra_files.append("ensemble.json")


def _findings_finish(ctx: Context) -> None:
  """The paper's three findings with verdicts (``findings.py``); findings.csv."""
  paper = findings.paper_findings(ctx.rows, ctx.threshold, ctx.edges)
  ctx.result_extra["findings"] = paper
  files.write_csv(ctx.out / "findings.csv", paper["effects"], empty_field="empty")
  ctx.extra_files.append("findings.csv")
  ctx.sections.append("\n" + findings.markdown(paper, ctx.edges))


def _reference_finish(ctx: Context) -> None:
  """Calibration rows beside the networks' (``reference.py``)."""
  ctx.rows += _reference_rows(ctx.rows, ctx.any_data(), ctx.settings.eval,
                              ctx.first.data.hu_window)


# Run in the order ``eval.evaluators`` lists them ("predictions" first; "findings" before
# "reference" compares the networks only). The one explanation pass per run (_maps_per_run)
# follows the per-run steps and serves both "attention" and "figures".
EVALUATORS: dict[str, Evaluator] = {
    "predictions": Evaluator(_predictions_per_run, None),
    "consistency": Evaluator(_consistency_per_run, None),
    "attention": Evaluator(_attention_per_run, _attention_finish),
    "figures": Evaluator(_figures_per_run, _figures_finish),
    "curves": Evaluator(_curves_per_run, None),
    "ensemble": Evaluator(None, _ensemble_finish),
    "findings": Evaluator(None, _findings_finish),
    "reference": Evaluator(None, _reference_finish),
}


def _evaluator_names(ev_cfg) -> tuple[str, ...]:
  """``eval.evaluators`` (every evaluator for a run saved before the setting existed)."""
  names = tuple(str(n) for n in (_get(ev_cfg, "evaluators", None) or tuple(EVALUATORS)))
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ConfigError(f"eval.evaluators: unknown {unknown}; known: {list(EVALUATORS)}")
  if not names or names[0] != "predictions":
    raise ConfigError(f"eval.evaluators must start with 'predictions' (the others use its "
                      f"rows), got {list(names)}")
  return names


# ---------------------------------------------------------------------------------- the run.


def _reference_rows(rows: Sequence[Mapping[str, Any]], data: prepare.Data, ev_cfg,
                    hu_window) -> list[dict[str, Any]]:
  """Calibration rows beside the networks' (``reference.py``) for the folds in ``rows``."""
  models = tuple(_get(ev_cfg, "reference_models", reference.REFERENCE_MODELS) or ())
  if not models:
    return []
  return reference.reference_rows(data.dataset, data.folds, hu_window, models,
                                  eval_folds={int(r["fold"]) for r in rows})


def _model_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The report's models: those of ``report.DEFAULT_MODELS`` present, then the others."""
  present = list(dict.fromkeys(r["model"] for r in rows))
  return [m for m in report.DEFAULT_MODELS if m in present] + [
      m for m in present if m not in report.DEFAULT_MODELS]


def _context(workdir: pathlib.Path, out: pathlib.Path, config_overrides: Any,
             search_ensemble: bool, progress: bool) -> Context:
  """Finds the runs, prints the notes of unfinished ones, resolves the settings."""
  runs = run_folder.find_runs(workdir)
  if not runs:
    raise DsanError(f"{workdir}: no trained runs (expected <variant>/fold_<k>/checkpoints/best)")
  notes = {r: run_folder.incomplete_note(r.variant, r.fold, r.run_dir) for r in runs}
  for note in filter(None, notes.values()):
    print(f"[dsan_jax] note: {note}", flush=True)
  mesh = sharding.make_mesh()
  first = run_folder.load_config(runs[0].run_dir / "config.json")
  settings = _settings(first, config_overrides)
  sharding.check_batch_divisible(int(settings.eval.batch_size), mesh, "eval.batch_size")
  search = bool(search_ensemble or _get(settings.ensemble, "search", False))
  return Context(workdir=workdir, out=out, runs=runs, notes=notes, mesh=mesh, settings=settings,
                 first=first, names=_evaluator_names(settings.eval), search=search,
                 progress=progress)


def _evaluate_runs(ctx: Context) -> None:
  """Loads each run's best checkpoint and runs the per-run steps of the evaluators."""
  per_run = [EVALUATORS[n].per_run for n in ctx.names if EVALUATORS[n].per_run is not None]
  for run in tqdm(ctx.runs, desc="evaluating runs", unit="run", disable=not ctx.progress):
    trained = run_folder.load_trained(run.run_dir, ctx.mesh, "best")
    data = ctx.data_for(trained.config)
    # The ratios' sources (masks / ESTIMATED / manifest) head the report: Table III's groups
    # and the ensemble's weights rest on them.
    ctx.data_note = ctx.data_note or f"{data.note}; {cache_lib.ratio_summary(data.dataset)}"
    r = RunEval(run=run, trained=trained, data=data)
    for step in per_run:
      step(ctx, r)
    _maps_per_run(ctx, r)
    del r, trained


def _write_evaluation(ctx: Context, t0: float, out_dir: pathlib.Path) -> dict[str, Any]:
  """Tables, report.md, runs.csv and metrics.json into ``ctx.out``; returns metrics.json's dict."""
  display_rows = [dict(model=r["model"], case_id=r["case_id"], mass_inside=r["mass_inside"],
                       soft_dice=r["soft_dice"]) for r in ctx.att_rows if r["kind"] == "display"]
  models = _model_order(ctx.rows)
  networks = [m for m in models if m not in reference.REFERENCE_MODELS]
  result = report.write_report(
      ctx.rows, ctx.out, models=models, baseline=BASELINE,
      title=f"DSAN evaluation of {ctx.workdir}", data_note=ctx.data_note or "unknown data",
      threshold=ctx.threshold, ratio_edges=ctx.edges, attention=display_rows or None,
      pairs=report.default_pairs(networks, BASELINE) if BASELINE in networks else [])
  result.update(ctx.result_extra)
  files.write_csv(ctx.out / "runs.csv", ctx.run_rows, empty_field="empty")
  ev = dict(runs=ctx.run_rows, ensemble=ctx.ens_info, baseline=BASELINE,
            attention_maps=ctx.att_summary, attention_figures=ctx.fig_info,
            training_curves=ctx.curves, seconds=time.perf_counter() - t0,
            settings=ctx.settings.to_dict(), workdir=str(ctx.workdir))
  with open(ctx.out / "report.md", "a") as f:
    for section in ctx.sections:
      f.write(section)
    f.write(_extra_markdown(ev))
  result = dict(result, evaluation=ev)
  tmp = ctx.out
  result["files"] = sorted({os.path.relpath(p, tmp) if os.path.isabs(str(p)) else str(p)
                            for p in list(result["files"]) + ["runs.csv"] + ctx.extra_files})
  result["out_dir"] = str(out_dir)
  result["figures"] = [os.path.relpath(p, tmp) for p in result.get("figures", [])]
  (tmp / "metrics.json").write_text(json.dumps(files.jsonable(result), indent=1, allow_nan=False))
  return result


def evaluate_workdir(workdir: str | os.PathLike, config_overrides: Any = None,
                     search_ensemble: bool = False, progress: bool = True,
                     out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """Evaluates every trained run of ``workdir`` and writes ``<workdir>/evaluation/``.

  The evaluators named by ``eval.evaluators`` (``EVALUATORS``) run in that order: each one's
  per-run step after a run's best checkpoint is loaded, then each one's final step; the tables,
  report.md and metrics.json are written last.

  Args:
    workdir: the protocol's root folder (``<workdir>/<variant>/fold_<k>/``).
    config_overrides: optional {"eval": {...}, "ensemble": {...}} (dict or ConfigDict) applied
      over each run's own settings (e.g. the threshold, the ratio groups, the ensemble weights,
      ``eval.attention_max_cases``, ``eval.figure_case_ids``, ``eval.evaluators``). Other
      sections would change the model or the data and are refused.
    search_ensemble: grid-search the ensemble's two weights on the pooled validation
      predictions (``ensemble.search_weights``, objective ``ensemble.search_objective``) instead
      of using the configured ones; also on when ``ensemble.search`` is True.
    progress: show progress bars.
    out_dir: output folder; None -> ``<workdir>/evaluation``.

  Returns:
    The metrics dict written to metrics.json (``report.write_report``'s, plus ``evaluation``
    with the runs, ensemble weights, attention summaries and figure paths) and ``out_dir``.

  Raises:
    DsanError: no trained run in ``workdir``; ConfigError: a bad ``eval.evaluators``.
  """
  t0 = time.perf_counter()
  workdir = pathlib.Path(workdir)
  out_dir = pathlib.Path(out_dir) if out_dir is not None else workdir / OUT_DIR_NAME
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  ctx = _context(workdir, tmp, config_overrides, search_ensemble, progress)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  if tmp.exists():
    shutil.rmtree(tmp)
  (tmp / "curves").mkdir(parents=True)
  (tmp / "attention").mkdir()
  try:
    _evaluate_runs(ctx)
    for name in ctx.names:
      if EVALUATORS[name].finish is not None:
        EVALUATORS[name].finish(ctx)
    result = _write_evaluation(ctx, t0, out_dir)
    if jax.process_index() == 0:  # Two evaluations of one workdir may finish at once.
      with run_lock.locked(out_dir.parent / f".{out_dir.name}.lock"):
        files.replace_dir(tmp, out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  if progress:
    _print_summary(result)
  return result


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          break  # A torn last line of an interrupted run.
  return out


def _print_summary(result: Mapping[str, Any]) -> None:
  t2 = result["table2"]
  print(f"[dsan_jax] evaluation written to {result['out_dir']}", flush=True)
  for m in result["models"]:
    e = t2.get(m, {})
    parts = []
    if report.VAL in e:
      parts.append(f"val AUC {fmt(e[report.VAL]['pooled']['auc'])} acc "
                   f"{fmt(e[report.VAL]['pooled']['accuracy'])}")
    if report.TEST in e:
      parts.append(f"test AUC {fmt(e[report.TEST]['mean']['auc'])} ± "
                   f"{fmt(e[report.TEST]['std']['auc'])}")
    print(f"  {m:12s} " + " | ".join(parts), flush=True)
