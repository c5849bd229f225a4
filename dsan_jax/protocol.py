"""The paper's whole protocol in one restartable command: every variant on every fold, then the
evaluation (Tables II and III, comparisons, figures). Finished runs are skipped, interrupted ones
resume."""

import logging
import os

from dsan_jax import experiment, variants

log = logging.getLogger("dsan_jax")


def run_protocol(config, workdir: str | os.PathLike, variant_names=None, folds=None,
                 progress: bool = True, evaluate: bool = True) -> dict:
  """Trains ``variant_names`` (default: the three of Table II) on ``folds`` (default: all).

  The data (phantoms, cache, folds) is prepared once and shared by all runs.

  Returns:
    {(variant, fold): summary} and, when ``evaluate``, the evaluation's metrics under "report".
  """
  variant_names = list(variant_names or variants.VARIANTS)
  folds = list(range(config.data.num_folds)) if folds is None else list(folds)
  data = None
  results = {}
  for name in variant_names:
    cfg = variants.apply_variant(config, name)
    for fold in folds:
      if experiment.is_complete(workdir, name, fold):
        log.info("%s fold %d: complete, skipped", name, fold)
        continue
      data = data or experiment.prepare_data(cfg, workdir, progress)
      results[(name, fold)] = experiment.train_and_evaluate(cfg, workdir, fold, data=data,
                                                            progress=progress)
  if evaluate:
    from dsan_jax import evaluation  # Deferred: plotting and statistics are only needed here.
    results["report"] = evaluation.evaluate_workdir(workdir, progress=progress)
  return results
