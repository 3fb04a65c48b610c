"""Errors that explain themselves: the commands print their message as one
line (no traceback) and exit 1.

Raise one of these for a fault the user can fix (a bad value, a busy or
damaged workdir, a full disk); anything else is a bug and keeps its
traceback.
"""


class JaxsdError(Exception):
  """A fault with a one-line explanation and fix (`cli.run` prints it)."""


class ConfigError(JaxsdError, ValueError):
  """A config value or command-line flag outside its valid range."""


class WorkdirBusyError(JaxsdError):
  """Another live process holds the workdir."""


class ResumeMismatchError(JaxsdError, ValueError):
  """The new config cannot resume the run saved in the workdir."""


class CheckpointError(JaxsdError):
  """A checkpoint cannot be read or written."""


class OutputExistsError(JaxsdError, FileExistsError):
  """An output is there already and the command was not told to replace
  it."""


class DataError(JaxsdError, ValueError):
  """The training data cannot be read as configured (a folder without
  images, an image without a caption, too many undecodable files)."""


class NotWritableError(JaxsdError, OSError):
  """A folder jaxsd must write to (the workdir, eval/) refuses writes."""


class NothingToEvaluateError(JaxsdError):
  """None of the metrics asked for can run on this machine."""


class TokenizerError(JaxsdError, ValueError):
  """A tokenizer folder jaxsd cannot read (names the folder and the files
  it expected)."""
