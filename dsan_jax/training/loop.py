"""The training loop of one run (a variant on one fold).

``train_and_evaluate(config, workdir, fold)`` trains ``config.variant`` on the training part of
fold ``fold``, evaluates the validation part after every epoch, and keeps the best epoch by
``config.train.select_metric``. It writes the run folder ``<workdir>/<variant>/fold_<k>/``
(its layout: ``dsan_jax.training.run_folder``).

A second command on a run in progress stops, after the cheap checks and before any data work,
with ``RunInProgressError`` (who owns it, since when); the lock dies with its process, so a
killed owner's run is taken over by the next command (``dsan_jax.run_lock``).

Running the same command again resumes from ``checkpoints/latest`` and ends with the same
parameters and metrics as an uninterrupted run (the data order is a function of the step and the
seed, and every RNG lives in the state). A complete run is detected and not redone.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from tqdm import tqdm

from dsan_jax import files, run_lock, runtime
from dsan_jax.data import folds as folds_lib
from dsan_jax.data import manifest as manifest_lib
from dsan_jax.data import pipeline
from dsan_jax.data.prepare import Data, prepare_data
from dsan_jax.errors import ConfigError, DsanError
from dsan_jax.evaluation import metrics
from dsan_jax.models.dsan import model_from_config
from dsan_jax.training import checkpoints, optim, sharding, steps
from dsan_jax.training.run_folder import (check_workdir, prediction_rows, run_dir,
                                          write_predictions)
from dsan_jax.training.run_log import RunLog

log = logging.getLogger("dsan_jax")


class TrainingError(DsanError):
  """Training cannot go on (e.g. the loss keeps being non-finite)."""


# ----------------------------------------------------------------------------- evaluation.


def _to_host(tree):
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def predict(state, eval_step, batches, mesh) -> dict[str, np.ndarray]:
  """Runs ``eval_step`` over padded eval batches; returns per-case arrays without padding.

  Returns:
    dict with ``index``, ``label``, ``ratio``, ``prob``, ``logit``, ``cls_loss`` (and
    ``att_loss`` for attention models), each [M] in the order of the batches.
  """
  out = collections.defaultdict(list)
  for batch in batches:
    dev = sharding.shard_batch(batch, mesh)
    res = _to_host(eval_step(state, dev))
    host = _to_host({k: dev[k] for k in ("index", "label", "ratio", "weight")})
    keep = host["weight"] > 0
    for k, v in {**res, **host}.items():
      out[k].append(np.asarray(v)[keep])
  return {k: np.concatenate(v) for k, v in out.items() if k != "weight"}


# ------------------------------------------------------------------------------- training.


def _device_batches(it: Iterator[dict], mesh, size: int) -> Iterator[dict]:
  """Keeps ``size`` batches in flight to the devices (device_put is asynchronous)."""
  queue = collections.deque()
  for batch in it:
    queue.append(sharding.shard_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _state_bytes(abstract_state) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(abstract_state))


def _better(value: float, best: float | None) -> bool:
  if best is None:
    return True
  if value is None or not math.isfinite(value):
    return False
  return not math.isfinite(best) or value > best


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, fold: int,
                       *, data: Data | None = None, progress: bool = True,
                       max_steps: int | None = None) -> dict[str, Any]:
  """Trains ``config.variant`` on fold ``fold`` and evaluates it every epoch (see module doc).

  Args:
    config: the full config.
    workdir: root folder; the run writes to ``<workdir>/<variant>/fold_<fold>/``.
    fold: validation fold in ``[0, config.data.num_folds)``.
    data: already prepared data (the protocol shares it between runs); None -> prepared here.
    progress: show progress bars.
    max_steps: stop (as if interrupted) after this global step, for tests; None = train fully.

  Returns:
    Summary dict: best epoch, best metric, validation metrics of the best epoch, status.
  """
  if not 0 <= fold < config.data.num_folds:
    raise ConfigError(f"--fold must be in [0, {config.data.num_folds - 1}], got {fold}")
  rd = run_dir(workdir, config.variant, fold)
  if (rd / "done.json").exists():
    return _already_complete(rd)

  config = runtime.resolve_config(config)  # Concrete implementations; config.json records them.
  model = model_from_config(config.model, config.runtime.device_count)
  mesh = sharding.make_mesh()
  batch_size = config.train.batch_size
  sharding.check_batch_divisible(batch_size, mesh)
  sharding.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
  if batch_size % config.train.grad_accum_steps:
    raise ConfigError(f"train.batch_size={batch_size} is not divisible by "
                      f"train.grad_accum_steps={config.train.grad_accum_steps}")
  input_shape = (batch_size, *config.data.target_shape)
  # Checked before any data work. The state's size does not depend on the schedule, so a
  # placeholder optimiser (steps_per_epoch=1) is enough here; the real one needs the data.
  size_probe = steps.abstract_train_state(model, optim.make_optimizer(config.optim, 1),
                                          config.seed, input_shape)
  check_workdir(pathlib.Path(workdir), need_bytes=4 * _state_bytes(size_probe) + 2**26)
  manifest = None
  if data is None and config.data.manifest:  # Checked (headers only) before anything is written.
    manifest = manifest_lib.load_manifest(config.data.manifest, skip_bad=config.data.skip_bad)

  with run_lock.own_run(rd):  # Raises RunInProgressError when another process trains it.
    if (rd / "done.json").exists():  # Finished by the previous owner since the check above.
      return _already_complete(rd)
    try:
      data = data or prepare_data(config, workdir, progress, manifest)
      return _train(config, fold, rd, model, mesh, data, progress, max_steps)
    except OSError as e:
      if not files.is_no_space(e):
        raise
      where = pathlib.Path(e.filename).parent if e.filename else rd
      raise files.no_space_error(
          where, f"while writing {files.final_name(e.filename)}" if e.filename else "",
          "; the last complete checkpoint is intact: free some space and rerun the same "
          "command to resume") from None


def _already_complete(rd: pathlib.Path) -> dict[str, Any]:
  summary = json.loads((rd / "done.json").read_text())
  log.info("%s is already complete (best epoch %s, %s=%.4f); nothing to do.", rd,
           summary["best_epoch"], summary["select_metric"], summary["best_metric"] or float("nan"))
  return dict(summary, status="already_complete")


_TRAIN_METRICS = ("loss", "cls_loss", "att_loss", "accuracy")


@dataclasses.dataclass
class _Run:
  """What the loop of one run works with (built once by ``_open_run``)."""
  config: ml_collections.ConfigDict
  fold: int
  rd: pathlib.Path
  mesh: Any
  dataset: Any
  steps_per_epoch: int
  num_steps: int
  ckpts: checkpoints.RunCheckpoints
  run_log: RunLog
  train_iter: Any
  eval_batches: Any
  train_step: Any
  eval_step: Any
  primary: bool  # Only the primary process writes files of its own.
  show: bool  # Progress bars; the per-epoch lines print either way.


def _open_run(config, fold: int, rd: pathlib.Path, model, mesh, data: Data,
              progress: bool) -> tuple[_Run, Any, dict[str, Any]]:
  """Writes config.json, restores (or creates) the state and builds the iterators and steps.

  Returns:
    (the run, the train state, the checkpoint meta: epoch, best metric and epoch, epoch sums).
  """
  batch_size = config.train.batch_size
  input_shape = (batch_size, *config.data.target_shape)
  train_idx, val_idx = folds_lib.split_indices(data.folds, fold)
  steps_per_epoch = len(train_idx) // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"fold {fold} has {len(train_idx)} training cases, fewer than "
                      f"train.batch_size={batch_size}")
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  primary = jax.process_index() == 0
  rd.mkdir(parents=True, exist_ok=True)
  if primary:
    files.write_text(rd / "config.json", config.to_json_best_effort(indent=2))
  ckpts = checkpoints.RunCheckpoints(rd)
  run_log = RunLog(rd)
  abstract = steps.abstract_train_state(model, tx, config.seed, input_shape)
  meta = dict(epoch=0, best_metric=None, best_epoch=-1, epoch_sums={})
  data_state = None
  if ckpts.latest_step() is not None:
    state, data_state, meta = ckpts.restore("latest", abstract, mesh)
    log.info("Resuming %s from step %d (epoch %d).", rd, int(state.step), meta["epoch"])
  else:
    state = sharding.replicate(
        steps.create_train_state(model, tx, config.seed, input_shape), mesh)
  if primary:
    run_log.truncate(meta["epoch"])
  num_steps = steps_per_epoch * config.train.num_epochs
  train_iter = pipeline.make_train_iterator(
      data.dataset, train_idx, config, seed=config.seed * 1000 + fold,
      global_batch_size=batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=int(state.step), num_steps=num_steps)
  if data_state:
    train_iter.set_state(data_state)
  eval_batches = pipeline.make_eval_iterator(
      data.dataset, val_idx, config.eval.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers)
  run = _Run(config=config, fold=fold, rd=rd, mesh=mesh, dataset=data.dataset,
             steps_per_epoch=steps_per_epoch, num_steps=num_steps, ckpts=ckpts, run_log=run_log,
             train_iter=train_iter, eval_batches=eval_batches,
             train_step=steps.make_train_step(model, mesh, config.loss.attention_weight,
                                              config.train.grad_accum_steps),
             eval_step=steps.make_eval_step(model, mesh, config.loss.attention_weight),
             primary=primary, show=progress and primary)
  if primary:
    print(f"[dsan_jax] {config.variant} fold {fold}: {len(train_idx)} train / {len(val_idx)} val "
          f"cases, {jax.device_count()} device(s) ({jax.devices()[0].platform}), global batch "
          f"{batch_size}, {steps_per_epoch} steps/epoch x {config.train.num_epochs} epochs",
          flush=True)
  return run, state, meta


def _train(config, fold: int, rd: pathlib.Path, model, mesh, data: Data, progress: bool,
           max_steps: int | None) -> dict[str, Any]:
  """The body of ``train_and_evaluate``, run by the owner of ``rd``: one loop over the steps,
  with periodic actions (metrics fetched every ``log_every_steps``, mid-epoch checkpoints, and
  at the end of each epoch the evaluation, the best checkpoint and the latest one)."""
  run, state, meta = _open_run(config, fold, rd, model, mesh, data, progress)
  every = max(1, config.train.log_every_steps)
  ckpt_every = config.train.checkpoint_every_steps
  sums = collections.Counter(meta.get("epoch_sums") or {})
  pending = []  # Metrics still on device, fetched once per log interval.
  batches = _device_batches(run.train_iter, mesh, config.data.prefetch)
  start = done = int(state.step)
  try:
    for step in range(start, run.num_steps):
      if max_steps is not None and step >= max_steps:
        return dict(status="stopped", step=step)
      if step == start or step % run.steps_per_epoch == 0:
        bar, t0, n0 = _epoch_bar(run, step), time.perf_counter(), step
      with jax.transfer_guard("disallow"):
        state, step_metrics = run.train_step(state, next(batches))
      done = step + 1
      pending.append(step_metrics)
      bar.update(1)
      end_of_epoch = done % run.steps_per_epoch == 0
      if done % every == 0 or end_of_epoch:
        _fetch_metrics(run, state, pending, sums, bar, done, t0, n0)
        pending = []
      if ckpt_every and done % ckpt_every == 0 and not end_of_epoch:
        meta = dict(meta, epoch_sums=dict(sums))
        run.ckpts.save_latest(done, state, run.train_iter.state_at(done), meta)
      if end_of_epoch:
        bar.close()
        meta = _end_epoch(run, state, done, meta, sums, t0)
        sums = collections.Counter()
  finally:
    run.train_iter.close()
    run.ckpts.close()
  return _finish(run, meta, done, data.note)


def _epoch_bar(run: _Run, step: int) -> tqdm:
  epoch, num_epochs = step // run.steps_per_epoch, run.config.train.num_epochs
  return tqdm(total=run.steps_per_epoch, initial=step - epoch * run.steps_per_epoch,
              desc=f"{run.config.variant} f{run.fold} epoch {epoch + 1}/{num_epochs}",
              unit="step", disable=not run.show, dynamic_ncols=True, leave=True)


def _fetch_metrics(run: _Run, state, pending: list, sums: collections.Counter, bar: tqdm,
                   step: int, t0: float, n0: int) -> None:
  """Adds the pending step metrics to the epoch's sums (one device-to-host copy), updates the
  progress bar, and stops a run whose steps keep being skipped for non-finite values."""
  host = jax.device_get(pending)
  for m in host:
    for k in (*_TRAIN_METRICS, "skipped"):
      sums[k] += float(m[k]) if math.isfinite(float(m[k])) else 0.0
    sums["steps"] += 1
  rate = (step - n0) * run.config.train.batch_size / max(time.perf_counter() - t0, 1e-9)
  bar.set_postfix(loss=f"{float(host[-1]['loss']):.4f}", vol_s=f"{rate:.2f}")
  consecutive = int(jax.device_get(state.consecutive_skipped))
  if consecutive >= run.config.train.max_consecutive_nonfinite:
    raise TrainingError(
        f"{run.rd}: {consecutive} consecutive training steps had a non-finite loss or "
        f"gradient (up to step {step}); the state was left unchanged by each of them. "
        "Lower optim.learning_rate, check the input data, or resume from "
        f"{run.rd / 'checkpoints/latest'}.")


def _end_epoch(run: _Run, state, step: int, meta: dict[str, Any], sums: collections.Counter,
               t0: float) -> dict[str, Any]:
  """Evaluates the validation fold, logs the epoch's row, keeps the best epoch, saves the latest
  checkpoint, and returns the new meta."""
  config, epoch = run.config, step // run.steps_per_epoch - 1
  skipped_fraction = sums["skipped"] / max(sums["steps"], 1)
  if skipped_fraction > config.train.max_nonfinite_fraction:
    raise TrainingError(f"{run.rd}: {skipped_fraction:.0%} of the steps of epoch {epoch + 1} "
                        "were skipped for non-finite values; stopping.")
  t_eval = time.perf_counter()
  pred = predict(state, run.eval_step, run.eval_batches, run.mesh)
  val = metrics.binary_metrics(pred["label"], pred["prob"], config.eval.threshold)
  epoch_time = time.perf_counter() - t0
  row = dict(epoch=epoch, step=step,
             learning_rate=float(optim.learning_rate_schedule(
                 config.optim, run.steps_per_epoch)(step - 1)),
             **{f"train_{k}": sums[k] / max(sums["steps"], 1) for k in _TRAIN_METRICS},
             train_skipped_steps=int(sums["skipped"]),
             **{f"val_{k}": val[k] for k in metrics.METRIC_NAMES},
             val_loss=float(np.mean(pred["cls_loss"])),
             eval_seconds=time.perf_counter() - t_eval, epoch_seconds=epoch_time)
  if run.primary:
    run.run_log.write(row)
  value = val[config.train.select_metric]
  improved = _better(value, meta["best_metric"] if meta["best_epoch"] >= 0 else None)
  meta = dict(meta, epoch=epoch + 1, epoch_sums={})
  if improved:
    meta.update(best_metric=value if math.isfinite(value) else None, best_epoch=epoch)
    if run.primary:
      write_predictions(run.rd / "val_predictions.csv", prediction_rows(run.dataset, pred))
    run.ckpts.save_best(step, state, run.train_iter.state_at(step), meta)
  run.ckpts.save_latest(step, state, run.train_iter.state_at(step), meta)
  if run.primary:
    print(f"  epoch {epoch + 1}: train loss {row['train_loss']:.4f} | val AUC "
          f"{val['auc']:.4f} acc {val['accuracy']:.4f}{' (best)' if improved else ''}",
          flush=True)
  return meta


def _finish(run: _Run, meta: dict[str, Any], step: int, data_note: str) -> dict[str, Any]:
  """Writes done.json (the run is complete) and returns the summary."""
  config = run.config
  best_rows = [r for r in run.run_log.rows() if r["epoch"] == meta["best_epoch"]]
  summary = dict(variant=config.variant, fold=run.fold, best_epoch=meta["best_epoch"],
                 select_metric=config.train.select_metric, best_metric=meta["best_metric"],
                 best_val={k: best_rows[0].get(f"val_{k}") for k in metrics.METRIC_NAMES}
                 if best_rows else {}, steps=step, data=data_note)
  if run.primary:
    files.write_text(run.rd / "done.json", json.dumps(summary, indent=2))
  return dict(summary, status="complete")
