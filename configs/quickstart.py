"""Quick start: the whole method on synthetic phantoms, sized for a 2-core CPU.

Run:
    python train.py --config configs/quickstart.py --fold 0 --workdir runs/quickstart

What changes from the paper (configs/default.py): 1,000 synthetic chest-CT phantoms at
size_scale 0.7 (docs/synthetic.md; 20 % of the patients held out as the test split, the rest in
5 patient folds: fold 0 trains on ~640 and validates on ~160) instead of a clinical dataset;
32x64x64 input volumes instead of 138x256x256 (the same preprocessing: one common down-sampling
factor, the field of view fitted into the frame, ~5.5 mm voxels); a 3D ResNet18 of width 8
instead of ResNet34 of width 64; batch 8; 5 epochs with the learning rate 1e-3 divided by 10
after 3; the CT masked by the lung mask on its own grid before the resampling
(``data.mask_on_input_grid``: at ~5.5 mm voxels resampling first would put the chest wall's
partial volume into the lung's outer voxel layer, docs/testbed.md). The attention module, its
constants, the losses, the samplers and the ensemble are the paper's.

Expect: phantoms and cache in one to two minutes, then training in a few minutes on 2 CPU cores,
printing the validation AUC of each epoch. Measured (docs/testbed.md, section 4, three data
seeds): best validation AUC 0.836, 0.835, 0.793 (last epoch 0.836, 0.833, 0.770), short of the
0.90 that issue 12 aims at; the size-only oracle reaches 0.87-0.91 on the same cases. These are
synthetic-data numbers that check the software and the method's learning, not clinical results.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.variant = "att_rn34_us"
  config.data.synthetic.num_cases = 1000
  config.data.synthetic.size_scale = 0.7
  config.data.target_shape = (32, 64, 64)
  config.data.scale_factor = 0.13
  config.data.mask_on_input_grid = True
  config.model.depth = 18
  config.model.width = 8
  config.train.batch_size = 8
  config.train.num_epochs = 5
  config.train.log_every_steps = 8
  config.optim.learning_rate = 1e-3
  config.optim.lr_decay_every_epochs = 3
  config.eval.batch_size = 8
  return config
