"""train_and_evaluate: outputs, resume after an interruption, completed runs, config errors."""

import json

import chex
import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from configs import smoke
from dsan_jax import errors
from dsan_jax.data import prepare
from dsan_jax.training import loop, run_folder


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A JAX persistent compilation cache for this module's runs, removed afterwards.

  Every ``train_and_evaluate`` call builds new jitted steps; with the cache only the first run
  compiles them and the later ones load the same executables (so the comparisons below are of
  the same programs, as in separate processes with a shared cache; tests/test_reliability.py).
  """
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jaxcache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for n, v in before.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Smoke config and its data, prepared once for the module."""
  config = smoke.get_config()
  config.data.synthetic.num_cases = 16
  config.data.preprocess_workers = 0
  config.train.num_epochs = 2
  root = tmp_path_factory.mktemp("exp")
  data = prepare.prepare_data(config, root / "data", progress=False)
  return config, data, root


def _params(workdir, config, which="latest"):
  trained = run_folder.load_trained(run_folder.run_dir(workdir, config.variant, 0),
                                    which=which)
  return jax.device_get((trained.state.params, trained.state.batch_stats, trained.state.step))


def test_run_outputs_then_resume_equals_uninterrupted(shared):
  config, data, root = shared
  full = loop.train_and_evaluate(config, root / "full", 0, data=data, progress=False)
  assert full["status"] == "complete"
  rd = run_folder.run_dir(root / "full", config.variant, 0)
  for name in ("config.json", "metrics.jsonl", "metrics.csv", "val_predictions.csv",
               "done.json"):
    assert (rd / name).exists(), name
  rows = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [0, 1]
  for r in rows:
    assert 0.0 <= r["val_accuracy"] <= 1.0 and np.isfinite(r["train_loss"])
  preds = run_folder.read_predictions(rd / "val_predictions.csv")
  _, val_idx = prepare.folds_lib.split_indices(data.folds, 0)
  assert len(preds) == len(val_idx)
  assert all(0.0 <= p["prob"] <= 1.0 for p in preds)

  # Interrupted in the middle of epoch 2 (after a mid-epoch checkpoint), then resumed.
  steps_per_epoch = full["steps"] // config.train.num_epochs
  cfg = config.copy_and_resolve_references()
  cfg.train.checkpoint_every_steps = 1
  stopped = loop.train_and_evaluate(cfg, root / "resumed", 0, data=data, progress=False,
                                    max_steps=steps_per_epoch + 1)
  assert stopped["status"] == "stopped"
  assert not (run_folder.run_dir(root / "resumed", config.variant, 0) / "done.json").exists()
  resumed = loop.train_and_evaluate(cfg, root / "resumed", 0, data=data, progress=False)
  assert resumed["status"] == "complete"
  p_full, p_res = _params(root / "full", config), _params(root / "resumed", config)
  chex.assert_trees_all_close(p_full, p_res, rtol=1e-6, atol=1e-7)
  rows_res = [json.loads(l) for l in
              (run_folder.run_dir(root / "resumed", config.variant, 0) / "metrics.jsonl")
              .read_text().splitlines()]
  assert [r["epoch"] for r in rows_res] == [0, 1]
  for a, b in zip(rows, rows_res):
    for k in ("val_auc", "val_accuracy", "train_loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6)

  # A finished run is not redone.
  again = loop.train_and_evaluate(config, root / "full", 0, data=data, progress=False)
  assert again["status"] == "already_complete"


def test_bad_fold_and_batch_are_config_errors(shared):
  config, data, root = shared
  with pytest.raises(errors.ConfigError, match="--fold"):
    loop.train_and_evaluate(config, root / "x", 7, data=data, progress=False)
  cfg = config.copy_and_resolve_references()
  cfg.train.batch_size = 6
  cfg.train.grad_accum_steps = 4
  with pytest.raises(errors.ConfigError, match="grad_accum_steps"):
    loop.train_and_evaluate(cfg, root / "y", 0, data=data, progress=False)


def test_unwritable_workdir_is_a_resource_error(shared, tmp_path):
  config, data, _ = shared
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(errors.ResourceError, match="not writable"):
    loop.train_and_evaluate(config, blocker / "run", 0, data=data, progress=False)
