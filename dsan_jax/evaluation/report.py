"""The paper's tables from per-case predictions: Table II, Table III, paired tests, ROC curves.

Input is a tidy table of predictions, one row per (model, fold, split, case_id):

  model    str    e.g. "rn34_us", "att_rn34_us", "att_rn34_ss", "att_rn34_ds"
  fold     int    validation rows: the fold whose validation part holds the case;
                  test rows: the fold whose trained model made the prediction
  split    str    "val" or "test"
  case_id  str
  label    int    1 = COVID, 0 = CAP
  ratio    float  infection/lung volume ratio (NaN = unknown)
  prob     float  predicted COVID probability

given as a list of dicts, a dict of columns, or a NumPy structured array (no pandas needed).

What is computed (threshold 0.5, COVID positive, ``prob >= threshold``):
  * Table II: per model, validation metrics on the predictions pooled over the folds (the paper's
    "combined results of 5 validation sets"), and test metrics as mean ± std over the fold
    models (std with ddof = 1, the sample standard deviation of the K fold models).
  * Table III: the same per infection-ratio group (< 0.005, 0.005 - 0.030, > 0.030), with the
    number of COVID and CAP scans per group (distinct case ids of the split).
  * Paired comparisons (each model against the baseline, and "att_rn34_us" against
    "att_rn34_ds" as in Section IV-E): a paired t-test over the fold models of each metric
    (validation: per-fold validation metrics; test: per-fold-model test metrics), overall and
    per ratio group; and DeLong's test of the AUCs on the pooled validation cases (and on the
    test cases for each fold model), which pairs the two models case by case.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dsan_jax import files
from dsan_jax.evaluation import ensemble
from dsan_jax.evaluation import metrics
from dsan_jax.evaluation import plots
from dsan_jax.evaluation import stats
from dsan_jax.evaluation.text import fmt, fmt_p, md_table, pm

VAL = "val"
TEST = "test"
COLUMNS = ("model", "fold", "split", "case_id", "label", "ratio", "prob")
DEFAULT_MODELS = ("rn34_us", "att_rn34_us", "att_rn34_ss", "att_rn34_ds")
MODEL_TITLES = {
    "rn34_us": "RN34 + US",
    "att_rn34_us": "Attention RN34 + US",
    "att_rn34_ss": "Attention RN34 + SS",
    "att_rn34_ds": "Attention RN34 + DS",
    # Calibration rows (dsan_jax/evaluation/reference.py).
    "size_only": "Reference: infection ratio only",
    "density_features": "Reference: lung-density features",
}
METRIC_TITLES = {"auc": "AUC", "accuracy": "Accuracy", "sensitivity": "Sensitivity",
                 "specificity": "Specificity", "f1": "F1-score"}

Columns = dict[str, np.ndarray]


# ------------------------------------------------------------------------------ input table.


def as_columns(predictions: Any) -> Columns:
  """Converts the prediction table to a dict of equal-length NumPy columns and validates it.

  Args:
    predictions: list of row dicts, dict of columns, or a structured array with ``COLUMNS``.

  Returns:
    {column: [R] array}: model/split/case_id as str, fold and label as int64, ratio and prob as
    float64.

  Raises:
    ValueError: a missing column, unequal lengths, bad labels/probabilities/splits, a duplicated
      (model, fold, split, case_id), or a case id with different labels in different rows.
  """
  if isinstance(predictions, np.ndarray) and predictions.dtype.names:
    raw = {k: predictions[k] for k in predictions.dtype.names}
  elif isinstance(predictions, Mapping):
    raw = dict(predictions)
  else:
    rows = list(predictions)
    raw = {k: [r[k] for r in rows] for k in COLUMNS if all(k in r for r in rows)}
  missing = [k for k in COLUMNS if k not in raw]
  if missing:
    raise ValueError(f"prediction table lacks column(s) {missing}")
  cols = {
      "model": np.asarray(raw["model"]).astype(str),
      "fold": np.asarray(raw["fold"]).astype(np.int64),
      "split": np.asarray(raw["split"]).astype(str),
      "case_id": np.asarray(raw["case_id"]).astype(str),
      "label": np.asarray(raw["label"]).astype(np.int64),
      "ratio": np.asarray(raw["ratio"], dtype=np.float64),
      "prob": np.asarray(raw["prob"], dtype=np.float64),
  }
  lengths = {k: v.shape for k, v in cols.items()}
  if len(set(lengths.values())) != 1 or cols["model"].ndim != 1:
    raise ValueError(f"prediction columns must be 1-D of equal length, got {lengths}")
  bad_split = set(np.unique(cols["split"])) - {VAL, TEST}
  if bad_split:
    raise ValueError(f"split must be '{VAL}' or '{TEST}', got {sorted(bad_split)}")
  if not np.all(np.isin(cols["label"], (0, 1))):
    raise ValueError("label must be 0 (CAP) or 1 (COVID)")
  p = cols["prob"]
  if not np.all(np.isfinite(p) & (p >= 0) & (p <= 1)):
    raise ValueError("prob must be finite and in [0, 1]")
  keys = np.char.add(np.char.add(np.char.add(cols["model"], "\x00"), cols["split"]),
                     np.char.add(np.char.add("\x00", cols["fold"].astype(str)),
                                 np.char.add("\x00", cols["case_id"])))
  uniq, counts = np.unique(keys, return_counts=True)
  if np.any(counts > 1):
    dup = uniq[counts > 1][0].split("\x00")
    raise ValueError(f"duplicated prediction row (model, split, fold, case_id) = {tuple(dup)}")
  cases, inverse = np.unique(cols["case_id"], return_inverse=True)
  lo = np.full(cases.size, 2)
  hi = np.full(cases.size, -1)
  np.minimum.at(lo, inverse, cols["label"])
  np.maximum.at(hi, inverse, cols["label"])
  if np.any(lo != hi):
    raise ValueError(f"case {cases[np.argmax(lo != hi)]!r} has different labels in different rows")
  return cols


def _select(cols: Columns, **conditions) -> Columns:
  sel = np.ones(cols["model"].shape, bool)
  for k, v in conditions.items():
    sel &= cols[k] == v
  return {k: v[sel] for k, v in cols.items()}


def _rows_of(cols: Columns) -> list[dict[str, Any]]:
  return [{k: cols[k][i].item() for k in COLUMNS} for i in range(cols["model"].size)]


def add_ensemble(predictions: Any, us: str = "att_rn34_us", ss: str = "att_rn34_ss",
                 name: str = "att_rn34_ds", **weight_kwargs) -> Columns:
  """Appends the dual-sampling ensemble's rows (Eq. 5) built from the US and SS models' rows.

  Rows are paired by (fold, split, case_id); every case of one model must exist for the other.

  Args:
    predictions: the prediction table (see the module docstring).
    us, ss: names of the uniform- and size-balanced-sampling models.
    name: name of the ensemble model.
    **weight_kwargs: ``w_extreme``, ``w_middle``, ``low``, ``high`` (required; e.g.
      ``ensemble.config_weights(config.ensemble)``) and ``nan_weight`` of ``ensemble.combine``.

  Returns:
    The table (as columns) with the ensemble's rows added.
  """
  cols = as_columns(predictions)
  if np.any(cols["model"] == name):
    raise ValueError(f"model {name!r} is already in the table")
  a, b = _select(cols, model=us), _select(cols, model=ss)
  ka = {k: i for i, k in enumerate(zip(a["fold"], a["split"], a["case_id"]))}
  kb = {k: i for i, k in enumerate(zip(b["fold"], b["split"], b["case_id"]))}
  if set(ka) != set(kb) or not ka:
    raise ValueError(f"models {us!r} and {ss!r} must predict the same (fold, split, case) rows; "
                     f"{len(set(ka) ^ set(kb))} rows differ")
  order = [kb[k] for k in ka]
  prob = ensemble.combine(a["prob"], b["prob"][order], a["ratio"], **weight_kwargs)
  new = {k: v.copy() for k, v in a.items()}
  new["model"] = np.full(new["model"].shape, name)
  new["prob"] = np.clip(prob, 0.0, 1.0)
  return {k: np.concatenate([cols[k], new[k]]) for k in COLUMNS}


# --------------------------------------------------------------------------------- tables.


def _nan_stats(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, dtype=np.float64)
  mean = float(np.mean(v)) if v.size else float("nan")
  std = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
  return mean, std


def _mean_std(per_fold: Mapping[int, Mapping[str, float]]) -> tuple[dict, dict]:
  mean, std = {}, {}
  for k in metrics.METRIC_NAMES:
    mean[k], std[k] = _nan_stats([m[k] for m in per_fold.values()])
  return mean, std


def table2(cols: Columns, models: Sequence[str], threshold: float = 0.5) -> dict[str, Any]:
  """Table II: {model: {"val": {...}, "test": {...}}} (entries only for splits present).

  "val" has ``pooled`` (binary_metrics on all validation folds together) and ``per_fold``;
  "test" has ``mean``, ``std`` and ``per_fold`` (one entry per fold model).
  """
  out: dict[str, Any] = {}
  for model in models:
    entry: dict[str, Any] = {}
    for split in (VAL, TEST):
      c = _select(cols, model=model, split=split)
      if c["model"].size == 0:
        continue
      per_fold = {int(f): metrics.binary_metrics(c["label"][c["fold"] == f],
                                                 c["prob"][c["fold"] == f], threshold)
                  for f in np.unique(c["fold"])}
      if split == VAL:
        entry[split] = dict(pooled=metrics.binary_metrics(c["label"], c["prob"], threshold),
                            per_fold=per_fold)
      else:
        mean, std = _mean_std(per_fold)
        entry[split] = dict(mean=mean, std=std, per_fold=per_fold)
    out[model] = entry
  return out


def _group_counts(cols: Columns, split: str, edges) -> list[dict[str, Any]]:
  """Distinct cases of ``split`` per ratio group: [{group, name, n_covid, n_cap}]."""
  c = _select(cols, split=split)
  _, first = np.unique(c["case_id"], return_index=True)
  labels, groups = c["label"][first], metrics.group_of_ratio(c["ratio"][first], edges)
  names = metrics.group_names(edges)
  wanted = [0, 1, 2] + ([-1] if np.any(groups == -1) else [])
  return [dict(group=g, name=names[g], n_covid=int(np.sum(labels[groups == g] == 1)),
               n_cap=int(np.sum(labels[groups == g] == 0))) for g in wanted]


def table3(cols: Columns, models: Sequence[str], threshold: float = 0.5,
           edges: Sequence[float] = metrics.DEFAULT_RATIO_EDGES) -> dict[str, Any]:
  """Table III: per split, the group counts and per model the group-wise metrics.

  Returns:
    {split: {"groups": [{group, name, n_covid, n_cap}], "models": {model: [per group:
    {group, name, ...}]}}}; validation entries hold the pooled metrics, test entries ``mean``,
    ``std`` and ``per_fold`` per group.
  """
  out: dict[str, Any] = {}
  for split in (VAL, TEST):
    if not np.any(cols["split"] == split):
      continue
    groups = _group_counts(cols, split, edges)
    per_model = {}
    for model in models:
      c = _select(cols, model=model, split=split)
      if c["model"].size == 0:
        continue
      if split == VAL:
        per_model[model] = metrics.metrics_by_group(c["label"], c["prob"], c["ratio"], edges,
                                                    threshold)
        continue
      folds = np.unique(c["fold"])
      by_fold = {int(f): metrics.metrics_by_group(
          c["label"][c["fold"] == f], c["prob"][c["fold"] == f], c["ratio"][c["fold"] == f],
          edges, threshold) for f in folds}
      rows = []
      for g in groups:
        pf = {f: next(r for r in rs if r["group"] == g["group"]) for f, rs in by_fold.items()
              if any(r["group"] == g["group"] for r in rs)}
        mean, std = _mean_std(pf)
        rows.append(dict(group=g["group"], name=g["name"], mean=mean, std=std, per_fold=pf))
      per_model[model] = rows
    out[split] = dict(groups=groups, models=per_model)
  return out


def _paired_rows(cols: Columns, a: str, b: str, split: str):
  """Rows of models a and b on their common (fold, case_id), aligned; None if there are none.

  Only the common rows are compared, so that an unfinished fold of one model (e.g. while the
  protocol is still running) narrows the comparison instead of failing it; the rows' counts
  (``n``, ``k``) say what was compared.
  """
  ca, cb = _select(cols, model=a, split=split), _select(cols, model=b, split=split)
  kb = {k: i for i, k in enumerate(zip(cb["fold"], cb["case_id"]))}
  keep = np.array([k in kb for k in zip(ca["fold"], ca["case_id"])], bool)
  if not keep.any():
    return None
  ca = {k: v[keep] for k, v in ca.items()}
  order = np.array([kb[k] for k in zip(ca["fold"], ca["case_id"])])
  return ca, {k: v[order] for k, v in cb.items()}


def default_pairs(models: Sequence[str], baseline: str) -> list[tuple[str, str]]:
  """Each model against the baseline, then "att_rn34_ds" vs "att_rn34_us" (Section IV-E).

  Pairs are (new model, reference), so that t > 0 and z > 0 mean the new model is better.
  """
  pairs = [(m, baseline) for m in models if m != baseline]
  extra = ("att_rn34_ds", "att_rn34_us")
  if all(m in models for m in extra) and baseline not in extra:
    pairs.append(extra)
  return pairs


def comparisons(cols: Columns, pairs: Sequence[tuple[str, str]], threshold: float = 0.5,
                edges: Sequence[float] = metrics.DEFAULT_RATIO_EDGES) -> dict[str, Any]:
  """Paired t-tests over folds (overall and per ratio group) and DeLong tests of the AUC.

  Returns:
    {"ttest": [rows {model_a, model_b, split, group, metric, k, mean_a, mean_b, t, p}],
     "delong": [rows {model_a, model_b, split, fold ("pooled" or int), n, auc_a, auc_b, z, p}]}.
    t > 0 / z > 0 means model_a is larger.
  """
  names = metrics.group_names(edges)
  ttest_rows, delong_rows = [], []
  for a, b in pairs:
    for split in (VAL, TEST):
      paired = _paired_rows(cols, a, b, split)
      if paired is None:
        continue
      ca, cb = paired
      folds = np.unique(ca["fold"])
      groups = metrics.group_of_ratio(ca["ratio"], edges)
      for gname, gsel in [("all", np.ones(groups.shape, bool))] + [
          (names[g], groups == g) for g in (0, 1, 2)]:
        per_a, per_b = [], []
        for f in folds:
          s = gsel & (ca["fold"] == f)
          per_a.append(metrics.binary_metrics(ca["label"][s], ca["prob"][s], threshold))
          per_b.append(metrics.binary_metrics(cb["label"][s], cb["prob"][s], threshold))
        for k in metrics.METRIC_NAMES:
          va, vb = [m[k] for m in per_a], [m[k] for m in per_b]
          t, p = (stats.paired_ttest(va, vb) if len(folds) >= 2
                  else (float("nan"), float("nan")))
          ttest_rows.append(dict(model_a=a, model_b=b, split=split, group=gname, metric=k,
                                 k=len(folds), mean_a=_nan_stats(va)[0],
                                 mean_b=_nan_stats(vb)[0], t=t, p=p))
      units = [("pooled", np.ones(ca["fold"].shape, bool))] if split == VAL else []
      if split == TEST:  # Test cases repeat across fold models: one test per fold model.
        units += [(int(f), ca["fold"] == f) for f in folds]
      for unit, s in units:
        lab = ca["label"][s]
        if lab.size == 0 or lab.min() == lab.max():
          res = stats.DeLongResult(*(float("nan"),) * 4)
        else:
          res = stats.delong_test(lab, ca["prob"][s], cb["prob"][s])
        delong_rows.append(dict(model_a=a, model_b=b, split=split, fold=unit, n=int(lab.size),
                                **res._asdict()))
  return dict(ttest=ttest_rows, delong=delong_rows)


# ---------------------------------------------------------------------- attention quality.

ATTENTION_COLUMNS = ("model", "case_id", "mass_inside", "soft_dice")
ATTENTION_METRICS = ("mass_inside", "soft_dice")


def attention_summary(rows: Sequence[Mapping[str, Any]], models: Sequence[str] | None = None,
                      baseline: str = "rn34_us") -> list[dict[str, Any]]:
  """Per-model summary of the attention numbers (``metrics.attention_quality``) over cases.

  Args:
    rows: one dict per (model, case) with ``ATTENTION_COLUMNS`` (COVID cases with an infection
      mask; NaN values, e.g. an all-zero map, are skipped).
    models: order of the models; None -> order of appearance.
    baseline: the model the others are paired with (by case id).

  Returns:
    One dict per model: ``model``, and for each of mass_inside / soft_dice: ``n``, ``mean``,
    ``std`` (ddof = 1), ``median``, and against the baseline on the cases both have:
    ``n_paired``, ``mean_diff`` (model - baseline), ``frac_higher`` (fraction of cases where the
    model is higher) and a paired t-test over cases ``t``, ``p``.
  """
  for r in rows:
    missing = [k for k in ATTENTION_COLUMNS if k not in r]
    if missing:
      raise ValueError(f"attention row lacks {missing}: {r}")
  if models is None:
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
  values = {m: {} for m in models}
  for r in rows:
    if str(r["model"]) in values:
      key = str(r["case_id"])
      if key in values[str(r["model"])]:
        raise ValueError(f"duplicated attention row ({r['model']}, {key})")
      values[str(r["model"])][key] = r
  out = []
  for m in models:
    entry: dict[str, Any] = dict(model=m)
    for k in ATTENTION_METRICS:
      v = np.array([float(r[k]) for r in values[m].values()], np.float64)
      v = v[np.isfinite(v)]
      mean, std = _nan_stats(v)
      entry[k] = dict(n=int(v.size), mean=mean, std=std,
                      median=float(np.median(v)) if v.size else float("nan"))
      if m != baseline and baseline in values:
        common = [c for c in values[m] if c in values[baseline]
                  and np.isfinite(float(values[m][c][k]))
                  and np.isfinite(float(values[baseline][c][k]))]
        a = np.array([float(values[m][c][k]) for c in common])
        b = np.array([float(values[baseline][c][k]) for c in common])
        t, p = stats.paired_ttest(a, b) if a.size >= 2 else (float("nan"), float("nan"))
        entry[k].update(n_paired=int(a.size),
                        mean_diff=float(np.mean(a - b)) if a.size else float("nan"),
                        frac_higher=float(np.mean(a > b)) if a.size else float("nan"),
                        t=t, p=p)
    out.append(entry)
  return out


# ----------------------------------------------------------------------------- formatting.


def _title(model: str) -> str:
  return MODEL_TITLES.get(model, model)


def _header_markdown(result: dict[str, Any]) -> list[str]:
  lines = [f"# {result['title']}", "", f"**Data: {result['data_note']}**", "",
           f"Threshold {result['threshold']} (COVID positive when P >= threshold); "
           f"validation: predictions of the {result['n_folds'][VAL]} validation folds pooled; "
           f"test: mean ± std (ddof = 1) over the {result['n_folds'][TEST]} fold models.", ""]
  return lines + [f"Cases: validation {result['n_cases'][VAL]}, test {result['n_cases'][TEST]}.",
                  ""]


def _table2_markdown(t2: Mapping[str, Any], models: Sequence[str]) -> list[str]:
  lines = ["## Table II: classification results", ""]
  for split, heading in ((VAL, "Validation (pooled over folds)"),
                         (TEST, "Test (mean ± std over fold models)")):
    present = [m for m in models if split in t2.get(m, {})]
    if not present:
      continue
    lines += [f"### {heading}", ""]
    rows = []
    for m in present:
      e = t2[m][split]
      if split == VAL:
        rows.append([_title(m)] + [fmt(e["pooled"][k]) for k in metrics.METRIC_NAMES])
      else:
        rows.append([_title(m)] + [pm(e["mean"][k], e["std"][k]) for k in metrics.METRIC_NAMES])
    lines += md_table(["Model"] + [METRIC_TITLES[k] for k in metrics.METRIC_NAMES], rows)
  return lines


def _table3_cells(split: str, per_group: Sequence[Mapping[str, Any]], groups, k: str) -> list[str]:
  """One Table III row's cells: metric ``k`` of one model in each ratio group."""
  cells = []
  for g in groups:
    r = next((r for r in per_group if r["group"] == g["group"]), None)
    if r is None:
      cells.append("n/a")
    elif split == VAL:
      cells.append(fmt(r[k]))
    else:
      cells.append(pm(r["mean"][k], r["std"][k]))
  return cells


