"""The paper's model variants (Table II) as small overrides of any base config.

``configs/{rn34_us,att_rn34_us,att_rn34_ss}.py`` and the protocol runner both use this, so a
variant means the same thing on the paper's settings and on the quick start.
"""

import ml_collections

from dsan_jax.errors import ConfigError

# name -> (model.attention, data.sampling)
VARIANTS = {
    "rn34_us": (False, "uniform"),  # Baseline: no attention module, uniform sampling.
    "att_rn34_us": (True, "uniform"),  # Attention RN34 + US.
    "att_rn34_ss": (True, "size_balanced"),  # Attention RN34 + SS.
}
ENSEMBLE = "att_rn34_ds"  # Dual sampling: the ensemble of att_rn34_us and att_rn34_ss.
ENSEMBLE_MEMBERS = ("att_rn34_us", "att_rn34_ss")


def apply_variant(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Returns a copy of ``config`` set up as variant ``name``."""
  if name not in VARIANTS:
    raise ConfigError(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
  config = ml_collections.ConfigDict(config.to_dict())
  config.variant = name
  config.model.attention, config.data.sampling = VARIANTS[name]
  return config
