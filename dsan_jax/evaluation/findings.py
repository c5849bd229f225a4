"""The paper's three findings, measured on a prediction table, each with a verdict.

The findings (Ouyang et al., Section IV-D/E), as effects of one model against another:

  (a) "Attention RN34 + US" has a higher AUC than "RN34 + US".
  (b) Size-balanced sampling ("Attention RN34 + SS") raises, against "Attention RN34 + US", the
      sensitivity of the small-infection group (r < 0.005, COVID-19 cases) and the specificity
      of the large-infection group (r > 0.030, CAP cases).
  (c) The dual-sampling ensemble ("Attention RN34 + DS") keeps what uniform sampling does well
      (sensitivity of the large group, specificity of the small group: not worse than US) and
      improves the two weak spots of (b) against "Attention RN34 + US".

Each effect is measured three ways on the same table (``report.COLUMNS``):

  * paired t-test over the folds (the paper's test): the metric of each fold's validation part;
  * a per-case test on the validation predictions pooled over the folds: DeLong for the AUC,
    McNemar's exact test for a rate (accuracy; sensitivity on the group's COVID-19 cases;
    specificity on its CAP cases);
  * the same per-case test on the independent test split, where each case's probability is the
    mean over the fold models (one prediction per case, so the cases are independent).

The verdict of one effect (fixed before any protocol result was seen, docs/results.md):

  * "reproduces": the pooled-validation effect has the paper's sign with per-case p < 0.05, and
    the test split's effect has the same sign;
  * "does not reproduce": the effect has the opposite sign with p < 0.05 on the pooled validation
    or on the test split, or the opposite sign on both;
  * "inconclusive": anything else (too few cases of a group is the usual reason).

For "not worse" effects (the preserved strengths of (c)), "reproduces" means not significantly
worse (no opposite-sign p < 0.05) on both, and "does not reproduce" means significantly worse on
either. A finding with several effects reproduces when all of them do, does not reproduce when
any does not, and is inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from dsan_jax.evaluation import metrics
from dsan_jax.evaluation import report
from dsan_jax.evaluation import stats
from dsan_jax.evaluation import text

ALPHA = 0.05
REPRODUCES, NOT_REPRODUCED, INCONCLUSIVE = "reproduces", "does not reproduce", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Effect:
  """One directional claim: ``model_a`` vs ``model_b`` on ``metric`` within ``group``.

  Attributes:
    group: Table III group index (0: r < low edge, 1: middle, 2: r > high edge) or None (all).
    kind: "better" (the paper's sign is a > b) or "not_worse" (a is not below b).
  """
  finding: str
  name: str
  model_a: str
  model_b: str
  metric: str
  group: int | None
  kind: str = "better"


FINDINGS: dict[str, str] = {
    "a": "Attention RN34 + US beats RN34 + US in AUC",
    "b": ("SS raises the sensitivity of small-infection COVID-19 and the specificity of "
          "large-infection CAP, compared with US"),
    "c": "DS keeps the strengths of US and improves its two weak spots",
}

EFFECTS: tuple[Effect, ...] = (
    Effect("a", "AUC, all cases", "att_rn34_us", "rn34_us", "auc", None),
    Effect("b", "sensitivity, small infection", "att_rn34_ss", "att_rn34_us", "sensitivity", 0),
    Effect("b", "specificity, large infection", "att_rn34_ss", "att_rn34_us", "specificity", 2),
    Effect("c", "sensitivity, small infection", "att_rn34_ds", "att_rn34_us", "sensitivity", 0),
    Effect("c", "specificity, large infection", "att_rn34_ds", "att_rn34_us", "specificity", 2),
    Effect("c", "sensitivity, large infection (kept)", "att_rn34_ds", "att_rn34_us",
           "sensitivity", 2, "not_worse"),
    Effect("c", "specificity, small infection (kept)", "att_rn34_ds", "att_rn34_us",
           "specificity", 0, "not_worse"),
)


def _per_case_test(metric: str, labels: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray,
                   threshold: float) -> tuple[float, float, float, int]:
  """(value_a, value_b, two-sided p, cases used) of one metric on aligned cases."""
  if metric == "auc":
    if labels.size == 0 or labels.min() == labels.max():
      return float("nan"), float("nan"), float("nan"), int(labels.size)
    r = stats.delong_test(labels, prob_a, prob_b)
    return r.auc_a, r.auc_b, r.p, int(labels.size)
  use = {"sensitivity": labels == 1, "specificity": labels == 0,
         "accuracy": np.ones(labels.shape, bool)}[metric]
  if not use.any():
    return float("nan"), float("nan"), float("nan"), 0
  ca = (prob_a[use] >= threshold) == (labels[use] == 1)
  cb = (prob_b[use] >= threshold) == (labels[use] == 1)
  return float(ca.mean()), float(cb.mean()), stats.mcnemar_test(ca, cb).p, int(use.sum())


def _aligned(cols: report.Columns, a: str, b: str, split: str, group: int | None, edges):
  paired = report._paired_rows(cols, a, b, split)  # pylint: disable=protected-access
  if paired is None:
    return None
  ca, cb = paired
  if group is not None:
    keep = metrics.group_of_ratio(ca["ratio"], edges) == group
    ca, cb = ({k: v[keep] for k, v in c.items()} for c in (ca, cb))
  return ca, cb


def _fold_mean(c: report.Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Test rows of several fold models -> (case ids, labels, mean prob) per case."""
  ids, inv = np.unique(c["case_id"], return_inverse=True)
  prob = np.bincount(inv, weights=c["prob"]) / np.bincount(inv)
  labels = np.zeros(ids.size, np.int64)
  labels[inv] = c["label"]
  return ids, labels, prob


def measure_effect(cols: report.Columns, effect: Effect, threshold: float = 0.5,
                   edges: Sequence[float] = metrics.DEFAULT_RATIO_EDGES) -> dict[str, Any]:
  """Measures one effect (module docstring) on a prediction table.

  Returns:
    {finding, name, model_a, model_b, metric, group, kind, val_a, val_b, val_n, val_p (per case,
     pooled validation), ttest_t, ttest_p, folds (paired t over folds), test_a, test_b,
     test_n, test_p (per case, fold-mean probabilities), verdict}.
  """
  out: dict[str, Any] = dict(dataclasses.asdict(effect))
  nan = float("nan")
  out.update(val_a=nan, val_b=nan, val_n=0, val_p=nan, ttest_t=nan, ttest_p=nan, folds=0,
             test_a=nan, test_b=nan, test_n=0, test_p=nan)
  val = _aligned(cols, effect.model_a, effect.model_b, report.VAL, effect.group, edges)
  if val is not None:
    ca, cb = val
    out["val_a"], out["val_b"], out["val_p"], out["val_n"] = _per_case_test(
        effect.metric, ca["label"], ca["prob"], cb["prob"], threshold)
    folds = np.unique(ca["fold"])
    per = [[metrics.binary_metrics(c["label"][c["fold"] == f], c["prob"][c["fold"] == f],
                                   threshold)[effect.metric] for f in folds] for c in (ca, cb)]
    ok = np.isfinite(per[0]) & np.isfinite(per[1])
    if ok.sum() >= 2:
      t = stats.paired_ttest(np.asarray(per[0])[ok], np.asarray(per[1])[ok])
      out.update(ttest_t=t.t, ttest_p=t.p, folds=int(ok.sum()))
  test = _aligned(cols, effect.model_a, effect.model_b, report.TEST, effect.group, edges)
  if test is not None:
    ids_a, labels, pa = _fold_mean(test[0])
    ids_b, _, pb = _fold_mean(test[1])
    assert np.array_equal(ids_a, ids_b)
    out["test_a"], out["test_b"], out["test_p"], out["test_n"] = _per_case_test(
        effect.metric, labels, pa, pb, threshold)
  out["verdict"] = verdict(out["val_a"] - out["val_b"], out["val_p"],
                           out["test_a"] - out["test_b"], out["test_p"], effect.kind)
  return out


def verdict(val_effect: float, val_p: float, test_effect: float, test_p: float,
            kind: str = "better") -> str:
  """The verdict rule of the module docstring; effects are a - b (NaN = not measurable)."""
  def against(e, p):  # Significantly opposite to the paper.
    return np.isfinite(e) and np.isfinite(p) and e < 0 and p < ALPHA

  if against(val_effect, val_p) or against(test_effect, test_p):
    return NOT_REPRODUCED
  if kind == "not_worse":
    measured = np.isfinite(val_effect) and np.isfinite(test_effect)
    return REPRODUCES if measured else INCONCLUSIVE
  if (np.isfinite(val_effect) and np.isfinite(test_effect) and val_effect < 0
      and test_effect < 0):
    return NOT_REPRODUCED
  if (np.isfinite(val_effect) and val_effect > 0 and np.isfinite(val_p) and val_p < ALPHA
      and np.isfinite(test_effect) and test_effect > 0):
    return REPRODUCES
  return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
  """A finding's verdict from its effects' verdicts (module docstring)."""
  if any(v == NOT_REPRODUCED for v in verdicts):
    return NOT_REPRODUCED
  if verdicts and all(v == REPRODUCES for v in verdicts):
    return REPRODUCES
  return INCONCLUSIVE


def paper_findings(predictions: Any, threshold: float = 0.5,
                   edges: Sequence[float] = metrics.DEFAULT_RATIO_EDGES) -> dict[str, Any]:
  """Measures the three findings on a prediction table with the four models' rows.

  Args:
    predictions: the prediction table (``report`` module docstring), with the ensemble rows
      ("att_rn34_ds") already added. Effects whose models are absent are skipped.
    threshold: decision threshold (COVID when prob >= threshold).
    edges: Table III group edges (small: r < edges[0]; large: r > edges[1]).

  Returns:
    {"effects": [measure_effect rows], "findings": [{finding, claim, verdict}]}.
  """
  cols = report.as_columns(predictions)
  present = set(cols["model"].tolist())
  rows = [measure_effect(cols, e, threshold, edges) for e in EFFECTS
          if {e.model_a, e.model_b} <= present]
  found = []
  for key, claim in FINDINGS.items():
    mine = [r["verdict"] for r in rows if r["finding"] == key]
    if mine:
      found.append(dict(finding=key, claim=claim, verdict=combine(mine)))
  return dict(effects=rows, findings=found)


def markdown(result: dict[str, Any], edges: Sequence[float] = metrics.DEFAULT_RATIO_EDGES) -> str:
  """The findings section of report.md."""
  names = metrics.group_names(edges)
  lines = ["## The paper's findings", "",
           "Per effect: pooled validation (per-case test: DeLong for AUC, McNemar for rates), "
           "paired t-test over the folds, and the test split (fold-mean probability per case, "
           "per-case test). Verdict rule: dsan_jax/evaluation/findings.py.", "",
           "| Finding | Effect | A vs B | Group | Val A | Val B | n | p (case) | p (t, folds) "
           "| Test A | Test B | n | p (case) | Verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  f3, fp = text.fmt, text.fmt_p
  for r in result["effects"]:
    group = "all" if r["group"] is None else names[r["group"]]
    lines.append(
        f"| ({r['finding']}) | {r['name']} | {report.MODEL_TITLES.get(r['model_a'], r['model_a'])}"
        f" vs {report.MODEL_TITLES.get(r['model_b'], r['model_b'])} | {group} | {f3(r['val_a'])}"
        f" | {f3(r['val_b'])} | {r['val_n']} | {fp(r['val_p'])} | {fp(r['ttest_p'])} | "
        f"{f3(r['test_a'])} | {f3(r['test_b'])} | {r['test_n']} | {fp(r['test_p'])} | "
        f"{r['verdict']} |")
  lines += ["", "| Finding | Claim | Verdict |", "|---|---|---|"]
  lines += [f"| ({f['finding']}) | {f['claim']} | **{f['verdict']}** |"
            for f in result["findings"]]
  return "\n".join(lines) + "\n"
