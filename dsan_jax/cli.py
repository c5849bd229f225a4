"""What the command-line entry points share: flags for multi-process runs, start-up, and
turning expected errors into one line and a non-zero exit status instead of a traceback."""

import logging
import sys

from absl import flags
import jax

from dsan_jax import runtime
from dsan_jax.errors import DsanError

log = logging.getLogger("dsan_jax")


def define_distributed_flags() -> None:
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-process runs (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() with the cluster's environment "
                    "(SLURM, Cloud TPU, ...) even without --coordinator_address.")


def setup(flag_values) -> None:
  """Logging, XLA flags (``runtime.configure_xla_flags``), ``jax.distributed``, and a line about
  the devices. The per-run choices (convolutions, oneDNN) are ``runtime.resolve_config``'s."""
  # absl has already put its handler on the root logger: libraries at WARNING, ours at INFO.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("dsan_jax").setLevel(logging.INFO)
  runtime.configure_xla_flags()  # Before the first jax computation: XLA reads its flags once.
  if flag_values.coordinator_address or flag_values.distributed:
    jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                               num_processes=flag_values.num_processes,
                               process_id=flag_values.process_id)
  if jax.process_index() == 0:
    devices = jax.devices()
    print(f"[dsan_jax] {jax.process_count()} process(es), {len(devices)} device(s): "
          f"{devices[0].platform} ({devices[0].device_kind})", flush=True)


def print_summary(summary: dict) -> None:
  if jax.process_index() != 0:
    return
  if summary.get("status") == "already_complete":
    print(f"[dsan_jax] already complete: {summary['variant']} fold {summary['fold']}, best epoch "
          f"{summary['best_epoch'] + 1}, val {summary['select_metric']} = "
          f"{_fmt(summary['best_metric'])}")
  elif summary.get("status") == "complete":
    print(f"[dsan_jax] done: {summary['variant']} fold {summary['fold']}, best epoch "
          f"{summary['best_epoch'] + 1}, val {summary['select_metric']} = "
          f"{_fmt(summary['best_metric'])} (validation AUC {_fmt(summary['best_val'].get('auc'))})")


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.4f}"


def run(app, main) -> None:
  """``app.run(main)``, with ``DsanError`` reported as ``error: <file>: <cause>`` and exit 2
  (75 for ``RunInProgressError``: the error's ``exit_code``)."""

  def wrapped(argv):
    try:
      return main(argv)
    except DsanError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print("interrupted; rerun the same command to resume", file=sys.stderr)
      sys.exit(130)

  app.run(wrapped)
