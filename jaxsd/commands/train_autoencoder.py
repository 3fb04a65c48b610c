"""Trains jaxsd's KL autoencoder, the latent space of a diffusion run.

jaxsd-train-autoencoder --config=configs/mnist.py --workdir=runs/ae \
    [--config.autoencoder.kl_weight=1e-6 ...]

Trains config.autoencoder on config.data with training/optim/logging as
jaxsd.commands.train does: orbax checkpoints with the loader's position (an existing
workdir is resumed), SIGTERM checkpoints then stops, a non-finite loss
stops without checkpointing, MLflow. Every training.eval_every steps and at
the end it writes a reconstruction grid (WORKDIR/samples/recon_step_*.png)
and eval/psnr (and eval/rfid, given the FID Inception weights) on
autoencoder.eval_images held-out images. A diffusion run then uses it with
--config.model.autoencoder=WORKDIR.
"""
import contextlib
import json
import os

from absl import flags
from absl import logging
import jax
import numpy as np
from ml_collections import config_flags

from jaxsd.autoencoder import training as at
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.commands import cli
from jaxsd import config_checks
from jaxsd import environment
from jaxsd import errors
from jaxsd.tracking import images as images_lib
from jaxsd.tracking import memory
from jaxsd.training import progress as progress_lib
from jaxsd import parallel
from jaxsd.text import encoder as text_lib
from jaxsd.training import trainer as train
from jaxsd.training import state as ts
from jaxsd.data import pipeline as data_pipeline
from jaxsd.hub import WeightsUnavailableError

FLAGS = flags.FLAGS
GRID_COLUMNS = 8  # held-out images shown in the reconstruction grid
METRICS = ("loss", "rec_loss", "kl", "g_loss", "d_loss")  # averaged per log


# --- Run set-up ---------------------------------------------------------------


def load_training_data(config):
  """(source, this process's loader) of the training images (the captions
  are tokenised by the loader but unused; data.latent_cache is not read:
  the autoencoder trains on images)."""
  tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
  source = data_pipeline.make_source(config)
  loader = data_pipeline.make_loader(
      config, tokenizer, source, process_index=jax.process_index(),
      process_count=jax.process_count())
  return source, loader


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


def restore_or_create_state(setup: at.AutoencoderSetup, mngr, rng, loader):
  """(state, step, training seconds so far): the newest readable
  checkpoint's, with the loader put where that run was, or a fresh state at
  step 0."""
  def restore(step):
    state, meta, step = setup.restore_train_state(mngr, step)
    if meta.get("run_kind") != at.RUN_KIND:
      raise errors.ResumeMismatchError(
          f"{mngr.directory} holds checkpoints of another kind of run; give "
          "the autoencoder its own --workdir.")
    return state, meta, step

  restored = train.restore_newest_readable(mngr, restore)
  if restored is None:
    return setup.create_train_state(rng), 0, 0.0
  state, meta, step = restored
  data_pipeline.restore_state(loader, meta)
  logging.info("Resumed from checkpoint at step %d (data: %s).", step,
               json.dumps(loader.statistics()))
  return state, step, float(meta.get("train_seconds", 0.0))


# --- The periodic chores ------------------------------------------------------


class LogProgress(train.Chore):
  """train/* and system/* scalars and the console line (process 0)."""

  def __init__(self, config, writer, loader, progress):
    super().__init__(config.training.log_every)
    self.writer, self.loader, self.progress = writer, loader, progress
    self.max_skipped = config.data.max_skipped_fraction
    self.lr_fn = ts.learning_rate_schedule(config.optim,
                                           config.training.num_steps)

  def __call__(self, loop: train.LoopState):
    data_pipeline.check_skipped(self.loader, self.max_skipped)
    if jax.process_index() != 0:
      return
    scalars = {f"train/{name}": float(np.mean([m[name] for _, m in
                                               loop.metrics]))
               for name in METRICS}
    scalars.update({
        "train/grad_norm": loop.metrics[-1][1]["grad_norm"],
        "train/learning_rate": float(self.lr_fn(loop.step - 1)),
        "system/memory_gb": memory.memory_gb(),
        "system/peak_memory_gb": memory.peak_memory_gb(),
        "data/skipped": self.loader.statistics()["skipped"],
        **self.progress.update(loop.step)})
    self.writer.write_scalars(loop.step, scalars)
    logging.info("%s rec %.4f kl %.1f", self.progress.line(loop.step, scalars),
                 scalars["train/rec_loss"], scalars["train/kl"])


class SaveCheckpoint(train.Chore):
  """The state, the loader's position and the autoencoder's config with its
  scaling factor (measured on fixed training images when
  autoencoder.scaling_factor = 0); also when preempted."""

  def __init__(self, config, mngr, loader, progress, scale_images,
               reconstruct, writer):
    super().__init__(config.training.checkpoint_every)
    self.config, self.mngr = config, mngr
    self.loader, self.progress, self.writer = loader, progress, writer
    self.scale_images, self.reconstruct = scale_images, reconstruct

  def due(self, loop: train.LoopState) -> bool:
    return super().due(loop) or loop.preempted

  def scaling_factor(self, loop: train.LoopState) -> float:
    configured = self.config.autoencoder.scaling_factor
    if configured:
      return float(configured)
    with self.progress.excluded():
      _, means = self.reconstruct(loop.state.params["autoencoder"],
                                  self.scale_images)
    scale = at.measure_scaling_factor(means)
    logging.info("Measured scaling_factor %.5f at step %d.", scale, loop.step)
    if jax.process_index() == 0:
      self.writer.write_scalars(loop.step,
                                {"autoencoder/scaling_factor": scale})
    return scale

  def __call__(self, loop: train.LoopState):
    ae_config = at.autoencoder_config(self.config, self.scaling_factor(loop))
    checkpoint.save(self.mngr, loop.step, loop.state, {
        "step": loop.step, **at.checkpoint_meta(ae_config),
        **data_pipeline.checkpoint_state(self.loader),
        "train_seconds": self.progress.train_seconds,
        "rng_seed": self.config.training.seed,
        "config": self.config.to_dict()})


