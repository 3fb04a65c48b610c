"""Trains jaxsd's KL autoencoder, the latent space of a diffusion run.

jaxsd-train-autoencoder --config=configs/mnist_latent.py:autoencoder \
    --workdir=runs/ae [--config.autoencoder.kl_weight=1e-6 ...]

Trains config.autoencoder on config.data with training/optim/logging as
jaxsd-train does: orbax checkpoints with the loader's position (an existing
workdir is resumed), SIGTERM checkpoints then stops, a non-finite loss
stops without checkpointing, MLflow. Every training.eval_every steps and at
the end it writes a reconstruction grid (WORKDIR/samples/recon_step_*.png)
and eval/psnr (and eval/rfid, given the FID Inception weights) on
autoencoder.eval_images held-out images. A diffusion run then uses it with
--config.model.autoencoder=WORKDIR.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxsd.commands import cli

FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file (its autoencoder "
      "section).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and reconstruction "
                      "grids go here; an existing workdir is resumed.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  from jaxsd.autoencoder import task  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  task.train_autoencoder(FLAGS.config, FLAGS.workdir)


def run():
  """The `jaxsd-train-autoencoder` command (`python -m
  jaxsd.commands.train_autoencoder`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
