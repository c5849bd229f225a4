"""Attention RN34 + US: the attention network trained with uniform sampling (paper, Table II).

Run: python train.py --config configs/att_rn34_us.py --fold 0 --config.data.manifest=DATA.csv
"""

from configs import default
from dsan_jax import variants


def get_config():
  return variants.apply_variant(default.get_config(), "att_rn34_us")
