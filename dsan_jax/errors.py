"""Errors that the command-line tools report as one line (file and cause), without a traceback."""


class DsanError(Exception):
  """Base class of expected, user-facing errors (bad input, bad config, no space...).

  ``exit_code``: the command-line tools' exit status for it (2 unless a subclass says otherwise).
  """
  exit_code = 2


class DataError(DsanError):
  """A data file or manifest is unusable. The message names the file and the cause."""

  def __init__(self, path, cause: str):
    self.path = str(path)
    self.cause = cause
    super().__init__(f"{self.path}: {cause}")


class ManifestError(DsanError):
  """A manifest has one or more bad rows; ``problems`` lists every one of them."""

  def __init__(self, manifest_path, problems: list[str]):
    self.manifest_path = str(manifest_path)
    self.problems = list(problems)
    if len(self.problems) == 1:  # One problem: one line, like every other error.
      super().__init__(f"{self.manifest_path}: {self.problems[0]}")
    else:
      lines = "\n".join(f"  - {p}" for p in self.problems)
      super().__init__(
          f"{self.manifest_path}: {len(self.problems)} problems found:\n{lines}")


class ConfigError(DsanError):
  """The configuration is inconsistent (e.g. batch not divisible by the device count)."""


class ResourceError(DsanError):
  """Not enough disk space, an unwritable work directory, ..."""


class RunInProgressError(DsanError):
  """Another live process owns the run folder (``dsan_jax.run_lock``). Exit status 75
  (``EX_TEMPFAIL``: try again later), so that a job script can tell it from a real error."""
  exit_code = 75
