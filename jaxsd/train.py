"""Training and periodic evaluation: the host-side loop.

The numerics live in train_step.py (jitted, pure) and are assembled by
build.TrainSetup; this file runs them: data, checkpoints, logging,
preemption, sample grids and evaluation. `train_and_evaluate` reads as the
sequence of a run; the periodic chores are small `Chore`s called after the
steps they are due at.
"""
import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from jaxsd import build
from jaxsd import checkpoint
from jaxsd import config_checks
from jaxsd import environment
from jaxsd import generate
from jaxsd import images as images_lib
from jaxsd.data import pipeline as data_pipeline
from jaxsd import metric_logging
from jaxsd import parallel
from jaxsd import sd_pipeline
from jaxsd import train_state as ts
from jaxsd.evaluation import evaluator as evaluator_lib

CONFIG_FILE = build.CONFIG_FILE


class NonFiniteLossError(FloatingPointError):
  pass


# --- Run set-up -------------------------------------------------------------


def enable_compilation_cache():
  """Persistent XLA cache: a second run of the same config skips compiling."""
  cache_dir = environment.compilation_cache_dir()
  if cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def start_runtime(config):
  """Process-wide settings, once, before JAX or TensorFlow start."""
  parallel.hide_gpus_from_tensorflow()
  parallel.split_cpu_into_devices(config.parallel.cpu_devices)
  parallel.maybe_initialize_distributed(config.parallel.distributed)
  enable_compilation_cache()


def save_config(config, workdir: str):
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


@dataclasses.dataclass(frozen=True)
class RunKeys:
  """The run's random keys, all derived from training.seed."""
  init: Any  # parameter initialisation
  train: Any  # the step folds in its step number
  sample: Any  # periodic sample grids fold in the step
  eval: Any  # periodic evaluation folds in the step

  @classmethod
  def from_seed(cls, seed: int) -> "RunKeys":
    init, train, sample = jax.random.split(jax.random.key(seed), 3)
    return cls(init=init, train=train, sample=sample,
               eval=jax.random.fold_in(sample, 1 << 20))


def eval_key(config, step: int):
  """The key of training's periodic evaluation at `step` (for reproducing
  it outside the run)."""
  return jax.random.fold_in(RunKeys.from_seed(config.training.seed).eval, step)


def load_training_data(config, components: build.Components):
  """(source, this process's loader) of the config's training data; with
  data.latent_cache the loader reads the cache (checked against the data
  and the autoencoder), the source stays the images' (previews, prompts)."""
  source = data_pipeline.make_source(config)
  read = source
  if config.data.latent_cache:
    read = data_pipeline.make_latent_cache_source(
        config, source, components.autoencoder,
        components.frozen_text_fingerprint())
  loader = data_pipeline.make_loader(
      config, components.tokenizer, read, process_index=jax.process_index(),
      process_count=jax.process_count())
  return source, loader


def show_data(config, source, loader, step: int, writer):
  """Logs the data's statistics and a captioned grid of a few training
  examples (process 0), so a run shows what the model sees."""
  stats = data_pipeline.statistics(source, loader)
  logging.info("Train data: %s", json.dumps(stats))
  if jax.process_index() != 0:
    return
  writer.write_scalars(step, {f"data/{k}": v for k, v in stats.items()})
  images, captions = data_pipeline.preview(config, source)
  grid = images_lib.captioned_grid(images, captions, ncols=len(captions))
  writer.write_images(step, {"data/examples": np.asarray(grid)[None] / 255.0})


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
_RUN_META_WHAT = {
    "autoencoder_fingerprint": "model.autoencoder (the autoencoder changed "
                               "since this run started)",
    "lora_base_fingerprint": "LoRA base weights (model.pretrained_pipeline "
                             "or model.pretrained changed since this run "
                             "started)",
}


