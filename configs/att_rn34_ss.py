"""Attention RN34 + SS: the attention network trained with size-balanced sampling (Section III-C).

Run: python train.py --config configs/att_rn34_ss.py --fold 0 --config.data.manifest=DATA.csv
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "att_rn34_ss"
  config.model.attention = True
  config.data.sampling = "size_balanced"
  return config