def _table3_markdown(t3: Mapping[str, Any], models: Sequence[str]) -> list[str]:
  lines = ["## Table III: results per infection-ratio group", ""]
  for split, heading in ((VAL, "Validation (pooled)"),
                         (TEST, "Test (mean ± std over fold models)")):
    if split not in t3:
      continue
    groups = t3[split]["groups"]
    lines += [f"### {heading}", ""]
    rows = [["No. of scans", "COVID"] + [g["n_covid"] for g in groups],
            ["", "CAP"] + [g["n_cap"] for g in groups],
            ["", "Total"] + [g["n_covid"] + g["n_cap"] for g in groups]]
    for k in metrics.METRIC_NAMES:
      for i, m in enumerate(mm for mm in models if mm in t3[split]["models"]):
        cells = _table3_cells(split, t3[split]["models"][m], groups, k)
        rows.append([METRIC_TITLES[k] if i == 0 else "", _title(m)] + cells)
    lines += md_table(["", ""] + [g["name"] for g in groups], rows)
  return lines


def _pair_name(r: Mapping[str, Any]) -> str:
  return f"{_title(r['model_a'])} vs {_title(r['model_b'])}"


def _ttest_markdown(ttest: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = ["## Paired comparisons", "",
           "Paired t-test over the fold models (t > 0: the first model is larger).", ""]
  rows = [[_pair_name(r), r["split"], METRIC_TITLES[r["metric"]], r["k"], fmt(r["mean_a"]),
           fmt(r["mean_b"]), fmt(r["t"], 2), fmt_p(r["p"])]
          for r in ttest if r["group"] == "all"]
  lines += md_table(["Pair", "Split", "Metric", "Folds", "Mean A", "Mean B", "t", "p"], rows)
  # The paper tests the groups for DS vs US only; every pair is in ttests.csv.
  paper_pair = ("att_rn34_ds", "att_rn34_us")
  shown = {(r["model_a"], r["model_b"]) for r in ttest}
  shown = {paper_pair} if paper_pair in shown else shown
  rows = [[_pair_name(r), r["split"], r["group"], METRIC_TITLES[r["metric"]], fmt(r["mean_a"]),
           fmt(r["mean_b"]), fmt_p(r["p"])]
          for r in ttest if r["group"] != "all" and (r["model_a"], r["model_b"]) in shown]
  lines += ["Per infection-ratio group (paired t-test over folds; all pairs in ttests.csv):", ""]
  return lines + md_table(["Pair", "Split", "Group", "Metric", "Mean A", "Mean B", "p"], rows)


def _delong_markdown(delong: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = ["DeLong's test of the AUCs on the same cases (validation pooled; test per fold "
           "model):", ""]
  rows = [[_pair_name(r), r["split"], r["fold"], r["n"], fmt(r["auc_a"]), fmt(r["auc_b"]),
           fmt(r["z"], 2), fmt_p(r["p"])] for r in delong]
  return lines + md_table(["Pair", "Split", "Fold", "N", "AUC A", "AUC B", "z", "p"], rows)


def _attention_markdown(attention: Sequence[Mapping[str, Any]], baseline: str) -> list[str]:
  lines = ["## Attention quality (COVID cases with an infection mask)", "",
           "Mass inside: fraction of the map's mass inside the infection mask. Soft Dice: "
           "2 sum(map mask) / (sum(map) + sum(mask)) with the map scaled to [0, 1] by its "
           f"maximum. Paired over cases with `{_title(baseline)}` (paired t-test).",
           ""]
  rows = []
  for e in attention:
    cells = [_title(e["model"])]
    for k in ATTENTION_METRICS:
      s = e[k]
      cells += [s["n"], pm(s["mean"], s["std"]), fmt(s["median"])]
      cells += ([f"{s['mean_diff']:+.3f}, higher in {100 * s['frac_higher']:.0f} % of "
                 f"{s['n_paired']} cases, p {fmt_p(s['p'])}"]
                if "mean_diff" in s and s["n_paired"] else ["-"])
    rows.append(cells)
  return lines + md_table(["Model", "N", "Mass inside (mean ± std)", "median", "vs baseline",
                           "N", "Soft Dice (mean ± std)", "median", "vs baseline"], rows)


def _markdown(result: dict[str, Any]) -> str:
  """report.md: the header, Tables II and III, the paired tests, attention quality, figures."""
  models, cmp_ = result["models"], result["comparisons"]
  lines = _header_markdown(result)
  lines += _table2_markdown(result["table2"], models)
  lines += _table3_markdown(result["table3"], models)
  if cmp_["ttest"]:
    lines += _ttest_markdown(cmp_["ttest"])
  if cmp_["delong"]:
    lines += _delong_markdown(cmp_["delong"])
  if result.get("attention"):
    lines += _attention_markdown(result["attention"], result["baseline"])
  if result.get("figures"):
    lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                   for p in result["figures"]] + [""]
  lines += ["Model names: " + ", ".join(f"`{m}` = {_title(m)}" for m in models), ""]
  return "\n".join(lines)


def _flat_table2(t2) -> list[dict[str, Any]]:
  rows = []
  for model, e in t2.items():
    if VAL in e:
      rows.append(dict(model=model, split=VAL, stat="pooled", **e[VAL]["pooled"]))
      rows += [dict(model=model, split=VAL, stat=f"fold_{f}", **m)
               for f, m in e[VAL]["per_fold"].items()]
    if TEST in e:
      rows.append(dict(model=model, split=TEST, stat="mean", **e[TEST]["mean"]))
      rows.append(dict(model=model, split=TEST, stat="std", **e[TEST]["std"]))
      rows += [dict(model=model, split=TEST, stat=f"fold_{f}", **m)
               for f, m in e[TEST]["per_fold"].items()]
  return rows


def _flat_table3(t3) -> list[dict[str, Any]]:
  rows = []
  for split, e in t3.items():
    counts = {g["group"]: g for g in e["groups"]}
    for model, groups in e["models"].items():
      for r in groups:
        base = dict(model=model, split=split, group=r["name"],
                    n_covid=counts[r["group"]]["n_covid"], n_cap=counts[r["group"]]["n_cap"])
        if split == VAL:
          rows.append(dict(base, stat="pooled", **{k: r[k] for k in metrics.METRIC_NAMES}))
        else:
          rows.append(dict(base, stat="mean", **r["mean"]))
          rows.append(dict(base, stat="std", **r["std"]))
          rows += [dict(base, stat=f"fold_{f}", **{k: m[k] for k in metrics.METRIC_NAMES})
                   for f, m in r["per_fold"].items()]
  return rows


def _roc_figures(cols: Columns, models: Sequence[str], out_dir: str) -> list[str]:
  paths = []
  for split in (VAL, TEST):
    c = _select(cols, split=split)
    if c["model"].size == 0:
      continue

    def curves(sel):
      out = {}
      for m in models:
        s = sel & (c["model"] == m)
        if np.unique(c["label"][s]).size == 2:
          fpr, tpr, _ = metrics.roc_curve_points(c["label"][s], c["prob"][s])
          out[m] = (fpr, tpr, metrics.auc_score(c["label"][s], c["prob"][s]))
      return out

    by_fold = {int(f): curves(c["fold"] == f) for f in np.unique(c["fold"])}
    pooled = curves(np.ones(c["fold"].shape, bool)) if split == VAL else None
    path = os.path.join(out_dir, f"roc_{split}.png")
    title = ("Validation: each fold and pooled" if split == VAL
             else "Test set: the model of each fold")
    if any(by_fold.values()) or pooled:
      plots.plot_roc({k: v for k, v in by_fold.items() if v}, pooled, path, title=title)
      paths.append(path)
  return paths


def write_report(predictions: Any, out_dir, models: Sequence[str] | None = None,
                 baseline: str = "rn34_us", title: str = "DSAN evaluation",
                 data_note: str = "unspecified data source", threshold: float = 0.5,
                 ratio_edges: Sequence[float] = metrics.DEFAULT_RATIO_EDGES,
                 pairs: Sequence[tuple[str, str]] | None = None,
                 roc_figures: bool = True,
                 attention: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Computes Tables II and III and the paired tests, and writes them to ``out_dir``.

  Files written: ``report.md`` (Markdown tables headed by ``title`` and ``data_note``),
  ``metrics.json`` (the returned dict, NaN as null), ``table2.csv``, ``table3.csv``,
  ``ttests.csv``, ``delong.csv``, ``predictions.csv`` (the input rows) and, with
  ``roc_figures``, ``roc_val.png`` / ``roc_test.png``.

  Args:
    predictions: the prediction table (module docstring).
    out_dir: output folder (created).
    models: models to report, in table order; None -> those of ``DEFAULT_MODELS`` present,
      then any others in order of appearance.
    baseline: the model the others are compared with.
    title: report title.
    data_note: where the data come from, printed in bold under the title (e.g. "synthetic
      phantoms - not clinical data").
    threshold: decision threshold (COVID when prob >= threshold).
    ratio_edges: Table III group edges.
    pairs: (model_a, model_b) comparisons; None -> ``default_pairs(models, baseline)``.
    roc_figures: also draw the ROC curves.
    attention: optional per-(model, case) attention numbers (``ATTENTION_COLUMNS``), summarised
      by ``attention_summary`` into a section of report.md, ``attention.csv`` and the
      ``attention`` entry of metrics.json.

  Returns:
    The metrics dict: title, data_note, threshold, ratio_edges, models, baseline, n_folds,
    n_cases, table2, table3, comparisons, attention (when given), figures, files.
  """
  cols, models = _report_models(as_columns(predictions), models)
  if pairs is None:
    pairs = default_pairs(models, baseline) if baseline in models else []
  os.makedirs(out_dir, exist_ok=True)
  result: dict[str, Any] = dict(
      title=title, data_note=data_note, threshold=threshold, ratio_edges=list(ratio_edges),
      models=list(models), baseline=baseline,
      n_folds={s: int(np.unique(cols["fold"][cols["split"] == s]).size) for s in (VAL, TEST)},
      n_cases={s: int(np.unique(cols["case_id"][cols["split"] == s]).size) for s in (VAL, TEST)},
      table2=table2(cols, models, threshold),
      table3=table3(cols, models, threshold, ratio_edges),
      comparisons=comparisons(cols, pairs, threshold, ratio_edges),
  )
  if attention is not None:
    att_models = [m for m in models if any(str(r["model"]) == m for r in attention)]
    result["attention"] = attention_summary(attention, att_models, baseline)
  result["figures"] = _roc_figures(cols, models, str(out_dir)) if roc_figures else []
  _write_report_files(result, cols, str(out_dir))
  return result


def _report_models(cols: Columns, models: Sequence[str] | None) -> tuple[Columns, list[str]]:
  """The models to report (``write_report``'s rule) and the table's rows of those models."""
  present = list(dict.fromkeys(cols["model"].tolist()))
  if models is None:
    models = [m for m in DEFAULT_MODELS if m in present] + [
        m for m in present if m not in DEFAULT_MODELS]
  unknown = [m for m in models if m not in present]
  if unknown:
    raise ValueError(f"model(s) {unknown} have no predictions; present: {present}")
  return {k: v[np.isin(cols["model"], models)] for k, v in cols.items()}, list(models)


def _write_report_files(result: dict[str, Any], cols: Columns, out_dir: str) -> None:
  """Writes ``write_report``'s files into ``out_dir`` and lists them in ``result["files"]``."""
  out_files = {name: os.path.join(out_dir, name) for name in (
      "report.md", "metrics.json", "table2.csv", "table3.csv", "ttests.csv", "delong.csv",
      "predictions.csv")}
  if "attention" in result:
    out_files["attention.csv"] = os.path.join(out_dir, "attention.csv")
    files.write_csv(out_files["attention.csv"], [
        dict(model=e["model"], metric=k, **e[k]) for e in result["attention"]
        for k in ATTENTION_METRICS])
  result["files"] = sorted(list(out_files.values()) + result["figures"])
  files.write_csv(out_files["table2.csv"], _flat_table2(result["table2"]))
  files.write_csv(out_files["table3.csv"], _flat_table3(result["table3"]))
  files.write_csv(out_files["ttests.csv"], result["comparisons"]["ttest"])
  files.write_csv(out_files["delong.csv"], result["comparisons"]["delong"])
  files.write_csv(out_files["predictions.csv"], _rows_of(cols))
  with open(out_files["report.md"], "w") as f:
    f.write(_markdown(result))
  with open(out_files["metrics.json"], "w") as f:
    json.dump(files.jsonable(result), f, indent=1, allow_nan=False)