def check_run_meta(meta: Dict[str, Any], expected: Dict[str, Any], step: int):
  for key, value in expected.items():
    if key in meta and meta[key] != value:
      what = _RUN_META_WHAT.get(key, key)
      raise ValueError(
          f"The checkpoint of step {step} was trained with other {what}: "
          f"{key} {meta[key]}, now {value}. Point the config at what it "
          "trained with, or start a new --workdir.")


def restore_or_create_state(setup: build.TrainSetup, mngr, rng, loader):
  """(state, step, training seconds so far): the latest checkpoint's, with
  the loader put where that run was, or a fresh state at step 0."""
  if mngr.latest_step() is None:
    return setup.create_train_state(rng), 0, 0.0
  state, meta, step = setup.restore_train_state(mngr)
  check_run_meta(meta, run_meta(setup.components), step)
  data_pipeline.restore_state(loader, meta)
  logging.info("Resumed from checkpoint at step %d (data: %s).", step,
               json.dumps(loader.statistics()))
  return state, step, float(meta.get("train_seconds", 0.0))


def log_parameter_counts(config, state, step: int, writer, base=None):
  """Parameter counts; `base`: a LoRA run's frozen base (state.params are
  then its adapters, all trained)."""
  if base is not None:
    n_trainable = build.param_count(state.params)
    n_total = build.param_count(base) + n_trainable
    logging.info("Parameters: %d total: a frozen base (UNet %d, text %d) and "
                 "%d trainable LoRA adapters (UNet %d, text %d).", n_total,
                 build.param_count(base["unet"]),
                 build.param_count(base["text"]), n_trainable,
                 build.param_count(state.params["unet"]),
                 build.param_count(state.params["text"]))
  else:
    n_total = build.param_count(state.params)
    n_trainable = build.param_count(
        state.params if config.text.trainable else state.params["unet"])
    logging.info("Parameters: %d total (UNet %d, text %d), %d trainable.",
                 n_total, build.param_count(state.params["unet"]),
                 build.param_count(state.params["text"]), n_trainable)
  if jax.process_index() == 0:
    writer.write_scalars(step, {"model/params_total": n_total,
                                "model/params_trainable": n_trainable})


class _Preemption:
  """SIGTERM (SLURM preemption, `scancel`) asks the loop to checkpoint and stop.

  With several processes the flag is shared every `sync_every` steps (an
  all-gather at steps that wait for the device anyway), so all processes stop
  at the same step even if only some received the signal.
  """

  def __init__(self, sync_every: int = 1):
    self._flag = False
    self._sync_every = sync_every
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing, then stopping.")
    self._flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag
    if step % self._sync_every:
      return False
    return parallel.any_process(self._flag)

  def restore(self):
    # None: the previous handler was not set from Python; default it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None
                  else self._previous)


# --- The periodic chores ------------------------------------------------------


@dataclasses.dataclass
class LoopState:
  """What the chores see after a call of the step."""
  step: int
  state: Any
  last: bool  # the final step of the run
  preempted: bool
  # (step, {name: value}) of every step since the last chore ran.
  metrics: List[Tuple[int, Dict[str, float]]] = dataclasses.field(
      default_factory=list)
  _sampling_params: Any = None

  # trained params -> the weights sampling uses (a LoRA run's merge).
  to_inference: Optional[Callable[[Any], Any]] = None

  def sampling_params(self, config, mesh):
    """EMA (or raw) parameters, replicated (gathered once under FSDP); a
    LoRA run's merged into its base."""
    if self._sampling_params is None:
      params = (self.state.ema_params if config.sampling.use_ema
                else self.state.params)
      params = parallel.gather_replicated(params, mesh)
      self._sampling_params = (self.to_inference(params) if self.to_inference
                               else params)
    return self._sampling_params


class Chore:
  """Runs every `every` steps and after the last one."""

  def __init__(self, every: int):
    self.every = every

  def due(self, loop: LoopState) -> bool:
    return loop.step % self.every == 0 or loop.last

  def __call__(self, loop: LoopState):
    raise NotImplementedError


