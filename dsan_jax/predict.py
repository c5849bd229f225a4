"""Diagnosis of one chest CT with the trained models of a work directory, with attention maps.

  python -m dsan_jax.predict --workdir runs/quickstart --image CT.nii.gz \
      [--lung-mask LUNG.nii.gz] [--infection-mask INF.nii.gz] --out OUT [--fold K]

What it does:

1. Finds every ``<workdir>/<variant>/fold_<k>`` with a best checkpoint (the three variants of
   Table II; ``--fold K`` keeps fold K only). A run still training (or interrupted) is used
   through its best checkpoint so far, read under the checkpoints' shared lock (never one being
   written); a ``note:`` line on stderr and ``incomplete_runs`` in prediction.json say so.
   By default every fold present is used and each variant's probability is the MEAN of its
   fold models' probabilities (the fold models are five equally good estimates of the same
   model; averaging them is the usual cross-validation ensemble and is never worse than a
   random one of them in expectation).
2. Preprocesses the CT exactly as in training (``load_and_preprocess`` with the runs'
   ``config.data``; without ``--lung-mask`` the classical lung segmentation is used when the
   config allows it).
3. The dual-sampling ensemble (Eq. 5), ``P = w P_US + (1 - w) P_SS``, with w from the infection
   ratio r. The ratio is ``--infection-ratio`` when given, else from ``--infection-mask``
   (r = |I| / |L u I| on the CT's own grid), else ESTIMATED from the CT
   (``data.infection_ratio``, the high-attenuation lung fraction of
   ``dsan_jax.data.infection_ratio``; flagged ``ratio_estimated``). Only when none is available
   (``data.infection_ratio = "mask"`` and no mask) w falls back to ``w_middle`` (0.96 with the
   paper's values): the literal reading of Eq. 5 (an unknown r does not meet "r < 0.001 or
   r > 0.030"), which leans on the uniform-sampling model.
   ``prediction.json`` says which was used. The weights are the runs' ``config.ensemble``
   (the paper's), or with ``--searched-weights`` those that ``evaluate.py --search_ensemble``
   wrote to ``<workdir>/evaluation/ensemble.json``.
4. Writes to ``--out`` (a folder, written under a temporary name and renamed when complete; a
   previous prediction folder there is replaced):

   prediction.json            probabilities, labels, lung volume (mL), ratio with its source,
                              its Table III group and ensemble band, weights, the model
                              weights used (run folders, checkpoint steps), files
   summary.png                for a person: axial and coronal slices through the attention
                              maximum, CT window, lung contour, T(A) overlay, the numbers
   attention.nii.gz           the attention map T(A) on the input CT's voxel grid (same shape
                              and affine as the input): the ensemble's mix
                              w T_US + (1 - w) T_SS of the attention models (fold-averaged);
                              only one attention model present -> its map; none trained ->
                              not written
   attention_<variant>.nii.gz each attention model's T(A) (fold-averaged)
   gradcam_rn34_us.nii.gz     the baseline's Grad-CAM (up-sampled, min-max), when trained
   overview.png               axial and coronal slices: CT, masks and every map

Errors (missing or unreadable file, no trained runs, ...) print one line
``error: <file>: <cause>`` and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import sys
from typing import Any, Mapping, NamedTuple, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from dsan_jax import cli_flags, files, runtime, variants
from dsan_jax.data import infection_ratio as ratio_lib
from dsan_jax.data import io
from dsan_jax.data import preprocess
from dsan_jax.errors import ConfigError, DataError, DsanError
from dsan_jax.evaluation import ensemble as ensemble_lib
from dsan_jax.evaluation import explanation, metrics, plots, report
from dsan_jax.training import run_folder, sharding

log = logging.getLogger("dsan_jax")

LABEL_NAMES = {1: "COVID", 0: "CAP"}


def _runs(workdir: pathlib.Path, fold: int | None) -> list[run_folder.RunInfo]:
  if not workdir.is_dir():
    raise DataError(workdir, "work directory not found")
  runs = [r for r in run_folder.find_runs(workdir) if r.variant in variants.VARIANTS]
  if not runs:
    raise DataError(workdir, "no trained runs (expected <variant>/fold_<k>/checkpoints/best "
                    f"for a variant of {list(variants.VARIANTS)})")
  if fold is not None:
    present = sorted({r.fold for r in runs})
    runs = [r for r in runs if r.fold == fold]
    if not runs:
      raise DataError(workdir, f"no trained run for fold {fold} (folds present: {present})")
  return runs


def _check_out(out: pathlib.Path) -> None:
  if out.exists() and not out.is_dir():
    raise DataError(out, "exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not (out / "prediction.json").exists():
    raise DataError(out, "exists, is not empty and holds no prediction.json; refusing to "
                    "replace it (choose another --out)")


def _ensemble_weights(workdir: pathlib.Path, config, searched: bool) -> dict[str, Any]:
  w = dict(ensemble_lib.config_weights(config.ensemble), source="config")
  if searched:
    path = workdir / "evaluation" / "ensemble.json"
    if not path.exists():
      raise DataError(path, "not found; run evaluate.py --search_ensemble first")
    try:
      info = json.loads(path.read_text())
      w.update(w_extreme=float(info["w_extreme"]), w_middle=float(info["w_middle"]),
               low=float(info["low_ratio"]), high=float(info["high_ratio"]),
               source=f"{path} ({info.get('source', '?')})")
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(path, f"unreadable ensemble weights ({e})") from None
  return w


class _ModelOutputs(NamedTuple):
  """Every run's probability and display map on one CT (``_predict_runs``)."""
  probs: dict[str, dict[int, float]]  # {variant: {fold: P(COVID)}}.
  mean_map: dict[str, np.ndarray]  # {variant: fold-averaged display map [D, H, W]}.
  is_attention: dict[str, bool]  # {variant: has the attention module}.
  weights_used: list[dict[str, Any]]  # One entry per run: folder, checkpoint, step.
  runtime: dict[str, Any]  # How it was computed (the same for every run: runtime.resolve).

  @property
  def prob(self) -> dict[str, float]:
    """{variant: mean of its fold models' probabilities}."""
    return {v: float(np.mean(list(p.values()))) for v, p in self.probs.items()}


