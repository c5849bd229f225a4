"""Evaluation of a work directory (dsan_jax.evaluation.evaluate)."""

import json
import pathlib
import types

import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from configs import default
from dsan_jax.evaluation import evaluate
from dsan_jax.training import run_folder
from dsan_jax.errors import ConfigError, DsanError
from tests.test_end_to_end import (MODELS, METRICS, VARIANTS, in_unit_or_none,  # noqa: F401
                                   read_csv, smoke_manifest, trained_workdir)


# -------------------------------------------------------------------------- fast, no model.


def _fake_run(root: pathlib.Path, variant: str, fold: int, best: bool = True):
  rd = root / variant / f"fold_{fold}"
  (rd / "checkpoints" / ("best" if best else "latest") / "7").mkdir(parents=True)
  (rd / "config.json").write_text("{}")
  return rd


def test_find_runs_needs_a_config_and_a_best_checkpoint(tmp_path):
  _fake_run(tmp_path, "att_rn34_ss", 1)
  _fake_run(tmp_path, "rn34_us", 2)
  _fake_run(tmp_path, "rn34_us", 0)
  _fake_run(tmp_path, "att_rn34_us", 0, best=False)  # Interrupted before a best epoch.
  (tmp_path / "rn34_us" / "fold_x").mkdir()
  (tmp_path / "evaluation" / "fold_0").mkdir(parents=True)
  runs = run_folder.find_runs(tmp_path)
  assert [(r.variant, r.fold) for r in runs] == [("rn34_us", 0), ("rn34_us", 2),
                                                 ("att_rn34_ss", 1)]
  assert run_folder.find_runs(tmp_path / "nothing") == []
  with pytest.raises(DsanError, match="no trained runs"):
    evaluate.evaluate_workdir(tmp_path / "nothing", progress=False)


def test_settings_overrides_only_eval_and_ensemble():
  base = ml_collections.ConfigDict(dict(eval=dict(threshold=0.5, batch_size=4),
                                        ensemble=dict(w_extreme=0.35, w_middle=0.96)))
  s = evaluate._settings(base, {"eval": {"threshold": 0.6}, "ensemble": {"w_middle": 0.9}})
  assert (s.eval.threshold, s.eval.batch_size, s.ensemble.w_middle) == (0.6, 4, 0.9)
  assert base.eval.threshold == 0.5  # Not modified in place.
  with pytest.raises(ConfigError, match="model"):
    evaluate._settings(base, {"model": {"width": 8}})


def test_evaluators_come_from_the_config():
  listed = tuple(default.get_config().eval.evaluators)
  assert listed == tuple(evaluate.EVALUATORS)  # The default runs every evaluator.
  assert evaluate._evaluator_names(ml_collections.ConfigDict({})) == listed  # Older runs.
  assert evaluate._evaluator_names(
      ml_collections.ConfigDict(dict(evaluators=("predictions", "ensemble")))) == (
          "predictions", "ensemble")
  with pytest.raises(ConfigError, match="unknown"):
    evaluate._evaluator_names(ml_collections.ConfigDict(dict(evaluators=("predictions", "x"))))
  with pytest.raises(ConfigError, match="start with 'predictions'"):
    evaluate._evaluator_names(ml_collections.ConfigDict(dict(evaluators=("ensemble",))))


def _rows(model, probs, labels, ratios, split="val", fold=0):
  return [dict(model=model, fold=fold, split=split, case_id=f"c{i}", label=l, ratio=r, prob=p)
          for i, (p, l, r) in enumerate(zip(probs, labels, ratios))]


def test_ensemble_rows_follow_eq5_with_the_paper_weights():
  rng = np.random.default_rng(0)
  n = 40
  labels = rng.integers(0, 2, n)
  ratios = rng.choice([0.0005, 0.001, 0.01, 0.03, 0.2, np.nan], n)
  p_us, p_ss = rng.uniform(size=n), rng.uniform(size=n)
  rows = _rows("att_rn34_us", p_us, labels, ratios) + _rows("att_rn34_ss", p_ss, labels, ratios)
  rows += _rows("att_rn34_us", [0.3], [1], [0.5], fold=1)  # No SS partner: left out.
  ens = ml_collections.ConfigDict(dict(w_extreme=0.35, w_middle=0.96, low_ratio=0.001,
                                       high_ratio=0.030, search_grid_step=0.05,
                                       search_objective="accuracy"))
  out, info = evaluate._ensemble(rows, ens, 0.5, search=False)
  ds = sorted((r for r in out if r["model"] == "att_rn34_ds"), key=lambda r: int(r["case_id"][1:]))
  assert len(ds) == n and info["n_missing"] == 1 and info["available"]
  # Eq. 5 by hand; both edges (0.001, 0.030) and unknown ratios take w_middle.
  w = np.where((ratios < 0.001) | (ratios > 0.030), 0.35, 0.96)
  np.testing.assert_allclose([r["prob"] for r in ds], w * p_us + (1 - w) * p_ss, atol=1e-12)
  # Searched weights: on the grid, and their accuracy is the best one on that grid.
  _, info = evaluate._ensemble(rows, ens, 0.5, search=True)
  grid = np.round(np.arange(0, 1.0001, 0.05), 10)
  assert info["w_extreme"] in grid and info["w_middle"] in grid

  def acc(we, wm):
    ww = np.where((ratios < 0.001) | (ratios > 0.030), we, wm)
    return np.mean(((ww * p_us + (1 - ww) * p_ss) >= 0.5) == labels)

  best = max(acc(a, b) for a in grid for b in grid)
  assert info["search"]["score"] == pytest.approx(best)
  assert acc(info["w_extreme"], info["w_middle"]) == pytest.approx(best)


