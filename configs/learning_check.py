"""The smallest set-up on which the method clearly learns: the suite's learning test.

Run:
    python train.py --config configs/learning_check.py --fold 0 --workdir /tmp/learning_check

800 synthetic phantoms at size_scale 0.5 (10 % held out as test, the rest in 4 patient folds:
fold 0 trains on ~530 and validates on ~180 cases), 24x48x48 input, a ResNet10-like network
(one block per stage) of width 8, batch 8, 3 epochs, learning rate 1e-3 divided by 10 after 2.
The attention module, the losses and the sampling are the paper's.

Measured on the 2-core development CPU (docs/testbed.md, synthetic data): best validation AUC
0.707 on 177 cases; a network that learns nothing gives 0.5 +- 0.044 (standard error of the AUC
for 86 / 91 cases), so tests/test_learning.py asks for >= 0.60.
"""

from configs import smoke


def get_config():
  config = smoke.get_config()
  config.data.synthetic.num_cases = 800
  config.data.synthetic.size_scale = 0.5
  config.data.synthetic.test_fraction = 0.1
  config.data.target_shape = (24, 48, 48)
  config.data.scale_factor = 0.0975
  config.data.num_folds = 4
  config.model.depth = 10
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 8
  config.train.batch_size = 8
  config.train.num_epochs = 3
  config.train.log_every_steps = 50
  config.optim.learning_rate = 1e-3
  config.optim.lr_decay_every_epochs = 2
  config.eval.batch_size = 8
  return config