def _check_inputs(inputs: Mapping[str, Any], infection_ratio: float | None,
                  out_path: pathlib.Path | None) -> None:
  """Fails fast, naming the file, before any model is loaded."""
  if infection_ratio is not None and not 0.0 <= float(infection_ratio) <= 1.0:
    raise ConfigError(f"--infection-ratio must be in [0, 1], got {infection_ratio}")
  for name, p in inputs.items():
    if p is not None:
      io.read_header(p, is_mask=name != "image")
  if out_path is not None:
    _check_out(out_path)


def _runs_and_config(workdir: pathlib.Path, fold: int | None
                     ) -> tuple[list[run_folder.RunInfo], list[str], ml_collections.ConfigDict]:
  """The runs to use, the notes of unfinished ones (printed) and their common config."""
  runs = _runs(workdir, fold)
  unfinished = [n for n in (run_folder.incomplete_note(r.variant, r.fold, r.run_dir)
                            for r in runs) if n]  # A run in progress: its best checkpoint so far.
  for note in unfinished:
    print(f"note: {note}", file=sys.stderr, flush=True)
  configs = {r: run_folder.load_config(r.run_dir / "config.json") for r in runs}
  settings = {r: preprocess.PreprocessSettings.from_config(c) for r, c in configs.items()}
  if len(set(settings.values())) > 1:
    raise ConfigError(f"{workdir}: the runs use different preprocessing settings; pass --fold "
                      "or keep one kind of run per work directory")
  return runs, unfinished, configs[runs[0]]


def _predict_runs(runs: Sequence[run_folder.RunInfo], net_image: np.ndarray) -> _ModelOutputs:
  """Loads each run's best checkpoint in turn and explains ``net_image`` [D, H, W] with it."""
  mesh = sharding.make_mesh()
  probs: dict[str, dict[int, float]] = {}
  maps: dict[str, list[np.ndarray]] = {}
  is_attention: dict[str, bool] = {}
  weights_used = []
  computed_with: dict[str, Any] = {}
  for r in runs:
    trained = run_folder.load_trained(r.run_dir, mesh, "best")
    weights_used.append(dict(variant=r.variant, fold=r.fold, run_dir=str(r.run_dir.resolve()),
                             checkpoint="best", step=int(trained.state.step),
                             epoch=(trained.meta or {}).get("epoch")))
    m = explanation.attention_maps(trained, net_image)
    probs.setdefault(r.variant, {})[r.fold] = m["prob"]
    maps.setdefault(r.variant, []).append(m["display"])
    is_attention[r.variant] = bool(trained.model.attention)
    computed_with = trained.config.runtime.to_dict()
    del trained
  mean_map = {v: np.mean(np.stack(ms), axis=0).astype(np.float32) for v, ms in maps.items()}
  return _ModelOutputs(probs, mean_map, is_attention, weights_used, computed_with)


