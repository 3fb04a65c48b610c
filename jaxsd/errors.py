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


class TokenizerError(JaxsdError, ValueError):
  """A tokenizer folder jaxsd cannot read (names the folder and the files
  it expected)."""
