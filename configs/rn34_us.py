"""RN34 + US: the paper's baseline, 3D ResNet34 without the attention module, uniform sampling.

Run: python train.py --config configs/rn34_us.py --fold 0 --config.data.manifest=DATA.csv
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "rn34_us"
  config.model.attention = False
  config.data.sampling = "uniform"
  return config
