"""Every config loads, and the default holds the paper's constants (Sections III and IV)."""

import importlib

import pytest

from dsan_jax import variants

CONFIGS = ["default", "rn34_us", "att_rn34_us", "att_rn34_ss", "quickstart", "smoke",
           "protocol_cpu", "learning_check"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.variant in variants.VARIANTS
  assert len(config.data.target_shape) == 3


def test_default_has_the_papers_values():
  c = importlib.import_module("configs.default").get_config()
  assert c.data.target_spacing == (0.7168, 0.7168, 1.25)
  assert c.data.target_shape == (138, 256, 256)
  assert c.data.hu_window == (-1350.0, 150.0)
  assert c.data.scale_factor == 0.5
  assert c.data.num_folds == 5
  assert (c.data.covid_small_ratio, c.data.cap_small_ratio) == (0.030, 0.001)
  assert (c.model.depth, c.model.width, c.model.stage_strides) == (34, 64, (1, 2, 2, 1))
  assert (c.model.attention_alpha, c.model.attention_beta) == (100.0, 0.4)
  assert c.loss.attention_weight == 0.5
  assert (c.optim.learning_rate, c.optim.b1, c.optim.weight_decay) == (2e-4, 0.9, 1e-4)
  assert (c.optim.lr_decay_factor, c.optim.lr_decay_every_epochs) == (0.1, 5)
  assert (c.train.batch_size, c.train.num_epochs) == (20, 20)
  assert (c.ensemble.w_extreme, c.ensemble.w_middle) == (0.35, 0.96)
  assert (c.ensemble.low_ratio, c.ensemble.high_ratio) == (0.001, 0.030)
  assert c.eval.threshold == 0.5 and c.eval.ratio_groups == (0.005, 0.030)


@pytest.mark.parametrize("name,attention,sampling", [
    ("rn34_us", False, "uniform"), ("att_rn34_us", True, "uniform"),
    ("att_rn34_ss", True, "size_balanced")])
def test_variant_configs(name, attention, sampling):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.variant, c.model.attention, c.data.sampling) == (name, attention, sampling)
