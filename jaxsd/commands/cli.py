"""How jaxsd's commands start: flags defined on entry, help that lists them.

Each command in jaxsd/commands/ (train, sample, evaluate, ...) is flags,
then one call into the library that owns its concept. It defines its absl
flags in a function that only its entry point calls, so the modules import
together (tests, notebooks) without DuplicateFlagError over the names they
share (workdir, step, seed, ...).
"""
import logging as logging_std
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from jaxsd import errors

class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax and tfds (dozens of lines per checkpoint)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        lib in record.pathname for lib in ("/orbax/", "/tensorflow_datasets/"))


def quiet_libraries():
  """The training commands' console: orbax's and tfds's INFO lines off."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def define_training_flags(config_help: str, workdir_help: str):
  """--config (a config file, overridable field by field) and --workdir, the
  flags of the training commands."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, config_help,
                                  lock_config=True)
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
  app.run(_explaining(main))


def _explaining(main: Callable) -> Callable:
  """main, with a JaxsdError printed as one line (no traceback), exit 1."""
  def wrapped(argv):
    try:
      return main(argv)
    except errors.JaxsdError as e:
      sys.stderr.write(f"jaxsd: error: {e}\n")
      sys.stderr.flush()
      # In a multi-process run, stop the others now with this line (they
      # would wait for this process in their next collective). A run that
      # formed a process group has imported jaxsd.parallel.
      parallel = sys.modules.get("jaxsd.parallel")
      if parallel is not None:
        parallel.leave_process_group(str(e))
      sys.exit(1)
  return wrapped
