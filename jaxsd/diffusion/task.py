"""Training a diffusion model: the task the trainer runs for `jaxsd-train`
(`python -m jaxsd.main`).

The numerics are the jitted step (jaxsd/diffusion/step.py) that
`TrainSetup` (jaxsd/diffusion/setup.py) builds; this module supplies the
rest of the task: its data (images, or a latent cache), its checkpoint
metadata (fingerprints of a frozen autoencoder or LoRA base), and its
chores: a captioned sample grid and the evaluation of config.eval.metrics.
"""
import os
from typing import Any, Dict

from absl import logging
import jax
import numpy as np

from jaxsd import config_checks
from jaxsd import environment
from jaxsd.checkpointing import resume
from jaxsd.data import pipeline as data_pipeline
from jaxsd.diffusion import generate
from jaxsd.diffusion import setup as build
from jaxsd.evaluation import evaluator as evaluator_lib
from jaxsd.interop import sd_pipeline
from jaxsd.tracking import images as images_lib
from jaxsd.training import loop as loop_lib
from jaxsd.training import progress as progress_lib
from jaxsd.training import state as ts
from jaxsd.training import trainer


def eval_key(config, step: int):
  """The key of training's periodic evaluation at `step` (for reproducing
  it outside the run)."""
  keys = loop_lib.RunKeys.from_seed(config.training.seed)
  return jax.random.fold_in(keys.eval, step)


def load_training_data(config, components: build.Components, source=None):
  """(source, this process's loader) of the config's training data (`source`:
  the config's, when made already); with data.latent_cache the loader reads
  the cache (checked against the data and the autoencoder), the source
  stays the images' (previews, prompts)."""
  source = source or data_pipeline.make_source(config)
  read = source
  if config.data.latent_cache:
    read = data_pipeline.make_latent_cache_source(
        config, source, components.autoencoder,
        components.frozen_text_fingerprint())
  loader = data_pipeline.make_loader(
      config, components.tokenizer, read, process_index=jax.process_index(),
      process_count=jax.process_count(),
      bucket_shapes=data_pipeline.bucket_shapes(config,
                                                components.autoencoder))
  return source, loader


def grid_prompts(config, source, count: int = 8):
  """The periodic grid's prompts: sampling.prompts, else the first distinct
  captions of the training data."""
  return (list(config.sampling.prompts)
          or data_pipeline.first_captions(source, count))


def run_meta(components: build.Components) -> Dict[str, Any]:
  """What every checkpoint records of the run beyond its state: in latent
  runs the frozen autoencoder's fingerprint (an autoencoder workdir that
  trained on since would decode the latents differently)."""
  meta = {}
  if components.autoencoder is not None:
    meta["autoencoder_fingerprint"] = components.autoencoder.fingerprint()
  if components.lora is not None:
    # The adapters only mean something on the base they trained on.
    meta["lora_base_fingerprint"] = components.base_fingerprint()
  return meta


# run_meta's keys: what changed, if they differ.
RUN_META_WHAT = {
    "autoencoder_fingerprint": "model.autoencoder (the autoencoder changed "
                               "since this run started)",
    "lora_base_fingerprint": "LoRA base weights (model.pretrained_pipeline "
                             "or model.pretrained changed since this run "
                             "started)",
}


def _itemsize(tree) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  return leaves[0].dtype.itemsize if leaves else 0


def log_parameter_counts(config, state, step: int, writer, base=None):
  """Parameter counts; `base`: a LoRA run's frozen base (state.params are
  then its adapters, all trained)."""
  if base is not None:
    n_trainable = ts.param_count(state.params)
    n_total = ts.param_count(base) + n_trainable
    logging.info("Parameters: %d total: a frozen base (UNet %d, text %d) and "
                 "%d trainable LoRA adapters (UNet %d, text %d).", n_total,
                 ts.param_count(base["unet"]),
                 ts.param_count(base["text"]), n_trainable,
                 ts.param_count(state.params["unet"]),
                 ts.param_count(state.params["text"]))
  else:
    n_total = ts.param_count(state.params)
    n_trainable = ts.param_count(
        state.params if config.text.trainable else state.params["unet"])
    logging.info("Parameters: %d total (UNet %d, text %d), %d trainable.",
                 n_total, ts.param_count(state.params["unet"]),
                 ts.param_count(state.params["text"]), n_trainable)
  per_param = ts.state_bytes_per_param(state.opt_state, state.params)
  logging.info(
      "State per trained parameter: %.2f bytes of optimiser state "
      "(optim.optimizer=%s, moment_dtype=%s), %d of params, %d of EMA "
      "params.", per_param, config.optim.get("optimizer", "adamw"),
      config.optim.get("moment_dtype", "float32"),
      _itemsize(state.params), _itemsize(state.ema_params))
  if jax.process_index() == 0:
    writer.write_scalars(step, {"model/params_total": n_total,
                                "model/params_trainable": n_trainable,
                                "memory/optimizer_bytes_per_param":
                                    per_param})


# --- The chores ----------------------------------------------------------------


