"""Train one DSAN variant on one cross-validation fold, or run the whole protocol.

  python train.py --config configs/quickstart.py --fold 0 --workdir runs/quickstart
  python train.py --config configs/att_rn34_ss.py --fold 2 --workdir runs/paper \
      --config.data.manifest=/data/manifest.csv --config.train.num_epochs=20
  python train.py --config configs/quickstart.py --protocol --workdir runs/quickstart

Re-running the same command resumes an interrupted run and skips a finished one.
"""


from absl import app, flags
from ml_collections import config_flags

from dsan_jax import cli

config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Root folder of the runs.")
flags.DEFINE_integer("fold", 0, "Validation fold (0 .. data.num_folds - 1).")
flags.DEFINE_bool("protocol", False,
                  "Train every variant on every fold (skipping finished runs), then evaluate.")
flags.DEFINE_list("variants", ["rn34_us", "att_rn34_us", "att_rn34_ss"],
                  "Variants for --protocol.")
flags.DEFINE_list("folds", [], "Folds for --protocol (default: all).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from dsan_jax.training import loop, protocol  # After flags: XLA flags must be set before jax.
  cli.setup(FLAGS)
  if FLAGS.protocol:
    folds = [int(f) for f in FLAGS.folds] or None
    protocol.run_protocol(FLAGS.config, FLAGS.workdir, FLAGS.variants, folds,
                          progress=FLAGS.progress)
  else:
    summary = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.fold,
                                      progress=FLAGS.progress)
    cli.print_summary(summary)


if __name__ == "__main__":
  cli.run(app, main)
