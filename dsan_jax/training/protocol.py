"""The paper's whole protocol in one restartable command: every variant on every fold, then the
evaluation (Tables II and III, comparisons, figures). Finished runs are skipped, interrupted ones
resume.

Several protocol commands on one work directory share the work: each variant/fold is its own
run with its own owner (``dsan_jax.run_lock``), so a command trains the runs that nobody owns,
skips those that another live process is training, and, once its own are done, waits for those
(taking over any whose owner died without finishing it). Every command then evaluates the same
complete set of runs (the evaluation folder is replaced whole, one writer at a time)."""

import logging
import os

from dsan_jax import run_lock, variants
from dsan_jax.data import prepare
from dsan_jax.errors import RunInProgressError
from dsan_jax.training import loop, run_folder

log = logging.getLogger("dsan_jax")


def run_protocol(config, workdir: str | os.PathLike, variant_names=None, folds=None,
                 progress: bool = True, evaluate: bool = True) -> dict:
  """Trains ``variant_names`` (default: the three of Table II) on ``folds`` (default: all).

  The data (phantoms, cache, folds) is prepared once and shared by all runs.

  Returns:
    {(variant, fold): summary} of the runs this command trained and, when ``evaluate``, the
    evaluation's metrics under "report".
  """
  variant_names = list(variant_names or variants.VARIANTS)
  folds = list(range(config.data.num_folds)) if folds is None else list(folds)
  configs = {name: variants.apply_variant(config, name) for name in variant_names}
  pending = [(name, fold) for name in variant_names for fold in folds]
  data = None
  results = {}
  while pending:
    busy = []
    for name, fold in pending:
      if run_folder.is_complete(workdir, name, fold):
        log.info("%s fold %d: complete, skipped", name, fold)
        continue
      data = data or prepare.prepare_data(configs[name], workdir, progress)
      try:
        results[(name, fold)] = loop.train_and_evaluate(configs[name], workdir, fold,
                                                        data=data, progress=progress)
      except RunInProgressError as e:
        log.info("%s fold %d: left to its owner (%s)", name, fold, e)
        busy.append((name, fold))
    if busy:
      _wait_for_one(workdir, busy)
    pending = busy
  if evaluate:
    # Deferred: matplotlib and the statistics are only needed here, not while training.
    from dsan_jax.evaluation import evaluate as evaluation  # pylint: disable=g-import-not-at-top
    results["report"] = evaluation.evaluate_workdir(workdir, progress=progress)
  return results


def _wait_for_one(workdir, busy: list[tuple[str, int]]) -> None:
  """Blocks until the first of ``busy``'s runs has no owner any more."""
  name, fold = busy[0]

  def say(owner):
    print(f"[dsan_jax] waiting for {len(busy)} run(s) that other processes are training: "
          f"{name} fold {fold} ({owner.describe() if owner else 'owner unknown'})"
          f"{' and more' if len(busy) > 1 else ''}", flush=True)

  run_lock.wait_for_run(run_folder.run_dir(workdir, name, fold), say)