class WriteSampleGrid(loop_lib.Chore):
  """A captioned grid of `prompts` (written by process 0)."""
  interruptible = True

  def __init__(self, config, prompts, generator: generate.Generator,
               keys: loop_lib.RunKeys, workdir: str, writer,
               progress: progress_lib.Progress):
    super().__init__(config.training.eval_every)
    self.config, self.generator, self.keys = config, generator, keys
    self.prompts = list(prompts)
    self.workdir, self.writer, self.progress = workdir, writer, progress

  def __call__(self, loop: loop_lib.LoopState):
    with self.progress.excluded():  # not training time
      s = self.config.sampling
      prompts = [p for p in self.prompts for _ in range(s.samples_per_prompt)]
      params = loop.sampling_params(self.config, self.generator.mesh)
      images = self.generator(params, prompts,
                              jax.random.fold_in(self.keys.sample, loop.step))
      if jax.process_index() != 0:
        return
      ncols = (s.samples_per_prompt if len(self.prompts) > 10
               else len(self.prompts))
      grid = images_lib.captioned_grid(images, prompts, ncols=ncols)
      path = os.path.join(self.workdir, "samples",
                          f"step_{loop.step:08d}.png")
      images_lib.save_png_atomic(grid, path)
      self.writer.write_images(loop.step,
                               {"samples": np.asarray(grid)[None] / 255.0})
      logging.info("Wrote sample grid %s", path)


class Evaluate(loop_lib.Chore):
  """eval/* of config.eval.metrics. Every process samples its share (and
  runs the metrics that score the model, val_loss); the images are
  gathered and process 0 computes and logs the metrics."""
  interruptible = True

  def __init__(self, config, evaluator, generator: generate.Generator,
               keys: loop_lib.RunKeys, writer, progress: progress_lib.Progress):
    super().__init__(config.training.eval_every)
    self.config, self.evaluator, self.keys = config, evaluator, keys
    self.generator = generator.with_chunk_size(config.eval.chunk_size)
    self.writer, self.progress = writer, progress

  def __call__(self, loop: loop_lib.LoopState):
    with self.progress.excluded():
      params = loop.sampling_params(self.config, self.generator.mesh)
      metrics = evaluator_lib.evaluate_params(
          self.evaluator, self.generator, params,
          jax.random.fold_in(self.keys.eval, loop.step))
      if metrics is None:  # not process 0
        return
      self.writer.write_scalars(loop.step,
                                {f"eval/{k}": v for k, v in metrics.items()})
      logging.info("eval at step %d: %s", loop.step, ", ".join(
          f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k))


def make_evaluator(config):
  """The config's evaluator (its metrics checked against the data), or None
  when eval.metrics is empty. Nothing is loaded yet."""
  return evaluator_lib.Evaluator(config) if config.eval.metrics else None


def prepare_evaluator(evaluator):
  """Prepares the evaluator (process 0 loads every metric's networks, as it
  scores the samples; every process loads what the metrics that score the
  model, such as val_loss, need, as every process runs those).

  Returns the evaluator, or None when none of its metrics can run here
  (their weights missing offline): said once, and the run then has no
  evaluation chore, so it generates no images nothing would score.
  """
  if evaluator is None:
    return None
  with progress_lib.timed("eval setup (networks, reference statistics)"):
    runs = evaluator_lib.any_metric_runs(evaluator)
  if runs:
    return evaluator
  logging.warning(
      "%s; evaluation is off for this run (no images are generated for it). "
      "Make their weights available, or set eval.metrics=() to start without "
      "this warning.", evaluator_lib.nothing_runs_message(evaluator))
  return None


# --- The task -------------------------------------------------------------------


class DiffusionTask(trainer.Task):
  """A text-conditioned diffusion model (UNet and text encoder, in pixel or
  latent space, fully or through LoRA adapters)."""
  kind = "diffusion"
  metric_names = ("loss",)

  def __init__(self):
    self.evaluator = None

  def prepare_config(self, config):
    return sd_pipeline.resolve(environment.resolve(config))

  def validate(self, config):
    config_checks.validate(config)
    self.evaluator = make_evaluator(config)  # checks the metrics' data

  def grad_accum_steps(self, config) -> int:
    return config.optim.grad_accum_steps

  def build(self, config):
    return build.TrainSetup(config)

  def make_loader(self, config, setup, source):
    return load_training_data(config, setup.components, source)[1]

  def check_checkpoint(self, setup, meta, step):
    resume.check_run_meta(meta, run_meta(setup.components), step,
                          RUN_META_WHAT)

  def checkpoint_meta(self, run):
    meta = run_meta(run.setup.components)
    return lambda loop: meta

  def log_parameters(self, run, state):
    log_parameter_counts(run.config, state, run.start_step, run.writer,
                         run.setup.base_params)

  def chores(self, run):
    config = run.config
    evaluator = prepare_evaluator(self.evaluator)
    generator = generate.Generator.from_config(run.setup.components,
                                               run.setup.mesh, config.sampling)
    chores = [WriteSampleGrid(config, grid_prompts(config, run.source),
                              generator, run.keys, run.workdir, run.writer,
                              run.progress)]
    if evaluator is not None:
      chores.append(Evaluate(config, evaluator, generator, run.keys,
                             run.writer, run.progress))
    return chores

  def to_inference(self, setup):
    return setup.inference_params


def train_and_evaluate(config, workdir: str, hooks=()):
  """Trains config's diffusion model in workdir (the trainer's sequence,
  jaxsd/training/trainer.py); returns the final state, or None when a
  SIGTERM stopped the run before its loop or during an evaluation."""
  return trainer.train_and_evaluate(config, workdir, DiffusionTask(), hooks)
