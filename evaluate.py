"""Evaluate every trained run of a work directory: the paper's Tables II/III, figures, attention.

  python evaluate.py --workdir runs/quickstart
  python evaluate.py --workdir runs/paper --search_ensemble
  python evaluate.py --workdir runs/paper --config configs/default.py \
      --config.eval.threshold=0.5 --config.eval.attention_max_cases=50

Writes <workdir>/evaluation/ (report.md, metrics.json, CSVs, ROC curves, attention figures,
training curves); see docs/evaluation.md. Each run's own config is used for the model and data;
--config only overrides its ``eval`` and ``ensemble`` sections.
"""

from absl import app, flags
from ml_collections import config_flags

from dsan_jax import cli

config_flags.DEFINE_config_file(
    "config", None, "Optional config file whose eval.* and ensemble.* settings override the "
    "runs' own (e.g. configs/default.py with --config.eval.threshold=...).", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Root folder of the runs.")
flags.DEFINE_bool("search_ensemble", False,
                  "Grid-search the ensemble weights on the pooled validation predictions "
                  "(objective: ensemble.search_objective) instead of the paper's.")
flags.DEFINE_string("out_dir", None, "Output folder (default: <workdir>/evaluation).")
flags.DEFINE_bool("progress", True, "Show progress bars and print a summary.")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from dsan_jax.evaluation import evaluate  # After flags: XLA flags must be set before jax.
  cli.setup(FLAGS)
  overrides = None
  if FLAGS.config is not None:
    overrides = {"eval": FLAGS.config.eval, "ensemble": FLAGS.config.ensemble}
  result = evaluate.evaluate_workdir(FLAGS.workdir, config_overrides=overrides,
                                     search_ensemble=FLAGS.search_ensemble,
                                     progress=FLAGS.progress, out_dir=FLAGS.out_dir)
  if not FLAGS.progress:
    print(f"[dsan_jax] evaluation written to {result['out_dir']}")


if __name__ == "__main__":
  cli.run(app, main)