def _ensemble_entry(prob: Mapping[str, float], ratio: float, weights: dict[str, Any],
                    threshold: float, ratio_estimated: bool) -> dict[str, Any] | None:
  """prediction.json's ``ensemble`` (Eq. 5); None without both members."""
  us, ss = variants.ENSEMBLE_MEMBERS
  if us not in prob or ss not in prob:
    return None
  rule = (weights["w_extreme"], weights["w_middle"], weights["low"], weights["high"])
  w = float(ensemble_lib.ensemble_weight([ratio], *rule)[0])
  p = float(ensemble_lib.combine([prob[us]], [prob[ss]], [ratio], *rule)[0])  # Eq. 5.
  return dict(name=variants.ENSEMBLE, prob=float(p), label=LABEL_NAMES[int(p >= threshold)],
              w_us=w, weights=weights,
              weight_rule=("ratio outside [low, high] -> w_extreme, inside -> w_middle"
                           + (" (the ratio is ESTIMATED)" if ratio_estimated
                              else "") if math.isfinite(ratio) else
                           "ratio unavailable -> w_middle (Eq. 5 literally: an unknown ratio is "
                           "one of 'the rest cases')"))


def _combined_map(ens: Mapping[str, Any] | None, outputs: _ModelOutputs
                  ) -> tuple[np.ndarray | None, str | None]:
  """attention.nii.gz's map and its description (see the module docstring)."""
  us, ss = variants.ENSEMBLE_MEMBERS
  mean_map = outputs.mean_map
  att_variants = [v for v in variants.VARIANTS if outputs.is_attention.get(v)]
  if ens is not None:
    att = ens["w_us"] * mean_map[us] + (1.0 - ens["w_us"]) * mean_map[ss]
    return att, f"w T(A)[{us}] + (1 - w) T(A)[{ss}], w = {ens['w_us']:.2f}"
  if att_variants:
    return (np.mean(np.stack([mean_map[v] for v in att_variants]), axis=0),
            "mean of T(A) of " + ", ".join(att_variants))
  return None, None


def _models_entry(outputs: _ModelOutputs, threshold: float) -> dict[str, Any]:
  """prediction.json's ``models``: each variant's fold-averaged probability and map kind."""
  prob, probs, is_attention = outputs.prob, outputs.probs, outputs.is_attention
  return {v: dict(prob=prob[v], label=LABEL_NAMES[int(prob[v] >= threshold)],
                  prob_per_fold={str(k): p for k, p in sorted(probs[v].items())},
                  attention_module=is_attention[v],
                  map=("T(A)" if is_attention[v] else "Grad-CAM (up-sampled, min-max)"))
          for v in variants.VARIANTS if v in prob}


def _result(outputs: _ModelOutputs, ens: dict[str, Any] | None, threshold: float,
            runs: Sequence[run_folder.RunInfo], ratio_info: dict[str, Any], band: str | None,
            pre, att_desc: str | None, inputs: Mapping[str, Any],
            workdir: pathlib.Path) -> dict[str, Any]:
  """prediction.json's content: the final call (the ensemble's when there is one) and how."""
  us, ss = variants.ENSEMBLE_MEMBERS
  all_probs = dict(outputs.prob, **({variants.ENSEMBLE: ens["prob"]} if ens else {}))
  final_model = next(m for m in [variants.ENSEMBLE, us, ss, "rn34_us"] if m in all_probs)
  final = all_probs[final_model]
  return dict(
      probability=final, label=LABEL_NAMES[int(final >= threshold)],
      label_index=int(final >= threshold), probability_model=final_model, threshold=threshold,
      ensemble=ens, models=_models_entry(outputs, threshold),
      folds=sorted({r.fold for r in runs}),
      fold_aggregation="mean of the fold models' probabilities",
      **ratio_info,
      ensemble_ratio_band=band,
      lung_volume_ml=pre.lung_ml if math.isfinite(pre.lung_ml) else None,
      lung_mask_source=pre.lung_mask_source,
      model_weights=outputs.weights_used,
      attention_map=att_desc,
      inputs={k: (str(pathlib.Path(v).resolve()) if v is not None else None)
              for k, v in inputs.items()},
      input_shape=list(pre.geometry.original_shape),
      input_affine=np.asarray(pre.geometry.original_affine).tolist(),
      workdir=str(workdir.resolve()),
      runtime=outputs.runtime,
      note="Research software; not a medical device.",
  )


