"""absl flags for the command lines of library modules (``python -m dsan_jax.predict``,
``python -m dsan_jax.data.synthetic``), in the style of ``train.py`` and ``evaluate.py``.

Each such command keeps its flags in a ``flags.FlagValues`` of its own, so importing the module
(the data pipeline imports the synthetic set; the tests import predict) adds nothing to the
global absl ``FLAGS`` of ``train.py``/``evaluate.py``. Deliberately free of JAX: the synthetic
set's worker processes import its module.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags


def dashed_alias(name: str, flag_values: flags.FlagValues) -> None:
  """Also accepts ``--a-b`` for the flag ``a_b`` (the spelling these commands always took)."""
  flags.DEFINE_alias(name.replace("_", "-"), name, flag_values=flag_values)


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, prog: str,
          description: str) -> int | None:
  """Parses ``argv`` (None -> ``sys.argv[1:]``) into ``flag_values``.

  Args:
    flag_values: the command's flags.
    argv: the arguments, without the program name.
    prog: the command, for the usage line.
    description: what it does, for ``--help``.

  Returns:
    None when the command should run; else its exit status after printing: 0 for ``--help``,
    2 for a usage error (one ``error:`` line on stderr, as before with argparse).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(f"usage: {prog} [flags]\n\n{description}\n\n{flag_values.get_help()}")
    return 0
  flag_values.unparse_flags()  # A second call in one process starts from the defaults again.
  try:
    rest = flag_values([prog, *argv])
  except flags.Error as e:
    print(f"usage: {prog} [flags] (--help lists them)\nerror: {e}", file=sys.stderr, flush=True)
    return 2
  if len(rest) > 1:
    print(f"usage: {prog} [flags]\nerror: unexpected arguments {rest[1:]}", file=sys.stderr,
          flush=True)
    return 2
  return None
