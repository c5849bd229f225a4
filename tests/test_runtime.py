"""dsan_jax.runtime: the implementation choices are made once, before tracing, and recorded."""

import json
import logging

import jax
import jax.numpy as jnp
import pytest

from configs import smoke
from dsan_jax import errors, runtime
from dsan_jax.data import prepare
from dsan_jax.kernels import onednn
from dsan_jax.models import conv
from dsan_jax.models.dsan import model_from_config
from dsan_jax.training import loop, run_folder


@pytest.fixture
def fresh_runtime():
  """Forgets this process's cached choices (and notices) before and after a test."""
  runtime._resolve.cache_clear()
  runtime._notice_no_onednn.cache_clear()
  yield
  runtime._resolve.cache_clear()
  runtime._notice_no_onednn.cache_clear()


@pytest.fixture
def no_onednn(monkeypatch, tmp_path, fresh_runtime):
  """oneDNN as on an install without the ``cpu`` extra: not found, nothing loaded."""
  monkeypatch.setenv("DSAN_ONEDNN_ROOT", str(tmp_path / "no-onednn"))
  monkeypatch.setattr(onednn.ops, "_state", {})


def _all_values(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _all_values(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _all_values(v)
  else:
    yield tree


def test_resolved_config_names_concrete_implementations(fresh_runtime):
  config = smoke.get_config()
  assert config.model.conv_impl == "auto"
  resolved = runtime.resolve_config(config)
  assert config.model.conv_impl == "auto"  # The input is not changed.
  expected = runtime.resolve_conv_impl("auto", dtype=jnp.float32)
  assert resolved.model.conv_impl == resolved.model.stem_conv_impl == expected
  rec = resolved.runtime
  assert (rec.backend, rec.device_count, rec.conv_impl) == (
      jax.default_backend(), jax.device_count(), expected)
  assert rec.onednn == (onednn.version() if expected == "onednn" else "")
  model_from_config(resolved.model)  # Concrete: builds.
  with pytest.raises(ValueError, match="resolve_config"):
    model_from_config(config.model)
  # The runtime's device count, not a probe while tracing, makes oneDNN calls partitioned.
  assert not model_from_config(resolved.model, 1).conv_partitioned
  assert model_from_config(resolved.model, 8).conv_partitioned


def test_layers_refuse_unresolved_and_unloaded_implementations(monkeypatch):
  x, w = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 2))
  with pytest.raises(ValueError, match="'auto'"):
    conv.conv3d(x, w, (1, 1, 1), [(1, 1)] * 3, "auto")
  monkeypatch.setattr(onednn.ops, "_state", {})  # As before the start-up step.
  with pytest.raises(onednn.OnednnUnavailableError, match="not loaded"):
    jax.jit(lambda x, w: conv.conv3d(x, w, (1, 1, 1), [(1, 1)] * 3, "onednn")).lower(x, w)


def test_explicit_onednn_without_onednn_is_a_config_error(no_onednn):
  config = smoke.get_config()
  config.model.conv_impl = "onednn"
  with pytest.raises(errors.ConfigError, match="conv_impl='onednn'.*no-onednn"):
    runtime.resolve_config(config)


@pytest.mark.slow  # One smoke training start (compile): ~60 s CPU under load.
def test_smoke_run_without_onednn_trains_with_xla_convolutions(no_onednn, tmp_path, caplog):
  """An install without the ``cpu`` extra: 'folded', one notice line, and config.json says so."""
  config = smoke.get_config()
  config.data.synthetic.num_cases = 12
  config.data.preprocess_workers = 0
  data = prepare.prepare_data(config, tmp_path / "data", progress=False)
  with caplog.at_level(logging.INFO, logger="dsan_jax"):
    out = loop.train_and_evaluate(config, tmp_path / "run", 0, data=data, progress=False,
                                  max_steps=2)
  assert out["status"] == "stopped" and out["step"] == 2
  notices = [r for r in caplog.records if "oneDNN convolutions unavailable" in r.getMessage()]
  assert len(notices) == 1 and "no-onednn" in notices[0].getMessage()
  assert len([r for r in caplog.records if r.getMessage().startswith("runtime:")]) == 1
  saved = json.loads((run_folder.run_dir(tmp_path / "run", config.variant, 0) /
                      "config.json").read_text())
  assert saved["model"]["conv_impl"] == saved["model"]["stem_conv_impl"] == "folded"
  assert saved["runtime"]["conv_impl"] == "folded" and saved["runtime"]["onednn"] == ""
  assert saved["runtime"]["backend"] == jax.default_backend()
  assert "auto" not in set(_all_values(saved))
