"""The method learns: a small network on a few hundred phantoms generalises well above chance.

``configs/learning_check.py`` through the real command line (train.py, fold 0: ~530 training and
~180 validation phantoms, 24x48x48, three epochs). The floor 0.60 comes from two measurements:

  * a network that learns nothing (shuffled labels, a sign error in a gradient, an attention
    loss that swamps the classification) scores 0.5 with a standard error of
    sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.044 for 86 / 91 cases, so it passes with probability
    about 1 % (2.3 standard errors);
  * the set-up measured 0.707 on the development CPU (docs/testbed.md), 0.1 above the floor;
    the float32 reduction order of another CPU moves one training run by a few hundredths
    (docs/testbed.md: three data seeds of the quick start spread 0.775-0.791).

The size-only oracle (the true infection ratio) reaches ~0.88 on these cases: the issue's
"oracle minus 0.1" is out of reach for a network this small trained this briefly, which
docs/testbed.md reports; this test shows that learning happens, not a particular number.
"""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.test_end_to_end import run_cli

FLOOR = 0.60


@pytest.mark.slow
def test_network_learns_above_chance(tmp_path):
  workdir = tmp_path / "learn"
  res = run_cli(["train.py", "--config", "configs/learning_check.py", "--fold", "0",
                 "--workdir", str(workdir), "--noprogress"])
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  run = workdir / "att_rn34_us" / "fold_0"
  done = json.loads((run / "done.json").read_text())
  auc = done["best_val"]["auc"]
  rows = np.genfromtxt(run / "val_predictions.csv", delimiter=",", names=True, dtype=None,
                       encoding=None)
  oracle = roc_auc_score(rows["label"], rows["ratio"])
  assert rows.size > 150  # The floor's standard error assumes ~180 validation cases.
  assert auc >= FLOOR, f"validation AUC {auc:.3f} < {FLOOR} (size-only oracle {oracle:.3f})"
