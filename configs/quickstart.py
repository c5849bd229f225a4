"""Quick start: the whole method on synthetic phantoms, sized for a 2-core CPU.

Run:
    python train.py --config configs/quickstart.py --fold 0 --workdir runs/quickstart

What changes from the paper (configs/default.py): 200 synthetic phantoms instead of a clinical
dataset, 32x48x48 input volumes instead of 138x256x256 (one common down-sampling factor, as in the
paper, just smaller), a 3D ResNet18 of width 8 instead of ResNet34 of width 64, batch 8, 8 epochs
with the learning rate divided by 10 every 3 epochs. The attention module, its constants, the
losses, the samplers and the ensemble are the paper's.

Expect: phantoms + cache in well under a minute, then training in a few minutes on 2 CPU cores,
printing the validation AUC of each epoch. These are synthetic-data numbers that check the
software, not clinical results; see README.md for what we measured.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "att_rn34_us"
  config.data.synthetic.num_cases = 400
  config.data.synthetic.size_scale = 1.0
  config.data.target_shape = (48, 64, 64)
  config.data.scale_factor = 0.4
  config.model.depth = 34
  config.model.width = 8
  config.train.batch_size = 8
  config.train.num_epochs = 12
  config.train.log_every_steps = 4
  config.optim.learning_rate = 1e-3
  config.optim.lr_decay_every_epochs = 5
  config.eval.batch_size = 8
  return config
