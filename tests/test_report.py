"""Tests of dsan_jax.evaluation.report: tables, paired tests and files from a small prediction table."""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats as sp_stats
from sklearn import metrics as skm

from configs import default
from dsan_jax.evaluation import ensemble
from dsan_jax.evaluation import report
from dsan_jax.evaluation import stats

PAPER = ensemble.config_weights(default.get_config().ensemble)

MODELS = ("rn34_us", "att_rn34_us", "att_rn34_ss")


def _table(seed=0, n_val=30, n_test=16, folds=3):
  """Random predictions of three models; val case i is in fold i % folds."""
  rng = np.random.default_rng(seed)
  val_ids = [f"v{i}" for i in range(n_val)]
  test_ids = [f"t{i}" for i in range(n_test)]
  labels = {c: int(i % 2) for i, c in enumerate(val_ids + test_ids)}
  ratio_choices = [0.0005, 0.002, 0.005, 0.01, 0.03, 0.031, 0.2]
  ratios = {c: ratio_choices[i % len(ratio_choices)] for i, c in enumerate(val_ids + test_ids)}
  rows = []
  for k, model in enumerate(MODELS):
    for i, c in enumerate(val_ids):
      p = np.clip(0.3 * labels[c] + 0.7 * rng.random() + 0.02 * k, 0, 1)
      rows.append(dict(model=model, fold=i % folds, split="val", case_id=c, label=labels[c],
                       ratio=ratios[c], prob=float(p)))
    for f in range(folds):
      for c in test_ids:
        p = np.clip(0.3 * labels[c] + 0.7 * rng.random() + 0.02 * k, 0, 1)
        rows.append(dict(model=model, fold=f, split="test", case_id=c, label=labels[c],
                         ratio=ratios[c], prob=float(p)))
  return rows


def _arrays(rows, model, split, fold=None):
  sel = [r for r in rows if r["model"] == model and r["split"] == split
         and (fold is None or r["fold"] == fold)]
  return (np.array([r["label"] for r in sel]), np.array([r["prob"] for r in sel]),
          np.array([r["ratio"] for r in sel]), [r["case_id"] for r in sel])


def _sk(labels, probs):
  pred = probs >= 0.5
  return dict(auc=skm.roc_auc_score(labels, probs), accuracy=skm.accuracy_score(labels, pred),
              sensitivity=skm.recall_score(labels, pred),
              specificity=skm.recall_score(labels, pred, pos_label=0),
              f1=skm.f1_score(labels, pred))


def test_as_columns_accepts_three_layouts():
  rows = _table()
  a = report.as_columns(rows)
  b = report.as_columns({k: [r[k] for r in rows] for k in report.COLUMNS})
  struct = np.array([tuple(r[k] for k in report.COLUMNS) for r in rows],
                    dtype=[("model", "U20"), ("fold", "i8"), ("split", "U5"), ("case_id", "U10"),
                           ("label", "i8"), ("ratio", "f8"), ("prob", "f8")])
  c = report.as_columns(struct)
  for k in report.COLUMNS:
    np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a[k], c[k])
  assert a["fold"].dtype == np.int64 and a["prob"].dtype == np.float64


@pytest.mark.parametrize("mutate,msg", [
    (lambda rows: rows.append(dict(rows[0])), "duplicated"),
    (lambda rows: rows[0].update(label=1 - rows[0]["label"]), "different labels"),
    (lambda rows: rows[0].update(split="train"), "split"),
    (lambda rows: rows[0].update(prob=1.5), "prob"),
    (lambda rows: [r.pop("ratio") for r in rows], "ratio"),
])
def test_as_columns_rejects_bad_tables(mutate, msg):
  rows = _table()
  mutate(rows)
  with pytest.raises(ValueError, match=msg):
    report.as_columns(rows)


