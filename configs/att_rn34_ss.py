"""Attention RN34 + SS: the attention network trained with size-balanced sampling (Section III-C).

Run: python train.py --config configs/att_rn34_ss.py --fold 0 --config.data.manifest=DATA.csv
"""

from configs import default
from dsan_jax import variants


def get_config():
  return variants.apply_variant(default.get_config(), "att_rn34_ss")