def test_figure_cases_are_small_and_large_covid_and_a_cap():
  cases = types.SimpleNamespace(
      case_ids=[f"c{i}" for i in range(7)],
      labels=np.array([1, 1, 1, 0, 0, 0, 1]),
      ratios=np.array([0.002, 0.3, 0.0, 0.01, 0.001, 0.05, 0.9], np.float32),
      has_masks=[True] * 7)
  data = types.SimpleNamespace(dataset=cases, folds=np.array([0, 0, 0, 0, 0, 0, 1]))
  chosen = evaluate.choose_figure_cases(data, [0])
  # Smallest positive COVID ratio (not the 0.0 one), largest COVID of fold 0 (not fold 1's),
  # the median CAP.
  assert [i for i, _ in chosen] == [0, 1, 3]
  assert [i for i, _ in evaluate.choose_figure_cases(data, [0, 1], ["c6", "zz"])] == [6]
  # Cases whose infection vanished on the network's grid are passed over.
  chosen = evaluate.choose_figure_cases(data, [0], visible=lambda i: i != 0)
  assert [i for i, _ in chosen] == [1, 3]


# ----------------------------------------------------------------- on a trained workdir.


@pytest.fixture(scope="module")
def evaluated(trained_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("evaluation") / "ev"
  result = evaluate.evaluate_workdir(trained_workdir, search_ensemble=True, progress=False,
                                     out_dir=out)
  return result, out


@pytest.mark.slow
def test_outputs_and_keys(evaluated):
  result, out = evaluated
  on_disk = json.loads((out / "metrics.json").read_text())
  assert on_disk["out_dir"] == str(out)
  for key in ("title", "data_note", "threshold", "ratio_edges", "models", "table2", "table3",
              "comparisons", "attention", "figures", "files", "evaluation"):
    assert key in on_disk, key
  # The networks, then the calibration rows (dsan_jax/evaluation/reference.py), never compared in tests.
  assert on_disk["models"] == list(MODELS) + ["size_only", "density_features"]
  assert {c["model_a"] for c in on_disk["comparisons"]["delong"]} <= set(MODELS)
  assert [f["finding"] for f in on_disk["findings"]["findings"]] == ["a", "b", "c"]
  assert "## The paper's findings" in (out / "report.md").read_text()
  assert "NOT clinical" in on_disk["data_note"]
  # Synthetic phantoms all have infection masks: no ratio is estimated.
  assert "infection ratios: " in on_disk["data_note"]
  assert " 0 ESTIMATED from the CT (0 COVID, 0 CAP)" in on_disk["data_note"]
  for f in on_disk["files"]:
    assert (out / f).is_file(), f
  assert {"report.md", "table2.csv", "table3.csv", "predictions.csv", "attention_cases.csv",
          "ensemble.json", "roc_val.png", "findings.csv"} <= set(on_disk["files"])
  assert not list(out.parent.glob(".ev.tmp-*"))  # The temporary folder was renamed.
  for model in MODELS:
    t2 = on_disk["table2"][model]
    assert all(in_unit_or_none(t2["val"]["pooled"][k]) for k in METRICS)
    assert all(in_unit_or_none(t2["test"]["mean"][k]) for k in METRICS)


@pytest.mark.slow
def test_table2_equals_sklearn_on_the_predictions(evaluated):
  result, out = evaluated
  rows = read_csv(out / "predictions.csv")
  for model in MODELS:
    sel = [r for r in rows if r["model"] == model and r["split"] == "val"]
    y = np.array([int(r["label"]) for r in sel])
    p = np.array([float(r["prob"]) for r in sel])
    pooled = result["table2"][model]["val"]["pooled"]
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= 0.5))
    if len(set(y)) == 2:
      assert pooled["auc"] == pytest.approx(skm.roc_auc_score(y, p))