def test_add_ensemble_equals_combine():
  rows = _table()
  shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
  cols = report.add_ensemble(shuffled, **dict(PAPER, w_extreme=0.3, w_middle=0.9))
  ds = report._select(cols, model="att_rn34_ds")
  for i in range(ds["model"].size):
    key = (ds["fold"][i], ds["split"][i], ds["case_id"][i])
    us = next(r for r in rows if r["model"] == "att_rn34_us"
              and (r["fold"], r["split"], r["case_id"]) == key)
    ss = next(r for r in rows if r["model"] == "att_rn34_ss"
              and (r["fold"], r["split"], r["case_id"]) == key)
    ref = ensemble.combine([us["prob"]], [ss["prob"]], [us["ratio"]], 0.3, 0.9,
                           PAPER["low"], PAPER["high"])[0]
    assert ds["prob"][i] == ref
  assert ds["model"].size == sum(r["model"] == "att_rn34_us" for r in rows)
  with pytest.raises(ValueError, match="same"):
    report.add_ensemble([r for r in rows if not (r["model"] == "att_rn34_ss"
                                                 and r["case_id"] == "v3")], **PAPER)


def test_table2_equals_sklearn_pooled_and_mean_std():
  rows = _table()
  t2 = report.table2(report.as_columns(rows), MODELS)
  for model in MODELS:
    labels, probs, _, _ = _arrays(rows, model, "val")
    ref = _sk(labels, probs)
    for k, v in ref.items():
      np.testing.assert_allclose(t2[model]["val"]["pooled"][k], v, atol=1e-12)
    per_fold = [_sk(*_arrays(rows, model, "test", f)[:2]) for f in range(3)]
    for k in ref:
      vals = [m[k] for m in per_fold]
      np.testing.assert_allclose(t2[model]["test"]["mean"][k], np.mean(vals), atol=1e-12)
      np.testing.assert_allclose(t2[model]["test"]["std"][k], np.std(vals, ddof=1), atol=1e-12)
    assert t2[model]["val"]["pooled"]["n"] == 30
    assert sorted(t2[model]["test"]["per_fold"]) == [0, 1, 2]


def test_table3_counts_and_values():
  rows = _table()
  t3 = report.table3(report.as_columns(rows), MODELS)
  # Val case i: label i % 2, ratio choices[i % 7]; groups: {0.0005, 0.002} -> 0,
  # {0.005, 0.01, 0.03} -> 1, {0.031, 0.2} -> 2.
  expected = {0: [0, 0], 1: [0, 0], 2: [0, 0]}
  for i in range(30):
    g = [0, 0, 1, 1, 1, 2, 2][i % 7]
    expected[g][1 - i % 2] += 1  # [n_covid, n_cap]
  got = {g["group"]: [g["n_covid"], g["n_cap"]] for g in t3["val"]["groups"]}
  assert got == expected
  assert sum(sum(v) for v in got.values()) == 30
  assert sum(g["n_covid"] + g["n_cap"] for g in t3["test"]["groups"]) == 16
  labels, probs, ratios, _ = _arrays(rows, "att_rn34_us", "val")
  sel = ratios > 0.030
  row = next(r for r in t3["val"]["models"]["att_rn34_us"] if r["group"] == 2)
  for k, v in _sk(labels[sel], probs[sel]).items():
    np.testing.assert_allclose(row[k], v, atol=1e-12)
  vals = []
  for f in range(3):
    labels, probs, ratios, _ = _arrays(rows, "rn34_us", "test", f)
    sel = ratios < 0.005
    vals.append(skm.accuracy_score(labels[sel], probs[sel] >= 0.5))
  row = next(r for r in t3["test"]["models"]["rn34_us"] if r["group"] == 0)
  np.testing.assert_allclose(row["mean"]["accuracy"], np.mean(vals), atol=1e-12)
  np.testing.assert_allclose(row["std"]["accuracy"], np.std(vals, ddof=1), atol=1e-12)


