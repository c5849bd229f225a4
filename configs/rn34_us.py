"""RN34 + US: the paper's baseline, 3D ResNet34 without the attention module, uniform sampling.

Run: python train.py --config configs/rn34_us.py --fold 0 --config.data.manifest=DATA.csv
"""

from configs import default
from dsan_jax import variants


def get_config():
  return variants.apply_variant(default.get_config(), "rn34_us")
