"""jaxsd training entry point.

python -m jaxsd.main --config=configs/mnist.py --workdir=runs/mnist \
    [--config.training.num_steps=1000 ...]
"""
from absl import flags

from jaxsd.commands import cli


def _define_flags():
  cli.define_training_flags(
      "Training configuration file.",
      "Checkpoints, logs and samples go here; an existing workdir is resumed.")
  flags.adopt_module_key_flags(cli)  # --help lists them as this command's


def main(argv):
  from jaxsd.diffusion import task  # pylint: disable=g-import-not-at-top
  cli.start_training(argv, task.train_and_evaluate)


def run():
  """The `jaxsd-train` command (`python -m jaxsd.main`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