def test_comparisons_equal_scipy_and_delong():
  rows = _table()
  cmp_ = report.comparisons(report.as_columns(rows), [("att_rn34_us", "rn34_us")])
  a = [skm.roc_auc_score(*_arrays(rows, "att_rn34_us", "test", f)[:2]) for f in range(3)]
  b = [skm.roc_auc_score(*_arrays(rows, "rn34_us", "test", f)[:2]) for f in range(3)]
  ref = sp_stats.ttest_rel(a, b)
  row = next(r for r in cmp_["ttest"] if r["split"] == "test" and r["metric"] == "auc"
             and r["group"] == "all")
  np.testing.assert_allclose([row["t"], row["p"]], [ref.statistic, ref.pvalue], rtol=1e-10)
  assert row["k"] == 3
  la, pa, _, ida = _arrays(rows, "att_rn34_us", "val")
  lb, pb, _, idb = _arrays(rows, "rn34_us", "val")
  assert ida == idb  # Same order by construction, so the arrays are paired.
  ref = stats.delong_test(la, pa, pb)
  row = next(r for r in cmp_["delong"] if r["split"] == "val")
  assert row["fold"] == "pooled" and row["n"] == 30
  np.testing.assert_allclose([row["auc_a"], row["auc_b"], row["z"], row["p"]], list(ref),
                             rtol=1e-12)
  np.testing.assert_allclose(row["auc_a"], skm.roc_auc_score(la, pa), atol=1e-12)
  assert sum(r["split"] == "test" for r in cmp_["delong"]) == 3
  # 2 splits x 4 groups (all + 3) x 5 metrics.
  assert len(cmp_["ttest"]) == 40


def test_default_pairs():
  models = ["rn34_us", "att_rn34_us", "att_rn34_ss", "att_rn34_ds"]
  assert report.default_pairs(models, "rn34_us") == [
      ("att_rn34_us", "rn34_us"), ("att_rn34_ss", "rn34_us"), ("att_rn34_ds", "rn34_us"),
      ("att_rn34_ds", "att_rn34_us")]