def reconstruction_grid(images, recon):
  """Held-out images in the top row, their reconstructions below."""
  n = min(GRID_COLUMNS, len(images))
  cells = np.concatenate([images[:n], np.clip(recon[:n], -1.0, 1.0)])
  return images_lib.captioned_grid(
      cells, ["input"] * n + ["recon"] * n, ncols=n, cell_size=64)


class EvaluateReconstructions(train.Chore):
  """eval/psnr (and eval/rfid) of the held-out images' reconstructions and
  their grid (process 0 writes)."""
  interruptible = True

  def __init__(self, config, images, reconstruct, inception, workdir, writer,
               progress):
    super().__init__(config.training.eval_every)
    self.images, self.reconstruct, self.inception = (images, reconstruct,
                                                     inception)
    self.workdir, self.writer, self.progress = workdir, writer, progress

  def __call__(self, loop: train.LoopState):
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


# --- The run ------------------------------------------------------------------


def train_autoencoder(config, workdir: str, hooks=()):
  """Trains config.autoencoder in workdir, resuming from its latest
  checkpoint; returns the final AutoencoderTrainState (None when a SIGTERM
  stopped it during start-up). Checks everything before writing anything,
  as jaxsd.commands.train does."""
  preemption = train._Preemption()  # pylint: disable=protected-access
  try:
    return _train(config, workdir, preemption, hooks)
  except train.Preempted:
    logging.warning("Stopped by SIGTERM; the next start resumes from the "
                    "last checkpoint.")
    return None
  finally:
    preemption.restore()


def _train(config, workdir: str, preemption, hooks=()):
  config = environment.resolve(config)
  config_checks.validate_autoencoder(config)
  train.start_runtime(config)
  tcfg = config.training
  preemption.sync_every = tcfg.log_every
  parallel.check_batch_size(tcfg.batch_size)
  train.check_resume(config, workdir, kind="autoencoder")
  preemption.check()
  with contextlib.ExitStack() as stack:
    stack.enter_context(train.holding_workdir(workdir, preemption))
    setup = at.AutoencoderSetup(config)
    logging.info("%d processes, %d devices (%s)", jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    source, loader = load_training_data(config)
    stack.callback(loader.close)
    preemption.check()
    writer, status = stack.enter_context(
        train.run_session(config, workdir, preemption))
    if jax.process_index() == 0:
      at.write_run_file(workdir, setup.ae_config)
    keys = train.RunKeys.from_seed(tcfg.seed)
    mngr = checkpoint.manager(workdir, keep=tcfg.keep_checkpoints)
    stack.callback(train.close_manager, mngr)
    state, start_step, train_seconds = restore_or_create_state(
        setup, mngr, keys.init, loader)
    preemption.check()
    train.show_data(config, source, loader, start_step, writer)
    logging.info("Parameters: autoencoder %d, discriminator %d.",
                 *(int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(
                     state.params[k]))) for k in ("autoencoder",
                                                  "discriminator")))
    train_step = setup.make_train_step()
    reconstruct = at.make_reconstruct_fn(setup.model)
    heldout = heldout_images(config, source)
    # Fixed training images the scaling factor is measured on.
    scale_images = data_pipeline.preview(config, source,
                                         config.autoencoder.eval_images)[0]
    inception = load_inception(config) if jax.process_index() == 0 else None
    preemption.check()

    progress = progress_lib.Progress(start_step, tcfg.num_steps,
                                       train_seconds)
    save = SaveCheckpoint(config, mngr, loader, progress, scale_images,
                          reconstruct, writer)
    chores = [LogProgress(config, writer, loader, progress), save,
              EvaluateReconstructions(config, heldout, reconstruct, inception,
                                      workdir, writer, progress)]
    logging.info("Training the autoencoder from step %d to %d.", start_step,
                 tcfg.num_steps)
    return train.run_loop(
        state=state, start_step=start_step, num_steps=tcfg.num_steps,
        steps_per_call=1,
        next_batch=lambda: setup.global_batch(loader.next_batch()),
        train_step=train_step, train_key=keys.train, chores=chores,
        save=save, progress=progress, preemption=preemption, status=status,
        hooks=hooks)


# --- Command line -------------------------------------------------------------


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file (its autoencoder "
      "section).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and reconstruction "
                      "grids go here; an existing workdir is resumed.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxsd.commands import train as main_lib  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(main_lib._QuietLibraries())  # pylint: disable=protected-access
  logging.info("Config:\n%s", FLAGS.config)
  train_autoencoder(FLAGS.config, FLAGS.workdir)


def run():
  """The `jaxsd-train-autoencoder` command (`python -m
  jaxsd.commands.train_autoencoder`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