class LogProgress(Chore):
  """train/*, system/* and data/skipped scalars, one console line (process
  0); stops the run when too many images did not decode (every process)."""

  def __init__(self, config, writer, loader, progress: metric_logging.Progress):
    super().__init__(config.training.log_every)
    self.writer, self.loader, self.progress = writer, loader, progress
    self.max_skipped = config.data.max_skipped_fraction
    self.lr_fn = ts.learning_rate_schedule(config.optim,
                                           config.training.num_steps)

  def __call__(self, loop: LoopState):
    data_pipeline.check_skipped(self.loader, self.max_skipped)
    if jax.process_index() != 0:
      return
    scalars = {
        "train/loss": float(np.mean([m["loss"] for _, m in loop.metrics])),
        "train/grad_norm": loop.metrics[-1][1]["grad_norm"],
        "train/learning_rate": float(self.lr_fn(loop.step - 1)),
        "system/memory_gb": metric_logging.memory_gb(),
        "system/peak_memory_gb": metric_logging.peak_memory_gb(),
        "data/skipped": self.loader.statistics()["skipped"],
        **self.progress.update(loop.step)}
    self.writer.write_scalars(loop.step, scalars)
    logging.info(self.progress.line(loop.step, scalars))


class SaveCheckpoint(Chore):
  """The state and the loader's position; also when preempted."""

  def __init__(self, config, mngr, loader, progress: metric_logging.Progress,
               extra_meta: Optional[Dict[str, Any]] = None):
    super().__init__(config.training.checkpoint_every)
    self.config, self.mngr, self.loader = config, mngr, loader
    self.progress = progress
    self.extra_meta = dict(extra_meta or {})

  def due(self, loop: LoopState) -> bool:
    return super().due(loop) or loop.preempted

  def __call__(self, loop: LoopState):
    checkpoint.save(self.mngr, loop.step, loop.state, {
        "step": loop.step, **data_pipeline.checkpoint_state(self.loader),
        "train_seconds": self.progress.train_seconds,
        "rng_seed": self.config.training.seed,
        "config": self.config.to_dict(), **self.extra_meta})


class WriteSampleGrid(Chore):
  """A captioned grid of `prompts` (written by process 0)."""

  def __init__(self, config, prompts, generator: generate.Generator,
               keys: RunKeys, workdir: str, writer,
               progress: metric_logging.Progress):
    super().__init__(config.training.eval_every)
    self.config, self.generator, self.keys = config, generator, keys
    self.prompts = list(prompts)
    self.workdir, self.writer, self.progress = workdir, writer, progress

  def __call__(self, loop: LoopState):
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


class Evaluate(Chore):
  """eval/* of config.eval.metrics. Every process samples its share; the
  images are gathered and process 0 computes and logs the metrics."""

  def __init__(self, config, evaluator, generator: generate.Generator,
               keys: RunKeys, writer, progress: metric_logging.Progress):
    super().__init__(config.training.eval_every)
    self.config, self.evaluator, self.keys = config, evaluator, keys
    self.generator = generator.with_chunk_size(config.eval.chunk_size)
    self.writer, self.progress = writer, progress

  def __call__(self, loop: LoopState):
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
  """Loads the evaluator's networks on process 0, the one that scores."""
  if evaluator is not None and jax.process_index() == 0:
    with metric_logging.timed("eval setup (networks, reference statistics)"):
      evaluator.prepare()


def _check_finite(fetched: List[Tuple[int, Dict[str, Any]]]):
  for step, metrics in fetched:
    for name, value in metrics.items():
      if not np.isfinite(value):
        raise NonFiniteLossError(
            f"train/{name} became {value} at step {step}; stopping without "
            "checkpointing this state. The last good checkpoint is kept: lower "
            "optim.learning_rate or enable optim.grad_clip_norm and resume.")


def _fetch_metrics(pending_device) -> List[Tuple[int, Dict[str, float]]]:
  """Device metrics (possibly [steps_per_call]-stacked) -> per-step floats."""
  out = []
  for first_step, metrics in jax.device_get(pending_device):
    values = {k: np.atleast_1d(v) for k, v in metrics.items()}
    for i in range(len(next(iter(values.values())))):
      out.append((first_step + i, {k: float(v[i]) for k, v in values.items()}))
  return out


