"""jaxsd training entry point.

python -m jaxsd.main --config=configs/mnist.py --workdir=runs/mnist \
    [--config.training.num_steps=1000 ...]
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go "
                      "here; an existing workdir is resumed.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  from jaxsd.diffusion import task  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  task.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  """The `jaxsd-train` command (`python -m jaxsd.main`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
