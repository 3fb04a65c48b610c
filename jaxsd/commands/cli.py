"""How jaxsd's commands start: flags defined on entry, help that lists them.

Each command in jaxsd/commands/ (train, sample, evaluate, ...) is flags,
then one call into the library that owns its concept. It defines its absl
flags in a function that only its entry point calls, so the modules import
together (tests, notebooks) without DuplicateFlagError over the names they
share (workdir, step, seed, ...).
"""
import logging as logging_std
import os
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging

from jaxsd import errors

class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and tfds (dozens of lines per checkpoint),
  and the tracebacks of orbax's errors: a failed save (a full disk) is
  logged by each of its writer threads and asyncio tasks, and jaxsd's own
  one-line error says what happened and what to do."""

  def filter(self, record):
    if record.name == "asyncio" and "/orbax/" in record.getMessage():
      return False  # the failed save's tasks, reported again when collected
    if not any(lib in record.pathname
               for lib in ("/orbax/", "/tensorflow_datasets/")):
      return True
    if record.levelno < logging_std.WARNING:
      return False
    if "/orbax/" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


def quiet_libraries():
  """The training commands' console: orbax's and tfds's INFO lines off."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


# Flags naming a config file (define_config_file_flag): `run` checks their
# files exist before absl parses anything.
_CONFIG_FILE_FLAGS = set()


def define_config_file_flag(name: str, help_text: str):
  """--name=FILE[:arg]: a Python config file, overridable field by field
  (--name.section.key=value)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(name, None, help_text, lock_config=True)
  _CONFIG_FILE_FLAGS.add(name)


def define_training_flags(config_help: str, workdir_help: str):
  """--config (a config file, overridable field by field) and --workdir, the
  flags of the training commands."""
  define_config_file_flag("config", config_help)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])


def start_training(argv, train: Callable):
  """A training command's main: train(config, workdir) from its flags."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_libraries()
  logging.info("Config:\n%s", flags.FLAGS.config)
  train(flags.FLAGS.config, flags.FLAGS.workdir)


_SHORT_HELP = ("--help", "-help", "--helpshort", "-helpshort", "-?")
_FULL_HELP = ("--helpfull", "-helpfull")


def _help_asked(argv) -> str:
  """"short", "full" or "" for the first help flag before any "--"."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _SHORT_HELP:
      return "short"
    if arg in _FULL_HELP:
      return "full"
  return ""


def define_sampler_flags():
  """The sampling flags jaxsd-sample and jaxsd-evaluate share; each
  defaults to the run's own `sampling` setting."""
  flags.DEFINE_string("sampler", None, "ddpm | ddim | dpmpp_2m "
                      "(default: the run's sampling.sampler).")
  flags.DEFINE_integer("steps", None, "Sampler steps (default: the run's).")
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance "
                     "scale; 1 = no guidance (default: the run's).")
  flags.DEFINE_list("guidance_interval", None, "lo,hi: guide only there "
                    "(fractions of the diffusion time; default: the run's).")
  flags.DEFINE_integer("seed", 0, "Random seed: same seed, prompts and "
                       "checkpoint give the same images.")
  flags.DEFINE_bool("use_ema", True, "EMA parameters (--nouse_ema: raw ones).")


def run(main: Callable, define_flags: Callable[[], None]):
  """Defines a command's flags, then runs `main(argv)` under absl.

  `--help` prints the command's docstring and its own flags on stdout and
  exits 0 (absl exits 1), also when started through a console script, whose
  `__main__` is a wrapper that absl would take for the command.
  """
  # jaxsd never runs PyTorch, but transformers and diffusers import it when
  # installed (a test-time oracle here, common beside jaxsd): 2 s of every
  # command's start (2-core AMD EPYC, 2026-12-06). A value the user set wins.
  os.environ.setdefault("USE_TORCH", "0")
  define_flags()
  command = sys.modules[define_flags.__module__]
  # absl files flags under the defining module's name, or sys.argv[0] when
  # that module is __main__ (python -m); its --help lists sys.argv[0]'s.
  key = (sys.argv[0] if command.__name__ == "__main__"
         else command.__name__)
  if key != sys.argv[0]:
    for flag in flags.FLAGS.get_key_flags_for_module(key):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  asked = _help_asked(sys.argv)
  if asked:
    sys.stdout.write(command.__doc__ or f"\nUSAGE: {sys.argv[0]} [flags]\n")
    sys.stdout.write("\nflags:\n")
    sys.stdout.write(flags.FLAGS.module_help(key) if asked == "short"
                     else flags.FLAGS.get_help())
    sys.stdout.write("\n")
    if asked == "short":
      sys.stdout.write("\nTry --helpfull to get a list of all flags.\n")
    sys.exit(0)
  missing = _missing_config_file(sys.argv)
  if missing:
    _exit_with(missing)
  app.run(_explaining(main))


def _missing_config_file(argv) -> Optional[errors.ConfigError]:
  """The error for a config-file flag in argv whose file is not there.

  Checked before absl parses the flags: ml_collections turns a missing file
  into a config that raises on first use (a 50-line stack from wherever that
  is), or, with a --config.x override, into a stack from the flag parser.
  """
  names = [name for name in _CONFIG_FILE_FLAGS if name in flags.FLAGS]
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    for name in names:
      value = None
      if arg.startswith((f"--{name}=", f"-{name}=")):
        value = arg.split("=", 1)[1]
      elif arg in (f"--{name}", f"-{name}") and i + 1 < len(args):
        value = args[i + 1]
      if value is None:
        continue
      path = value.split(":", 1)[0]
      if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        return errors.ConfigError(
            f"--{name}={value}: the config file {path!r} {what} (relative "
            f"paths start at {os.getcwd()}); give a Python config file with "
            f"get_config(), e.g. --{name}=configs/mnist.py.")
  return None


def _exit_with(error: errors.JaxsdError):
  """Prints `error` as one line on stderr and exits 1 (a message that
  quotes a library's several lines is joined into one)."""
  text = " ".join(line.strip() for line in str(error).splitlines()
                  if line.strip())
  sys.stderr.write(f"jaxsd: error: {text}\n")
  sys.stderr.flush()
  # In a multi-process run, stop the others now with this line (they would
  # wait for this process in their next collective). A run that formed a
  # process group has imported jaxsd.parallel.
  parallel = sys.modules.get("jaxsd.parallel")
  if parallel is not None:
    parallel.leave_process_group(text)
  sys.exit(1)


def _explaining(main: Callable) -> Callable:
  """main, with a JaxsdError printed as one line (no traceback), exit 1."""
  def wrapped(argv):
    try:
      return main(argv)
    except errors.JaxsdError as e:
      _exit_with(e)
  return wrapped
