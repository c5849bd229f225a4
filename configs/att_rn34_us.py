"""Attention RN34 + US: the attention network trained with uniform sampling (paper, Table II).

Run: python train.py --config configs/att_rn34_us.py --fold 0 --config.data.manifest=DATA.csv
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "att_rn34_us"
  config.model.attention = True
  config.data.sampling = "uniform"
  return config