def test_write_report_files(tmp_path):
  rows = _table()
  cols = report.add_ensemble(rows, **PAPER)
  note = "synthetic phantoms - not clinical data"
  res = report.write_report(cols, tmp_path, title="Unit test", data_note=note)
  names = sorted(os.listdir(tmp_path))
  assert names == sorted(["report.md", "metrics.json", "table2.csv", "table3.csv", "ttests.csv",
                          "delong.csv", "predictions.csv", "roc_val.png", "roc_test.png"])
  with open(tmp_path / "metrics.json") as f:
    js = json.load(f, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
  assert js["models"] == ["rn34_us", "att_rn34_us", "att_rn34_ss", "att_rn34_ds"]
  assert js["n_folds"] == {"val": 3, "test": 3} and js["n_cases"] == {"val": 30, "test": 16}
  np.testing.assert_allclose(js["table2"]["att_rn34_ds"]["val"]["pooled"]["auc"],
                             res["table2"]["att_rn34_ds"]["val"]["pooled"]["auc"])
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# Unit test") and note in md
  auc = res["table2"]["rn34_us"]["val"]["pooled"]["auc"]
  assert f"| RN34 + US | {auc:.3f} |" in md
  m, s = (res["table2"]["att_rn34_ds"]["test"][k]["f1"] for k in ("mean", "std"))
  assert f"{m:.3f} ± {s:.3f}" in md
  for heading in ("Table II", "Table III", "Paired comparisons", "DeLong"):
    assert heading in md
  with open(tmp_path / "table2.csv") as f:
    t2 = list(csv.DictReader(f))
  # Per model: val pooled + 3 val folds + test mean + std + 3 test folds.
  assert len(t2) == 4 * 9
  r = next(r for r in t2 if r["model"] == "rn34_us" and r["stat"] == "pooled")
  np.testing.assert_allclose(float(r["auc"]), auc)
  with open(tmp_path / "predictions.csv") as f:
    assert sum(1 for _ in csv.DictReader(f)) == len(rows) + len(rows) // 3
  with pytest.raises(ValueError, match="no predictions"):
    report.write_report(rows, tmp_path / "x", models=["rn34_us", "nope"])


def test_write_report_validation_only_and_one_class_group(tmp_path):
  rows = [r for r in _table() if r["split"] == "val"]
  for r in rows:  # Every CAP case gets a tiny ratio: groups 1 and 2 hold COVID cases only.
    if r["label"] == 0:
      r["ratio"] = 0.0001
  rows[0]["ratio"] = float("nan")
  res = report.write_report(rows, tmp_path, data_note="test", roc_figures=False)
  assert "test" not in res["table3"]
  groups = res["table3"]["val"]["groups"]
  assert [g["name"] for g in groups][-1] == "unknown"
  g2 = next(r for r in res["table3"]["val"]["models"]["rn34_us"] if r["group"] == 2)
  assert g2["n_cap"] == 0 and np.isnan(g2["auc"]) and np.isnan(g2["specificity"])
  md = (tmp_path / "report.md").read_text()
  assert "n/a" in md
  assert not (tmp_path / "roc_val.png").exists()
  json.loads((tmp_path / "metrics.json").read_text())


def _attention_rows():
  rows = []
  base = {"c0": 0.2, "c1": 0.4, "c2": 0.1, "c3": float("nan")}
  for case, v in base.items():
    rows.append(dict(model="rn34_us", case_id=case, mass_inside=v, soft_dice=v / 2))
    rows.append(dict(model="att_rn34_us", case_id=case, mass_inside=v + 0.3 if case != "c2"
                     else 0.05, soft_dice=v))
  rows.append(dict(model="att_rn34_us", case_id="c4", mass_inside=0.9, soft_dice=0.8))
  return rows


def test_attention_summary_hand_values():
  res = report.attention_summary(_attention_rows(), baseline="rn34_us")
  assert [e["model"] for e in res] == ["rn34_us", "att_rn34_us"]
  b = res[0]["mass_inside"]
  assert b["n"] == 3 and b["median"] == 0.2
  np.testing.assert_allclose([b["mean"], b["std"]], [0.7 / 3, np.std([0.2, 0.4, 0.1], ddof=1)])
  assert "mean_diff" not in b
  a = res[1]["mass_inside"]
  assert a["n"] == 4 and a["n_paired"] == 3  # c3 is NaN for both, c4 lacks a baseline value.
  np.testing.assert_allclose(a["mean_diff"], (0.3 + 0.3 - 0.05) / 3)
  np.testing.assert_allclose(a["frac_higher"], 2 / 3)
  ref = sp_stats.ttest_rel([0.5, 0.7, 0.05], [0.2, 0.4, 0.1])
  np.testing.assert_allclose([a["t"], a["p"]], [ref.statistic, ref.pvalue], rtol=1e-10)
  with pytest.raises(ValueError, match="duplicated"):
    report.attention_summary(_attention_rows() + [_attention_rows()[0]])


def test_write_report_with_attention(tmp_path):
  res = report.write_report(_table(), tmp_path, data_note="test", roc_figures=False,
                            attention=_attention_rows())
  assert [e["model"] for e in res["attention"]] == ["rn34_us", "att_rn34_us"]
  md = (tmp_path / "report.md").read_text()
  assert "Attention quality" in md and "| Attention RN34 + US | 4 |" in md
  with open(tmp_path / "attention.csv") as f:
    assert len(list(csv.DictReader(f))) == 4
  js = json.loads((tmp_path / "metrics.json").read_text())
  assert js["attention"][1]["soft_dice"]["n_paired"] == 3


def test_comparisons_use_common_cases_only():
  rows = _table()
  partial = [r for r in rows if not (r["model"] == "rn34_us" and r["fold"] == 2)]
  cmp_ = report.comparisons(report.as_columns(partial), [("att_rn34_us", "rn34_us")])
  row = next(r for r in cmp_["delong"] if r["split"] == "val")
  assert row["n"] == 20  # Val folds 0 and 1 only.
  assert all(r["k"] == 2 for r in cmp_["ttest"])
  assert sorted(r["fold"] for r in cmp_["delong"] if r["split"] == "test") == [0, 1]
  sel = [r for r in rows if r["split"] == "val" and r["fold"] < 2]
  la, pa, _, _ = _arrays(sel, "att_rn34_us", "val")
  _, pb, _, _ = _arrays(sel, "rn34_us", "val")
  np.testing.assert_allclose(row["z"], stats.delong_test(la, pa, pb).z, rtol=1e-12)