def predict_case(workdir: str | os.PathLike, image: str | os.PathLike,
                 lung_mask: str | os.PathLike | None = None,
                 infection_mask: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None, fold: int | None = None,
                 searched_weights: bool = False,
                 infection_ratio: float | None = None) -> dict[str, Any]:
  """Predicts one CT with every trained model of ``workdir`` (see the module docstring).

  Args:
    workdir: the protocol's root folder.
    image: CT in HU: NIfTI, or a DICOM series folder (``folder#SeriesInstanceUID``).
    lung_mask: lung mask on the CT's grid, or None.
    infection_mask: infection mask on the CT's grid, or None (ratio unavailable).
    out: output folder, or None to write nothing.
    fold: use only this fold's models; None -> all folds present, probabilities averaged.
    searched_weights: use ``<workdir>/evaluation/ensemble.json``'s weights.
    infection_ratio: a known ratio in [0, 1] (wins over the mask and the estimate).

  Returns:
    The content of prediction.json.

  Raises:
    DataError / ConfigError: unreadable inputs, no trained runs, inconsistent runs.
  """
  workdir = pathlib.Path(workdir)
  inputs = {"image": image, "lung_mask": lung_mask, "infection_mask": infection_mask}
  out_path = pathlib.Path(out) if out is not None else None
  _check_inputs(inputs, infection_ratio, out_path)
  runs, unfinished, config = _runs_and_config(workdir, fold)
  # One preprocessing, as in training (masking order included); the overview shows the CT
  # itself (``pre.ct``, the same windowing without the lung multiplication).
  pre = preprocess.load_and_preprocess(image, lung_mask, infection_mask, config=config,
                                       keep_ct=True)
  net_image = pre.image
  ratio_info = _ratio_info(pre, infection_ratio, config)
  ratio = ratio_info["ratio"] if ratio_info["ratio"] is not None else float("nan")
  outputs = _predict_runs(runs, net_image)
  prob = outputs.prob
  threshold = float(config.eval.threshold)
  weights = _ensemble_weights(workdir, config, searched_weights)
  ens = _ensemble_entry(prob, ratio, weights, threshold, ratio_info["ratio_estimated"])
  att, att_desc = _combined_map(ens, outputs)
  result = _result(outputs, ens, threshold, runs, ratio_info, _band(ratio, weights), pre,
                   att_desc, inputs, workdir)
  if unfinished:
    result["incomplete_runs"] = unfinished
  if out_path is not None and jax.process_index() == 0:
    _write_outputs(out_path, pre, result, att, outputs, image, tuple(config.data.hu_window))
  return result


