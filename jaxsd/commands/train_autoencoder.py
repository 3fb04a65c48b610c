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
from absl import flags

from jaxsd.commands import cli


def _define_flags():
  cli.define_training_flags(
      "Training configuration file (its autoencoder section).",
      "Checkpoints, logs and reconstruction grids go here; an existing "
      "workdir is resumed.")
  flags.adopt_module_key_flags(cli)  # --help lists them as this command's


def main(argv):
  from jaxsd.autoencoder import task  # pylint: disable=g-import-not-at-top
  cli.start_training(argv, task.train_autoencoder)


def run():
  """The `jaxsd-train-autoencoder` command (`python -m
  jaxsd.commands.train_autoencoder`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
