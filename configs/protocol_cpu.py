"""The whole protocol (3 variants x 5 folds + evaluation) sized to finish in well under an hour on
a 2-core CPU: quick-start phantoms at 32x48x48, 3D ResNet18 of width 8, 8 epochs.

Run:
    python train.py --config configs/protocol_cpu.py --protocol --workdir runs/protocol_cpu

Expect: Tables II/III, comparisons and figures in runs/protocol_cpu/evaluation/. Synthetic-data
numbers (see README.md): they check the software, they are not clinical results.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.data.target_shape = (32, 48, 48)
  config.data.scale_factor = 0.3
  config.model.depth = 18
  config.train.num_epochs = 8
  config.optim.lr_decay_every_epochs = 3
  return config