def _write_outputs(out_path: pathlib.Path, pre, result: dict[str, Any], att: np.ndarray | None,
                   outputs: _ModelOutputs, image, hu_window) -> None:
  """The NIfTI maps, overview.png, summary.png and prediction.json, into a folder renamed when
  complete; adds ``files`` to ``result``."""
  tmp = files.temp_path(out_path)
  tmp.mkdir(parents=True)
  try:
    written = []
    mean_map, is_attention = outputs.mean_map, outputs.is_attention

    def write_map(name: str, vol: np.ndarray) -> None:
      io.write_nifti(tmp / name, preprocess.to_original_grid(vol, pre.geometry).astype(
          np.float32), pre.geometry.original_affine)
      written.append(name)

    if att is not None:
      write_map("attention.nii.gz", att)
    for v in variants.VARIANTS:
      if is_attention.get(v):
        write_map(f"attention_{v}.nii.gz", mean_map[v])
    for v in variants.VARIANTS:
      if v in mean_map and not is_attention[v]:
        write_map(f"gradcam_{v}.nii.gz", mean_map[v])
    _write_overview_png(tmp / "overview.png", pre, outputs, result, image)
    written.append("overview.png")
    _write_summary_png(tmp / "summary.png", pre, att if att is not None else next(
        iter(mean_map.values())), result, "T(A)" if att is not None else "Grad-CAM",
        image, hu_window)
    written.append("summary.png")
    result["files"] = ["prediction.json"] + written
    (tmp / "prediction.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    files.replace_dir(tmp, out_path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _write_overview_png(path: pathlib.Path, pre, outputs: _ModelOutputs, result: dict[str, Any],
                        image) -> None:
  """overview.png: axial and coronal slices with the CT, masks and every model's map."""
  shown = {}
  for v in variants.VARIANTS:
    if v in outputs.mean_map:
      title = report.MODEL_TITLES.get(v, v)
      kind = "T(A)" if outputs.is_attention[v] else "Grad-CAM"
      shown[f"{title} {kind}\nP(COVID) = {outputs.prob[v]:.2f}"] = outputs.mean_map[v]
  plots.plot_attention_figure(
      pre.ct, pre.lung_mask, pre.infection_mask, shown, path,
      spacing=pre.geometry.output_spacing,
      title=(f"{pathlib.Path(image).name}: {result['label']} (P = {result['probability']:.3f}, "
             f"{result['probability_model']})"))


def _ratio_info(pre, given: float | None, config) -> dict[str, Any]:
  """The ratio used, where it came from and its Table III group (prediction.json fields)."""
  if given is not None:
    ratio, source = float(given), "given"
  else:
    ratio, source = float(pre.ratio), pre.ratio_source
  known = math.isfinite(ratio)
  edges = tuple(float(e) for e in config.eval.ratio_groups)
  names = (f"< {edges[0]}", f"{edges[0]} - {edges[1]}", f"> {edges[1]}")
  group = int(metrics.group_of_ratio(np.array([ratio]), edges)[0]) if known else -1
  return dict(
      ratio=ratio if known else None,
      ratio_source=source if known else ratio_lib.SOURCE_NONE,
      ratio_estimated=source == ratio_lib.SOURCE_ESTIMATE and known,
      ratio_note=("given with --infection-ratio" if source == "given" else
                  ratio_lib.describe_source(source) if known else
                  "unavailable (no infection mask, no estimate): the ensemble uses w_middle"),
      ratio_group=names[group] if known else None,
      ratio_from_mask=pre.ratio_mask if math.isfinite(pre.ratio_mask) else None,
      ratio_estimate=pre.ratio_estimate if math.isfinite(pre.ratio_estimate) else None)


def _band(ratio: float, weights: dict[str, Any]) -> str | None:
  """The ensemble's band of the ratio: "r < low", "low <= r <= high" or "r > high"."""
  if not math.isfinite(ratio):
    return None
  lo, hi = weights["low"], weights["high"]
  return f"r < {lo}" if ratio < lo else f"r > {hi}" if ratio > hi else f"{lo} <= r <= {hi}"


def _write_summary_png(path: pathlib.Path, pre, att: np.ndarray, result: dict[str, Any],
                       map_name: str, image_path, hu_window) -> None:
  """summary.png: the clinician's overview (``plots.plot_clinical_overview``)."""
  r = result
  ratio = ("unknown" if r["ratio"] is None else
           f"{r['ratio']:.4f}{' (ESTIMATED)' if r['ratio_estimated'] else ''}")
  lines = [f"P(COVID) = {r['probability']:.3f} -> {r['label']}",
           f"  model: {r['probability_model']}, threshold {r['threshold']}",
           "",
           f"lung volume: {r['lung_volume_ml']:.0f} mL" if r["lung_volume_ml"] is not None
           else "lung volume: - (no lung mask)",
           "  (on the network's grid, "
           + " x ".join(f"{v:.2f}" for v in pre.geometry.output_spacing[::-1]) + " mm)",
           f"  lung mask: {r['lung_mask_source']}",
           f"infection ratio: {ratio}",
           f"  source: {r['ratio_source']}",
           f"  Table III group: {r['ratio_group']}",
           f"  ensemble band: {r['ensemble_ratio_band']}",
           ""]
  if r["ensemble"]:
    lines.append(f"ensemble w_US = {r['ensemble']['w_us']:.2f}")
  lines.append("weights used:")
  lines += [f"  {m['variant']} fold {m['fold']} step {m['step']}" for m in r["model_weights"]]
  lines += ["", "cyan: lung contour; colour: " + map_name, r["note"]]
  # Shown on the CT's own grid (full resolution), the maps and the lung mask mapped onto it.
  vol = io.read_volume(image_path)
  ct = preprocess.window(vol.array, hu_window)
  del vol
  att_c = preprocess.to_canonical_grid(att, pre.geometry)
  lung_c = preprocess.to_canonical_grid(pre.lung_mask.astype(np.float32), pre.geometry) >= 0.5
  plots.plot_clinical_overview(ct, lung_c, att_c, path,
                               spacing=pre.geometry.input_spacing, lines=lines,
                               title=f"{pathlib.Path(image_path).name}: {r['label']} "
                               f"(P = {r['probability']:.3f})",
                               map_name=map_name)


