"""Training jaxsd's KL autoencoder: the task the trainer runs for
`jaxsd-train-autoencoder`, the latent space of a later diffusion run.

The numerics (state, losses, patch discriminator, jitted step) are
jaxsd/autoencoder/training.py; this module supplies the rest: the run's
file (autoencoder.json), the checkpoints' autoencoder config with its
scaling factor (measured on fixed training images when
autoencoder.scaling_factor is 0), and a chore that writes a reconstruction
grid (WORKDIR/samples/recon_step_*.png) and eval/psnr (and eval/rfid, given
the FID Inception weights) on autoencoder.eval_images held-out images.
"""
import os

from absl import logging
import jax
import numpy as np

from jaxsd import config_checks
from jaxsd import environment
from jaxsd.autoencoder import training as at
from jaxsd.data import pipeline as data_pipeline
from jaxsd.hub import WeightsUnavailableError
from jaxsd.text import encoder as text_lib
from jaxsd.tracking import images as images_lib
from jaxsd.training import loop as loop_lib
from jaxsd.training import state as ts
from jaxsd.training import trainer

GRID_COLUMNS = 8  # held-out images shown in the reconstruction grid
METRICS = ("loss", "rec_loss", "kl", "g_loss", "d_loss")  # averaged per log


def heldout_images(config, train_source) -> np.ndarray:
  """autoencoder.eval_images images of eval.reference_split, float32 [n, S,
  S, C] in [-1, 1]; the training data's first ones (with a warning) when
  the source has no such split."""
  n = config.autoencoder.eval_images
  split = config.eval.reference_split
  try:
    source = data_pipeline.make_source(config, split or None)
    return data_pipeline.preview(config, source, n)[0]
  except (ValueError, KeyError, OSError) as e:
    logging.warning("No held-out split %r (%s): eval/psnr and eval/rfid use "
                    "the first %d training images instead.", split, e, n)
    return data_pipeline.preview(config, train_source, n)[0]


def load_inception(config):
  """The FID Inception for eval/rfid, or None (logged once) without its
  weights (offline)."""
  from jaxsd.evaluation import inception  # pylint: disable=g-import-not-at-top
  cache_dir = config.eval.cache_dir or environment.cache_dir()
  try:
    return inception.load_fid_inception(
        config.eval.inception_weights or None, cache_dir=cache_dir)
  except WeightsUnavailableError as e:
    logging.warning("eval/rfid skipped: no FID Inception weights (%s); set "
                    "eval.inception_weights to %s.", e,
                    inception.FID_WEIGHTS_FILE)
    return None


def reconstruction_grid(images, recon):
  """Held-out images in the top row, their reconstructions below."""
  n = min(GRID_COLUMNS, len(images))
  cells = np.concatenate([images[:n], np.clip(recon[:n], -1.0, 1.0)])
  return images_lib.captioned_grid(
      cells, ["input"] * n + ["recon"] * n, ncols=n, cell_size=64)


class EvaluateReconstructions(loop_lib.Chore):
  """eval/psnr (and eval/rfid) of the held-out images' reconstructions and
  their grid (process 0 writes)."""
  interruptible = True

  def __init__(self, config, images, reconstruct, inception, workdir, writer,
               progress):
    super().__init__(config.training.eval_every)
    self.images, self.reconstruct, self.inception = (images, reconstruct,
                                                     inception)
    self.workdir, self.writer, self.progress = workdir, writer, progress

  def __call__(self, loop: loop_lib.LoopState):
    with self.progress.excluded():
      recon, _ = self.reconstruct(loop.state.params["autoencoder"],
                                  self.images)
      if jax.process_index() != 0:
        return
      metrics = {"eval/psnr": at.psnr(self.images, recon)}
      if self.inception is not None and len(self.images) > 1:
        from jaxsd.evaluation import fid  # pylint: disable=g-import-not-at-top
        metrics["eval/rfid"] = fid.fid_from_features(
            self.inception(self.images), self.inception(np.clip(recon, -1, 1)))
      self.writer.write_scalars(loop.step, metrics)
      grid = reconstruction_grid(self.images, recon)
      path = os.path.join(self.workdir, "samples",
                          f"recon_step_{loop.step:08d}.png")
      images_lib.save_png_atomic(grid, path)
      self.writer.write_images(
          loop.step, {"reconstructions": np.asarray(grid)[None] / 255.0})
      logging.info("eval at step %d: %s; wrote %s", loop.step, ", ".join(
          f"{k}={v:.4g}" for k, v in metrics.items()), path)


class AutoencoderTask(trainer.Task):
  """config.autoencoder on config.data's images (their captions unused;
  data.latent_cache is not read)."""
  kind = at.RUN_KIND
  metric_names = METRICS

  def __init__(self):
    self.reconstruct = None

  def prepare_config(self, config):
    return environment.resolve(config)

  def validate(self, config):
    config_checks.validate_autoencoder(config)

  def build(self, config):
    return at.AutoencoderSetup(config)

  def make_loader(self, config, setup, source):
    tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
    return data_pipeline.make_loader(
        config, tokenizer, source, process_index=jax.process_index(),
        process_count=jax.process_count())

  def start_session(self, workdir, setup):
    if jax.process_index() == 0:
      at.write_run_file(workdir, setup.ae_config)

  def checkpoint_meta(self, run):
    config, writer, progress = run.config, run.writer, run.progress
    # Fixed training images the scaling factor is measured on.
    scale_images = data_pipeline.preview(config, run.source,
                                         config.autoencoder.eval_images)[0]

    def meta(loop):
      scale = config.autoencoder.scaling_factor
      if not scale:
        with progress.excluded():
          _, means = self.reconstruct(loop.state.params["autoencoder"],
                                      scale_images)
        scale = at.measure_scaling_factor(means)
        logging.info("Measured scaling_factor %.5f at step %d.", scale,
                     loop.step)
        if jax.process_index() == 0:
          writer.write_scalars(loop.step,
                               {"autoencoder/scaling_factor": scale})
      return at.checkpoint_meta(at.autoencoder_config(config, float(scale)))
    return meta

  def log_parameters(self, run, state):
    logging.info("Parameters: autoencoder %d, discriminator %d.",
                 *(ts.param_count(state.params[k])
                   for k in ("autoencoder", "discriminator")))

  def console_extra(self, scalars):
    return f"rec {scalars['train/rec_loss']:.4f} kl {scalars['train/kl']:.1f}"

  def chores(self, run):
    self.reconstruct = at.make_reconstruct_fn(run.setup.model)
    heldout = heldout_images(run.config, run.source)
    inception = (load_inception(run.config) if jax.process_index() == 0
                 else None)
    return [EvaluateReconstructions(run.config, heldout, self.reconstruct,
                                    inception, run.workdir, run.writer,
                                    run.progress)]


def train_autoencoder(config, workdir: str, hooks=()):
  """Trains config.autoencoder in workdir, resuming from its latest
  checkpoint; returns the final AutoencoderTrainState (None when a SIGTERM
  stopped it during start-up). Checks everything before writing anything,
  as every run of the trainer does."""
  return trainer.train_and_evaluate(config, workdir, AutoencoderTask(), hooks)
