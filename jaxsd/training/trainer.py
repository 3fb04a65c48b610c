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
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from jaxsd.diffusion import setup as build
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd import config_checks
from jaxsd import environment
from jaxsd import errors
from jaxsd.diffusion import generate
from jaxsd.tracking import images as images_lib
from jaxsd.data import pipeline as data_pipeline
from jaxsd.tracking import memory
from jaxsd.training import progress as progress_lib
from jaxsd.tracking import writers
from jaxsd import parallel
from jaxsd.interop import sd_pipeline
from jaxsd.training import state as ts
from jaxsd.training import workdir as workdir_lib
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
      raise errors.ResumeMismatchError(
          f"The checkpoint of step {step} was trained with other {what}: "
          f"{key} {meta[key]}, now {value}. Point the config at what it "
          "trained with, or start a new --workdir.")


def latest_readable_meta(workdir: str) -> Optional[Tuple[int, Dict]]:
  """(step, run metadata) of the newest checkpoint whose metadata reads, or
  None without checkpoints. Reads only: nothing is moved or written."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    return None
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return step, checkpoint.read_meta(mngr, step)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint of step %d in %s cannot be read (%s); "
                        "looking at the one before.", step, mngr.directory,
                        type(e).__name__)
    return None
  finally:
    mngr.close()


def check_resume(config, workdir: str, kind: str = "diffusion"
                 ) -> Optional[int]:
  """The step a start in `workdir` resumes from (None: a new run), after
  checking `config` against the config that checkpoint was trained with
  (its saved copy; config.json for checkpoints older than that)."""
  found = latest_readable_meta(workdir)
  if found is None:
    return None
  step, meta = found
  held = meta.get("run_kind") or "diffusion"
  if held != kind:
    raise errors.ResumeMismatchError(
        f"{workdir} holds checkpoints of a{'n' if held[0] in 'aeiou' else ''} "
        f"{held} run (step {step}), not of a{'n' if kind[0] in 'aeiou' else ''}"
        f" {kind} run: give this run its own --workdir.")
  saved = meta.get("config")
  path = os.path.join(workdir, CONFIG_FILE)
  if saved is None and os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      saved = None
  if saved is None:
    logging.warning("No saved config to check the resume against in %s.",
                    workdir)
  else:
    workdir_lib.check_resume(saved, json.loads(config.to_json_best_effort()),
                             workdir, step, kind)
  if config.training.get("init_from"):
    logging.info("%s already holds a run (step %d): resuming it; "
                 "training.init_from=%s is ignored.", workdir, step,
                 config.training.init_from)
  return step


def restore_newest_readable(mngr, restore: Callable[[int], Any]):
  """restore(step) of the newest checkpoint that reads: one that does not is
  moved aside (`<step>.corrupt`, process 0) with a warning and the one
  before it tried. None without checkpoints; an error when none reads."""
  moved, first_failure = [], None
  while mngr.latest_step() is not None:
    step = mngr.latest_step()
    try:
      out, failure = restore(step), None
    except errors.JaxsdError:
      raise  # the checkpoint read, but does not belong to this config
    except Exception as e:  # pylint: disable=broad-except
      out, failure = None, e
    # Every process takes the same branch, even if only one failed to read.
    if not parallel.any_process(failure is not None):
      return out
    failure = failure or RuntimeError("unreadable on another process")
    first_failure = first_failure or failure
    moved.append(checkpoint.step_path(mngr, step) + checkpoint.CORRUPT_SUFFIX)
    if jax.process_index() == 0:
      checkpoint.set_aside(mngr, step, failure)
    parallel.any_process(False)  # the others wait for the move
    mngr.reload()
  if moved:
    # Never start over silently: that none reads may be this code's fault.
    raise errors.CheckpointError(
        f"No checkpoint in {mngr.directory} could be read; each was moved "
        f"aside ({', '.join(moved)}); the newest failed with "
        f"{type(first_failure).__name__}: {checkpoint.first_line(first_failure)}"
        ". If they were damaged, the same command now starts the run "
        "again from step 0; if this code or config cannot read them, rename "
        "them back (drop the .corrupt suffix) and resume with what wrote "
        "them.")
  return None


def restore_or_create_state(setup: build.TrainSetup, mngr, rng, loader,
                            check: Optional[Callable] = None):
  """(state, step, training seconds so far): the newest readable
  checkpoint's, with the loader put where that run was; else a fresh state
  at step 0 (training.init_from: with another run's weights). `check(meta,
  step)` vets a checkpoint's metadata before its state is used."""
  def restore(step):
    state, meta, step = setup.restore_train_state(mngr, step)
    check_run_meta(meta, run_meta(setup.components), step)
    if check is not None:
      check(meta, step)
    return state, meta, step

  restored = restore_newest_readable(mngr, restore)
  if restored is None:
    state = setup.create_train_state(rng)
    if setup.config.training.get("init_from"):
      state = init_from_run(setup, state)
    return state, 0, 0.0
  state, meta, step = restored
  data_pipeline.restore_state(loader, meta)
  logging.info("Resumed from checkpoint at step %d (data: %s).", step,
               json.dumps(loader.statistics()))
  return state, step, float(meta.get("train_seconds", 0.0))


def init_from_run(setup, state):
  """`state` with params (and EMA params) of training.init_from's checkpoint
  (training.init_from_step, -1: its latest); optimiser and step stay fresh."""
  tcfg = setup.config.training
  source = tcfg.init_from
  mngr = checkpoint.manager(source, read_only=True)
  try:
    step = (checkpoint.latest_step_or_raise(mngr)
            if tcfg.get("init_from_step", -1) < 0 else tcfg.init_from_step)
    if step not in mngr.all_steps():
      raise errors.ConfigError(
          f"training.init_from_step={step}: {source} has checkpoints of steps "
          f"{mngr.all_steps()}.")
    names = [n for n in ("params", "ema_params") if hasattr(state, n)]
    item = {n: getattr(setup.abstract_state, n) for n in names}
    try:
      loaded = checkpoint.restore_partial(mngr, step, item)
    except ValueError as e:
      differ = ""
      try:
        fixed, _ = workdir_lib.config_changes(
            checkpoint.read_meta(mngr, step).get("config") or {},
            json.loads(setup.config.to_json_best_effort()))
        differ = "; ".join(line for line in fixed
                           if line.startswith(("model.", "text.")))
      except Exception:  # pylint: disable=broad-except
        pass
      raise errors.ConfigError(
          f"training.init_from={source}: its step {step} parameters do not fit "
          f"this config's model ({checkpoint.first_line(e)})"
          + (f"; the architectures differ in {differ}" if differ else "")
          + ". init_from needs the same parameter shapes.") from e
  finally:
    mngr.close()
  logging.info("Initialised the parameters from %s (step %d); optimiser and "
               "step start fresh.", source, step)
  return state.replace(**loaded)


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


class Preempted(BaseException):
  """Raised at the run's own check points when a SIGTERM came during
  start-up (a BaseException, so no `except Exception` swallows it)."""


class _Preemption:
  """SIGTERM (SLURM preemption, `scancel`) stops the run cleanly within
  seconds, whenever it comes.

  The handler only sets a flag; the main thread acts on it at its own safe
  points: start-up's check points raise `Preempted` (nothing new to save),
  the loop checkpoints after the current step and stops, and skips the
  sample grid and evaluation. Python runs the handler only between
  bytecodes, and a SIGTERM can land in a long native call (compiling a
  step) or a long evaluation, so a watchdog thread hears the signal too
  (signal.set_wakeup_fd). If the main thread has not begun stopping
  within `grace_s`, the watchdog ends the run itself: when no state is
  newer than the last checkpoint, at once; during a sample grid or an
  evaluation, after saving the newer state (`save_while`). It then calls
  `on_abort` (MLflow KILLED, metric files flushed, lock released), ends the
  loader's worker processes and exits 0, without interpreter shutdown
  (where a compile left running would crash it).

  With several processes the flag is shared every `sync_every` steps (an
  all-gather at steps that wait for the device anyway), so all processes stop
  at the same step even if only some received the signal; the watchdog does
  not act there (a checkpoint is a collective of all processes).
  """
  grace_s = 3.0

  def __init__(self, sync_every: int = 1):
    self._flag = False
    self.sync_every = sync_every
    self.unsaved = False  # a state newer than the last checkpoint exists
    self.stopping = False  # the main thread is ending the run itself
    self.on_abort: List[Callable[[], None]] = []
    self._save = None  # saves the newer state during an interruptible chore
    self._lock = threading.Lock()
    self._previous = signal.signal(signal.SIGTERM, self._handler)
    self._wakeup_r, self._wakeup_w = os.pipe()
    os.set_blocking(self._wakeup_w, False)
    self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_w)
    threading.Thread(target=self._watch, daemon=True,
                     name="jaxsd-sigterm-watchdog").start()

  def _handler(self, signum, frame):
    del signum, frame
    if not self._flag:
      logging.warning("SIGTERM received: stopping (with a checkpoint if the "
                      "state is newer than the last one).")
    self._flag = True

  @property
  def requested(self) -> bool:
    """A SIGTERM came to this process."""
    return self._flag

  def check(self):
    """A start-up check point: raises Preempted after a SIGTERM."""
    if self._flag:
      self.stopping = True
      raise Preempted()

  def _watch(self):
    while True:
      try:
        data = os.read(self._wakeup_r, 64)
      except OSError:
        return
      if not data:
        return  # restore() closed the pipe
      if signal.SIGTERM in data and jax.process_count() == 1:
        break
    deadline = time.monotonic() + self.grace_s
    while not self.stopping:
      if time.monotonic() >= deadline:
        with self._lock:
          if self.stopping:
            return
          if not self.unsaved:
            self._abort("nothing newer than the last checkpoint to save")
          if self._save is not None:
            logging.warning("SIGTERM during a sample grid or evaluation: "
                            "checkpointing the newest state.")
            self._save()
            self._abort("the newest state is checkpointed")
      time.sleep(0.05)

  def _abort(self, why: str):
    logging.warning("Stopping now (%s).", why)
    for fn in self.on_abort:
      try:
        fn()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("While stopping: %s", e)
    import multiprocessing  # pylint: disable=g-import-not-at-top
    for child in multiprocessing.active_children():  # the loader's workers
      child.terminate()
    logging.flush()
    os._exit(0)  # pylint: disable=protected-access

  @contextlib.contextmanager
  def save_while(self, save: Callable[[], None]):
    """A block (a sample grid, an evaluation) during which the watchdog may
    save the newer state with `save` and stop the run."""
    with self._lock:
      self._save = save if self.unsaved else None
    try:
      yield
    finally:
      with self._lock:  # the watchdog may be saving: wait for it
        self._save = None

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag
    if step % self.sync_every:
      return False
    return parallel.any_process(self._flag)

  def restore(self):
    self.stopping = True
    # None: the previous handler was not set from Python; default it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None
                  else self._previous)
    signal.set_wakeup_fd(self._previous_wakeup)
    os.close(self._wakeup_w)  # ends the watchdog
    os.close(self._wakeup_r)


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
  """Runs every `every` steps and after the last one. An interruptible
  chore (sampling, evaluation) is cut short by a SIGTERM."""
  interruptible = False

  def __init__(self, every: int):
    self.every = every

  def due(self, loop: LoopState) -> bool:
    return loop.step % self.every == 0 or loop.last

  def __call__(self, loop: LoopState):
    raise NotImplementedError


class LogProgress(Chore):
  """train/*, system/* and data/skipped scalars, one console line (process
  0); stops the run when too many images did not decode (every process)."""

  def __init__(self, config, writer, loader, progress: progress_lib.Progress):
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
        "system/memory_gb": memory.memory_gb(),
        "system/peak_memory_gb": memory.peak_memory_gb(),
        "data/skipped": self.loader.statistics()["skipped"],
        **self.progress.update(loop.step)}
    self.writer.write_scalars(loop.step, scalars)
    logging.info(self.progress.line(loop.step, scalars))


class SaveCheckpoint(Chore):
  """The state and the loader's position; also when preempted."""

  def __init__(self, config, mngr, loader, progress: progress_lib.Progress,
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
  interruptible = True

  def __init__(self, config, prompts, generator: generate.Generator,
               keys: RunKeys, workdir: str, writer,
               progress: progress_lib.Progress):
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
  interruptible = True

  def __init__(self, config, evaluator, generator: generate.Generator,
               keys: RunKeys, writer, progress: progress_lib.Progress):
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
    with progress_lib.timed("eval setup (networks, reference statistics)"):
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
  """The status MLflow records when a run ends: FINISHED unless the run
  stops on an error (FAILED) or a signal (KILLED)."""

  def __init__(self):
    self.value = "FINISHED"


@contextlib.contextmanager
def holding_workdir(workdir: str, preemption: _Preemption):
  """The workdir's lock (workdir.Lock), taken once by process 0 (every
  process stops if it is held elsewhere) and released on the way out. The
  lock file is all a start writes before its checks are done: a workdir
  this start created is removed again if it stops with nothing in it."""
  created = not os.path.exists(workdir)
  lock, busy = None, None
  if jax.process_index() == 0:
    lock = workdir_lib.Lock(workdir)
    try:
      lock.acquire()
    except errors.WorkdirBusyError as e:
      lock, busy = None, e
  if parallel.any_process(busy is not None):
    raise busy or errors.WorkdirBusyError(
        f"{workdir} is in use by another training process (see process 0's "
        "message).")
  if lock is not None:
    preemption.on_abort.append(lock.release)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
      if created and not os.listdir(workdir):
        os.rmdir(workdir)


@contextlib.contextmanager
def run_session(config, workdir: str, preemption: _Preemption):
  """What a run writes while it trains, once everything is checked (and
  the workdir held): config.json, the metric writers and the MLflow run.
  Yields (writer, status); whatever ends the run, the writers close and
  MLflow records FINISHED, FAILED (any error) or KILLED (a signal). Shared
  by jaxsd.commands.train_autoencoder."""
  with contextlib.ExitStack() as stack:
    save_config(config, workdir)
    writer, mlflow_writer = writers.create_writers(config, workdir)
    status = RunStatus()
    stack.callback(lambda: mlflow_writer and mlflow_writer.close(status.value))
    stack.callback(writer.flush)
    preemption.on_abort.insert(0, writer.flush)
    if mlflow_writer is not None:
      preemption.on_abort.insert(0, lambda: mlflow_writer.close("KILLED"))
    try:
      if jax.process_index() == 0:
        writer.write_hparams(config.to_dict())
      yield writer, status
    except (KeyboardInterrupt, Preempted):
      status.value = "KILLED"
      raise
    except BaseException:
      status.value = "FAILED"
      raise


def close_manager(mngr):
  mngr.wait_until_finished()
  mngr.close()


# --- The run --------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, hooks=()):
  """Trains config's model in workdir, resuming from its latest checkpoint.

  Everything is checked before anything is written: the config's values
  and the resume (the config against the checkpoint's), then, with the
  workdir locked, the model and the data; only then the workdir is
  written. Returns the final
  state, or None when a SIGTERM stopped the run before its loop or during
  an evaluation."""
  preemption = _Preemption()
  try:
    return _train(config, workdir, preemption, hooks)
  except Preempted:
    logging.warning("Stopped by SIGTERM; the next start resumes from the "
                    "last checkpoint.")
    return None
  finally:
    preemption.restore()


def _train(config, workdir: str, preemption: _Preemption, hooks=()):
  config = sd_pipeline.resolve(environment.resolve(config))
  config_checks.validate(config)
  evaluator = make_evaluator(config)
  start_runtime(config)
  tcfg = config.training
  preemption.sync_every = tcfg.log_every
  parallel.check_batch_size(tcfg.batch_size, config.optim.grad_accum_steps)
  checked_step = check_resume(config, workdir)
  preemption.check()
  with contextlib.ExitStack() as stack:
    stack.enter_context(holding_workdir(workdir, preemption))
    setup = build.TrainSetup(config)
    logging.info("%d processes, %d devices (%s)", jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    preemption.check()
    source, loader = load_training_data(config, setup.components)
    stack.callback(loader.close)
    preemption.check()
    writer, status = stack.enter_context(
        run_session(config, workdir, preemption))
    keys = RunKeys.from_seed(tcfg.seed)
    mngr = checkpoint.manager(workdir, keep=tcfg.keep_checkpoints)
    stack.callback(close_manager, mngr)
    state, start_step, train_seconds = restore_or_create_state(
        setup, mngr, keys.init, loader,
        check=lambda meta, step: _check_resumed_config(
            config, workdir, meta, step, checked_step))
    preemption.check()
    show_data(config, source, loader, start_step, writer)
    log_parameter_counts(config, state, start_step, writer, setup.base_params)
    train_step = setup.make_train_step()
    prepare_evaluator(evaluator)
    preemption.check()

    k = setup.steps_per_call
    def next_batch():
      return setup.global_batch(data_pipeline.next_model_batch(loader, k))

    progress = progress_lib.Progress(start_step, tcfg.num_steps,
                                       train_seconds)
    generator = generate.Generator.from_config(setup.components, setup.mesh,
                                               config.sampling)
    save = SaveCheckpoint(config, mngr, loader, progress,
                          run_meta(setup.components))
    chores = [LogProgress(config, writer, loader, progress), save,
              WriteSampleGrid(config, grid_prompts(config, source), generator,
                              keys, workdir, writer, progress)]
    if evaluator is not None:
      chores.append(Evaluate(config, evaluator, generator, keys, writer,
                             progress))
    logging.info("Training from step %d to %d.", start_step, tcfg.num_steps)
    return run_loop(
        state=state, start_step=start_step, num_steps=tcfg.num_steps,
        steps_per_call=k, next_batch=next_batch, train_step=train_step,
        train_key=keys.train, chores=chores, save=save, progress=progress,
        preemption=preemption, status=status,
        to_inference=setup.inference_params, hooks=hooks)


def _check_resumed_config(config, workdir, meta, step, checked_step):
  """A checkpoint other than the one check_resume checked (that one's state
  did not read, so an older one is restored) is checked in turn."""
  if step != checked_step and meta.get("config") is not None:
    workdir_lib.check_resume(meta["config"],
                             json.loads(config.to_json_best_effort()),
                             workdir, step)


def run_loop(*, state, start_step: int, num_steps: int, steps_per_call: int,
             next_batch: Callable[[], Any], train_step, train_key,
             chores: List[Chore], save: Chore, progress, preemption: _Preemption,
             status: RunStatus, to_inference=None, hooks=()):
  """The steps and their chores from start_step to num_steps, or until a
  SIGTERM (then with a checkpoint of the newest state). Returns the final
  state. Shared by jaxsd.commands.train_autoencoder."""
  pending = []  # (first step, device metrics) not yet fetched
  step = start_step
  while step < num_steps:
    wait_start = time.perf_counter()
    batch = next_batch()
    progress.add_data_wait(time.perf_counter() - wait_start)
    state, metrics = train_step(state, batch, train_key)
    preemption.unsaved = True
    pending.append((step + 1, metrics))
    step += steps_per_call
    for hook in hooks:  # e.g. tests' SIGTERM at a chosen step
      hook(step)
    loop = LoopState(step=step, state=state, last=step >= num_steps,
                     preempted=preemption.reached(step),
                     to_inference=to_inference)
    if loop.preempted:
      preemption.stopping = True
    # A preempted run checkpoints and goes: no sample grid, no evaluation.
    due = [chore for chore in chores if chore.due(loop)
           and not (loop.preempted and chore.interruptible)]
    if due:
      loop.metrics, pending = _fetch_metrics(pending), []
      _check_finite(loop.metrics)
      for chore in due:
        if chore.interruptible:
          with preemption.save_while(lambda: save(loop)):
            chore(loop)
        else:
          chore(loop)
        if chore is save:
          preemption.unsaved = False
    if (not loop.preempted and jax.process_count() == 1
        and preemption.requested):  # during this step's chores
      loop.preempted = preemption.stopping = True
      if preemption.unsaved:
        save(loop)
        preemption.unsaved = False
    if loop.preempted:
      status.value = "KILLED"
      if not loop.last:
        logging.warning("Stopped at step %d after preemption; the next "
                        "start resumes here.", step)
        break
  preemption.stopping = True
  return state