FLAGS = flags.FlagValues()  # This command's own (see dsan_jax/cli_flags.py).
flags.DEFINE_string("workdir", None, "Work directory with the trained runs.", flag_values=FLAGS)
flags.DEFINE_string("image", None, "Chest CT in HU: a NIfTI file, or a folder holding one DICOM "
                    "series (FOLDER#SeriesInstanceUID picks one of several).", flag_values=FLAGS)
flags.DEFINE_string("lung_mask", None, "Lung mask on the CT's grid (default: classical "
                    "segmentation).", flag_values=FLAGS)
flags.DEFINE_string("infection_mask", None, "Infection mask on the CT's grid (gives the infection "
                    "ratio).", flag_values=FLAGS)
flags.DEFINE_float("infection_ratio", None, "A known infection ratio in [0, 1] (default: from the "
                   "infection mask, else estimated from the CT).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_integer("fold", None, "Use only this fold's models (default: all folds, "
                     "probabilities averaged).", flag_values=FLAGS)
flags.DEFINE_bool("searched_weights", False, "Ensemble weights from "
                  "<workdir>/evaluation/ensemble.json.", flag_values=FLAGS)
flags.DEFINE_bool("verbose", False, "Log progress.", flag_values=FLAGS)
for _name in ("lung_mask", "infection_mask", "infection_ratio", "searched_weights"):
  cli_flags.dashed_alias(_name, FLAGS)
for _name in ("workdir", "image", "out"):
  flags.mark_flag_as_required(_name, flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  status = cli_flags.parse(FLAGS, argv, "python -m dsan_jax.predict",
                           "COVID-19 vs CAP for one chest CT, with attention maps (see the "
                           "module doc).")
  if status is not None:
    return status
  args = FLAGS
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="[%(name)s] %(message)s")
  logging.getLogger("absl").setLevel(logging.INFO if args.verbose else logging.ERROR)
  runtime.configure_xla_flags()  # Before the first jax computation: XLA reads flags once.
  try:
    result = predict_case(args.workdir, args.image, args.lung_mask, args.infection_mask,
                          args.out, args.fold, args.searched_weights, args.infection_ratio)
  except DsanError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  ens = result["ensemble"]
  print(f"{result['label']}: P(COVID) = {result['probability']:.4f} "
        f"({result['probability_model']}, threshold {result['threshold']})")
  for v, m in result["models"].items():
    print(f"  {v:12s} P = {m['prob']:.4f}  (folds {', '.join(m['prob_per_fold'])})")
  if ens:
    print(f"  ensemble weight w = {ens['w_us']:.2f} ({ens['weight_rule']})")
  if result["lung_volume_ml"] is not None:
    print(f"  lung volume: {result['lung_volume_ml']:.0f} mL ({result['lung_mask_source']} "
          "lung mask)")
  if result["ratio"] is not None:
    print(f"  infection ratio: {result['ratio']:.4f}, {result['ratio_note']}; Table III group "
          f"{result['ratio_group']}, ensemble band {result['ensemble_ratio_band']}")
  else:
    print(f"  infection ratio: {result['ratio_note']}")
  for m in result["model_weights"]:
    print(f"  weights: {m['variant']} fold {m['fold']}, {m['checkpoint']} checkpoint step "
          f"{m['step']} ({m['run_dir']})")
  print(f"  written to {args.out}: {', '.join(result['files'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