class RunStatus:
  """The status MLflow records when a run ends; the loop sets KILLED when
  it stops for a preemption."""

  def __init__(self):
    self.value = "FINISHED"


@contextlib.contextmanager
def closing_run(loader, preemption, mngr, writer, mlflow_writer):
  """Closes what a run opened, whatever ends it, and records its status:
  FAILED on any error, KILLED on Ctrl-C (shared by jaxsd.train_autoencoder).
  """
  status = RunStatus()
  try:
    yield status
  except KeyboardInterrupt:
    status.value = "KILLED"
    raise
  except Exception:
    status.value = "FAILED"
    raise
  finally:
    loader.close()
    preemption.restore()
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    if mlflow_writer is not None:
      mlflow_writer.close(status.value)


# --- The run --------------------------------------------------------------------


def train_and_evaluate(config, workdir: str):
  """Trains config's model in workdir, resuming from its latest checkpoint."""
  config = sd_pipeline.resolve(environment.resolve(config))
  config_checks.validate(config)
  evaluator = make_evaluator(config)
  start_runtime(config)
  os.makedirs(workdir, exist_ok=True)
  tcfg = config.training
  parallel.check_batch_size(tcfg.batch_size, config.optim.grad_accum_steps)
  setup = build.TrainSetup(config)
  logging.info("%d processes, %d devices (%s)", jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  save_config(config, workdir)
  writer, mlflow_writer = metric_logging.create_writers(config, workdir)
  if jax.process_index() == 0:
    writer.write_hparams(config.to_dict())

  source, loader = load_training_data(config, setup.components)
  keys = RunKeys.from_seed(tcfg.seed)
  mngr = checkpoint.manager(workdir, keep=tcfg.keep_checkpoints)
  state, start_step, train_seconds = restore_or_create_state(
      setup, mngr, keys.init, loader)
  show_data(config, source, loader, start_step, writer)
  log_parameter_counts(config, state, start_step, writer, setup.base_params)
  train_step = setup.make_train_step()
  prepare_evaluator(evaluator)

  k = setup.steps_per_call
  def next_batch():
    return setup.global_batch(data_pipeline.next_model_batch(loader, k))

  progress = metric_logging.Progress(start_step, tcfg.num_steps, train_seconds)
  generator = generate.Generator.from_config(setup.components, setup.mesh,
                                             config.sampling)
  chores = [LogProgress(config, writer, loader, progress),
            SaveCheckpoint(config, mngr, loader, progress,
                           run_meta(setup.components)),
            WriteSampleGrid(config, grid_prompts(config, source), generator,
                            keys, workdir, writer, progress)]
  if evaluator is not None:
    chores.append(Evaluate(config, evaluator, generator, keys, writer,
                           progress))
  preemption = _Preemption(sync_every=tcfg.log_every)
  pending = []  # (first step, device metrics) not yet fetched
  step = start_step
  logging.info("Training from step %d to %d.", start_step, tcfg.num_steps)
  with closing_run(loader, preemption, mngr, writer, mlflow_writer) as status:
    while step < tcfg.num_steps:
      wait_start = time.perf_counter()
      batch = next_batch()
      progress.add_data_wait(time.perf_counter() - wait_start)
      state, metrics = train_step(state, batch, keys.train)
      pending.append((step + 1, metrics))
      step += k
      loop = LoopState(step=step, state=state, last=step >= tcfg.num_steps,
                       preempted=preemption.reached(step),
                       to_inference=setup.inference_params)
      due = [chore for chore in chores if chore.due(loop)]
      if due:
        loop.metrics, pending = _fetch_metrics(pending), []
        _check_finite(loop.metrics)
        for chore in due:
          chore(loop)
      if loop.preempted and not loop.last:
        status.value = "KILLED"
        logging.warning("Stopped at step %d after preemption; the next start "
                        "resumes here.", step)
        break
  return state