@pytest.mark.slow
def test_group_tables_count_the_cases(evaluated, trained_workdir):
  result, out = evaluated
  manifest = {r["case_id"]: r for r in read_csv(smoke_manifest(trained_workdir))}
  rows = read_csv(out / "predictions.csv")
  for split in ("val", "test"):
    ids = sorted({r["case_id"] for r in rows if r["split"] == split})
    assert ids, split
    ratio = np.array([float(manifest[c]["infection_ratio"]) for c in ids])
    covid = np.array([manifest[c]["label"] == "covid" for c in ids])
    # Table III's groups; both edges belong to the middle group ("0.005 - 0.030").
    group = np.where(ratio < 0.005, 0, np.where(ratio > 0.030, 2, 1))
    got = {g["name"]: (g["n_covid"], g["n_cap"]) for g in result["table3"][split]["groups"]}
    expected = {name: (int(np.sum(covid & (group == g))), int(np.sum(~covid & (group == g))))
                for g, name in enumerate(("< 0.005", "0.005 - 0.030", "> 0.030"))}
    assert got == expected, split
    assert sum(sum(v) for v in got.values()) == len(ids)


@pytest.mark.slow
def test_searched_ensemble_is_applied_to_every_row(evaluated):
  result, out = evaluated
  ens = json.loads((out / "ensemble.json").read_text())
  assert ens["available"] and "search" in ens and ens["source"].startswith("searched")
  rows = read_csv(out / "predictions.csv")
  prob = {(r["model"], r["split"], r["case_id"]): float(r["prob"]) for r in rows}
  n = 0
  for (model, split, case_id), p_ds in prob.items():
    if model != "att_rn34_ds":
      continue
    r = float(next(x["ratio"] for x in rows if x["case_id"] == case_id) or "nan")
    w = ens["w_extreme"] if (r < 0.001 or r > 0.030) else ens["w_middle"]
    expected = (w * prob[("att_rn34_us", split, case_id)]
                + (1 - w) * prob[("att_rn34_ss", split, case_id)])
    assert p_ds == pytest.approx(expected, abs=1e-9)
    n += 1
  assert n == len({(r["split"], r["case_id"]) for r in rows})


@pytest.mark.slow
def test_attention_quality_numbers(evaluated, trained_workdir):
  result, out = evaluated
  cases = read_csv(out / "attention_cases.csv")
  manifest = {r["case_id"]: r for r in read_csv(smoke_manifest(trained_workdir))}
  val_covid = {r["case_id"] for r in read_csv(out / "predictions.csv")
               if r["split"] == "val" and r["label"] == "1"}
  assert cases and {r["case_id"] for r in cases} <= val_covid
  assert all(manifest[r["case_id"]]["label"] == "covid" for r in cases)
  summary = result["evaluation"]["attention_maps"]
  for kind in evaluate.MAP_KINDS:
    assert [e["model"] for e in summary[kind]] == list(VARIANTS)
    for e in summary[kind]:
      mine = [r for r in cases if r["kind"] == kind and r["model"] == e["model"]]
      assert len(mine) == len({r["case_id"] for r in cases})  # Every case, every model.
      # An all-zero map (e.g. a ReLU-clipped Grad-CAM) has no mass: empty in the CSV, skipped.
      vals = [float(r["mass_inside"]) for r in mine if r["mass_inside"] != ""]
      assert all(0 <= v <= 1 for v in vals)
      assert e["mass_inside"]["mean"] == pytest.approx(np.mean(vals))
      assert e["mass_inside"]["n"] == len(vals)
      in_lung = [float(r["mass_in_lung"]) for r in mine if r["mass_in_lung"] != ""]
      assert all(0 <= v <= 1 for v in in_lung)
      assert e["mass_in_lung"]["mean"] == pytest.approx(np.mean(in_lung))
  for r in cases:  # Chance levels per case: volume fractions of the infection and of the lung.
    assert 0 < float(r["volume_fraction"]) < float(r["lung_fraction"]) < 1
  # The main table (report.write_report's "attention") is the Fig. 5 kind of map.
  assert [e["model"] for e in result["attention"]] == list(VARIANTS)
  assert result["attention"][1]["soft_dice"]["mean"] == pytest.approx(
      summary["display"][1]["soft_dice"]["mean"])
  report_md = (out / "report.md").read_text()
  assert "overlap the infections more than the baseline" in report_md
  assert len(result["evaluation"]["attention_figures"]) >= 2


@pytest.mark.slow
def test_only_the_listed_evaluators_run(trained_workdir, tmp_path):
  out = tmp_path / "ev"
  result = evaluate.evaluate_workdir(
      trained_workdir, config_overrides={"eval": {"evaluators": ("predictions", "ensemble")}},
      progress=False, out_dir=out)
  assert (out / "ensemble.json").is_file() and (out / "runs.csv").is_file()
  for name in ("attention_cases.csv", "findings.csv", "attention.csv"):
    assert not (out / name).exists(), name
  assert not list((out / "curves").glob("*.png")) and not list((out / "attention").glob("*"))
  assert "findings" not in result and result["evaluation"]["attention_maps"] == {}
  assert result["models"] == list(MODELS)  # No reference rows.
  assert all(r["max_abs_prob_diff"] is None for r in result["evaluation"]["runs"])
