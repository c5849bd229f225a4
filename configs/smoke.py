"""The tiniest end-to-end run, for tests: a few tiny phantoms, a 4-channel one-block-per-stage net.

Run: python train.py --config configs/smoke.py --fold 0 --workdir /tmp/smoke
Expect: finishes in well under a minute on 2 CPU cores; metrics are meaningless (tiny everything).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "att_rn34_us"
  config.data.synthetic.num_cases = 24
  config.data.synthetic.size_scale = 0.5
  config.data.target_shape = (16, 32, 32)
  config.data.scale_factor = 0.25
  config.data.num_folds = 3
  config.model.depth = 10
  config.model.width = 4
  config.model.stage_sizes = (1, 1, 1, 1)
  config.train.batch_size = 4
  config.train.num_epochs = 2
  config.train.log_every_steps = 1
  config.optim.lr_decay_every_epochs = 1
  config.eval.batch_size = 4
  return config
