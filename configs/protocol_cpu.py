"""The whole protocol (3 variants x 5 folds + the independent test split + evaluation), sized
for a 2-core CPU: 1,700 synthetic phantoms (seed 0: 1,367 training-validation scans in 5 patient
folds and 333 test scans), the quick start's 32x64x64 input and 3D ResNet18 of width 8, 6 epochs
(learning rate 1e-3 divided by 10 after 3).

Run:
    python train.py --config configs/protocol_cpu.py --protocol --workdir runs/protocol_cpu

Expect: Tables II/III, the paper's findings with verdicts, comparisons and figures in
runs/protocol_cpu/evaluation/, in about 50 minutes on 2 cores (measured: 50 min 43 s at load
1.6-3.5, one seed; the earlier run, resampling first, took ~80 min under load 5-9;
docs/results.md has both runs' results). The CT is masked on its own grid before resampling,
as in the quick start (``data.mask_on_input_grid``). Synthetic-data numbers: they check the software and the method
on the testbed, they are not clinical results.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.data.synthetic.num_cases = 1700
  config.train.num_epochs = 6
  config.optim.lr_decay_every_epochs = 3
  return config
