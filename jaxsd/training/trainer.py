"""One trainer for every kind of training: the sequence of a run.

`train_and_evaluate(config, workdir, task)` reads as a run's sequence:
check the config and the resume, take the workdir, build, load the data,
open the session, restore or create the state, attach the chores, loop.
Everything is checked before anything is written. A `Task` fills in what
differs between kinds of training (jaxsd/diffusion/task.py,
jaxsd/autoencoder/task.py): its config checks, its setup (state and
jitted step), its data, its checkpoint metadata, its progress scalars and
its own chores. A new kind of training is one new task module.
"""
import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from jaxsd import parallel
from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.checkpointing import resume
from jaxsd.data import pipeline as data_pipeline
from jaxsd.tracking import images as images_lib
from jaxsd.tracking import memory
from jaxsd.training import loop as loop_lib
from jaxsd.training import preemption as preemption_lib
from jaxsd.training import progress as progress_lib
from jaxsd.training import session


@dataclasses.dataclass
class Run:
  """What a task's chores are built from, once the run's state is ready."""
  config: Any
  workdir: str
  setup: Any  # the task's setup (see Task.build)
  source: Any  # the training data's source (previews, prompts)
  loader: Any  # this process's loader
  writer: Any  # the metric writer (tracking.metric_writer; MLflow on process 0)
  keys: loop_lib.RunKeys
  progress: progress_lib.Progress
  start_step: int


class Task:
  """What one kind of training supplies to the trainer.

  `build(config)` returns the task's setup, which provides
  `create_train_state(rng)`, `restore_train_state(mngr, step)` -> (state,
  meta, step), `abstract_state`, `make_train_step()` (jitted, a pure
  function of (state, batch, rng)), `global_batch(local_batch)` and
  `steps_per_call`.
  """
  kind = ""  # recorded in every checkpoint: a workdir holds one kind of run
  metric_names: Sequence[str] = ("loss",)  # the step's metrics in train/*

  def prepare_config(self, config):
    """The config resolved for this machine (and pretrained inputs)."""
    raise NotImplementedError

  def validate(self, config) -> None:
    """Raises ConfigError on a value out of range, before anything runs."""
    raise NotImplementedError

  def grad_accum_steps(self, config) -> int:
    return 1

  def build(self, config):
    raise NotImplementedError

  def make_loader(self, config, setup, source):
    """This process's loader of the training data from `source` (the
    config's data source, data_pipeline.make_source)."""
    raise NotImplementedError

  def start_session(self, workdir: str, setup) -> None:
    """Files the run writes beside config.json once its session opens."""

  def check_checkpoint(self, setup, meta: Dict[str, Any], step: int) -> None:
    """Vets a checkpoint's metadata before its state is used."""

  def checkpoint_meta(self, run: Run
                      ) -> Optional[Callable[[loop_lib.LoopState], Dict]]:
    """What every checkpoint records beyond the trainer's own fields."""
    return None

  def log_parameters(self, run: Run, state) -> None:
    raise NotImplementedError

  def console_extra(self, scalars: Dict[str, float]) -> Optional[str]:
    """Text appended to the console's progress line."""
    return None

  def chores(self, run: Run) -> List[loop_lib.Chore]:
    """The task's own periodic chores (sample grids, evaluation), after the
    trainer's LogProgress and SaveCheckpoint. Set-up they need (networks,
    held-out images) happens here and is not counted as training time."""
    return []

  def to_inference(self, setup) -> Optional[Callable[[Any], Any]]:
    """trained params -> the weights sampling uses (a LoRA run's merge)."""
    return None


# --- Steps of the sequence ------------------------------------------------------


def show_data(config, source, loader, step: int, writer):
  """Logs the data's statistics and a captioned grid of a few training
  examples (process 0), so a run shows what the model sees; with
  data.buckets, the buckets' image counts (data/buckets, data/bucket_HxW)
  and a grid per bucket (data/examples_HxW)."""
  stats = data_pipeline.statistics(source, loader)
  logging.info("Train data: %s", json.dumps(stats))
  plan = getattr(loader, "plan", None)
  if plan is not None:
    logging.info("Buckets (height x width: images): %s", ", ".join(
        f"{h}x{w}: {n}" for (h, w), n in zip(plan.shapes, plan.counts)))
  if jax.process_index() != 0:
    return
  writer.write_scalars(step, {f"data/{k}": v for k, v in stats.items()})
  if plan is not None:
    previews = data_pipeline.bucket_preview(config, source, plan.shapes)
    for name, (images, captions) in previews.items():
      grid = images_lib.captioned_grid(_letterbox(images), captions,
                                       ncols=len(captions))
      writer.write_images(step, {f"data/examples_{name}":
                                 np.asarray(grid)[None] / 255.0})
    return
  images, captions = data_pipeline.preview(config, source)
  grid = images_lib.captioned_grid(images, captions, ncols=len(captions))
  writer.write_images(step, {"data/examples": np.asarray(grid)[None] / 255.0})


def _letterbox(images: np.ndarray) -> np.ndarray:
  """[n, h, w, C] in [-1, 1] -> [n, s, s, C], s = max(h, w), centred on
  white: the square grid cells then show a bucket's shape undistorted."""
  n, h, w, c = images.shape
  s = max(h, w)
  out = np.ones((n, s, s, c), images.dtype)
  top, left = (s - h) // 2, (s - w) // 2
  out[:, top:top + h, left:left + w] = images
  return out


def restore_or_create_state(task: Task, setup, mngr, rng, loader,
                            workdir: Optional[str] = None,
                            checked_step: Optional[int] = None):
  """(state, step, training seconds so far): the newest readable
  checkpoint's, with the loader put where that run was; else a fresh state
  at step 0 (training.init_from: with another run's weights). A checkpoint
  other than the one check_resume checked (`checked_step`: its state did
  not read, so an older one is restored) has its config checked in turn."""
  config = setup.config
  workdir = workdir or os.path.dirname(str(mngr.directory).rstrip("/"))
  new_config = json.loads(config.to_json_best_effort())

  def restore(step):
    state, meta, step = setup.restore_train_state(mngr, step)
    resume.check_kind(meta, task.kind, workdir, step)
    task.check_checkpoint(setup, meta, step)
    if step != checked_step and meta.get("config") is not None:
      resume.check_changes(meta["config"], new_config, workdir, step,
                           task.kind)
    return state, meta, step

  restored = resume.restore_newest_readable(mngr, restore)
  if restored is None:
    state = setup.create_train_state(rng)
    if config.training.get("init_from"):
      state = resume.init_from_run(config, setup.abstract_state, state)
    return state, 0, 0.0
  state, meta, step = restored
  data_pipeline.restore_state(loader, meta)
  logging.info("Resumed from checkpoint at step %d (data: %s).", step,
               json.dumps(loader.statistics()))
  return state, step, float(meta.get("train_seconds", 0.0))


# --- The run --------------------------------------------------------------------


def log_step_plan(writer, step: int, plan: dict, shapes) -> None:
  """XLA's memory plan of the compiled step, before it first runs: on the
  console and as MLflow params and metrics (memory/step_*_gb), so a run
  shows what a step needs before step 1 (or before an out-of-memory)."""
  if not plan:
    logging.info("The compiled step reports no memory plan (backend %s).",
                 jax.default_backend())
    return
  gb = {k[:-len("_bytes")]: v / 1e9 for k, v in plan.items()}
  logging.info(
      "The compiled step needs %.2f GB: arguments %.2f GB (state, batch), "
      "temporaries %.2f GB, outputs %.2f GB of which %.2f GB reuse donated "
      "arguments; batch %s.", gb["peak"], gb["argument"], gb["temp"],
      gb["output"], gb["alias"],
      ", ".join(f"{k} {list(s)} {d}" for k, s, d in shapes))
  if jax.process_index() == 0:
    figures = {f"memory/step_{k}_gb": round(v, 4) for k, v in gb.items()}
    writer.write_hparams(figures)
    writer.write_scalars(step, figures)


def train_and_evaluate(config, workdir: str, task: Task,
                       hooks: Sequence[Callable[[int], None]] = ()):
  """Trains `task` with `config` in `workdir`, resuming from its latest
  checkpoint.

  Everything is checked before anything is written: the config's values
  and the resume (the config against the checkpoint's), then, with the
  workdir locked, the model and the data; only then the workdir is
  written. `hooks`: callables hook(step) run after each call of the step
  (tests stop a run at a chosen step through them). Returns the final
  state, or None when a SIGTERM or Ctrl-C stopped the run before its loop
  or during an evaluation."""
  preemption = preemption_lib.Preemption()
  try:
    return _train(config, workdir, task, preemption, hooks)
  except preemption_lib.Preempted:
    logging.warning("Stopped by %s; the next start resumes from the last "
                    "checkpoint.", preemption.signal_name or "a signal")
    return None
  finally:
    preemption.restore()


def _train(config, workdir: str, task: Task,
           preemption: preemption_lib.Preemption, hooks):
  config = task.prepare_config(config)
  task.validate(config)
  session.start_runtime(config)
  tcfg = config.training
  preemption.sync_every = tcfg.log_every
  parallel.check_batch_size(tcfg.batch_size, task.grad_accum_steps(config))
  checked_step = resume.check_resume(config, workdir, task.kind)
  # The data first: a data fault (an empty folder, a missing file) is named
  # in seconds, before the model is built.
  source = data_pipeline.make_source(config)
  preemption.check()
  with contextlib.ExitStack() as stack:
    stack.enter_context(session.holding_workdir(workdir, preemption))
    setup = task.build(config)
    logging.info("%d processes, %d devices (%s)", jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    preemption.check()
    loader = task.make_loader(config, setup, source)
    stack.callback(loader.close)
    if checked_step is not None:
      # What the data cannot resume (another batch size, other data) stops
      # here, before config.json or the MLflow run are touched.
      data_pipeline.restore_state(loader,
                                  resume.latest_readable_meta(workdir)[1])
    preemption.check()
    writer, status = stack.enter_context(
        session.run_session(config, workdir, preemption))
    task.start_session(workdir, setup)
    keys = loop_lib.RunKeys.from_seed(tcfg.seed)
    mngr = checkpoint.manager(workdir, keep=tcfg.keep_checkpoints)
    stack.callback(session.close_manager, mngr)
    # A second Ctrl-C mid-save leaves no folder that looks like a checkpoint.
    preemption.on_abort.append(
        lambda: checkpoint.remove_partial_saves(str(mngr.directory)))
    state, start_step, train_seconds = restore_or_create_state(
        task, setup, mngr, keys.init, loader, workdir=workdir,
        checked_step=checked_step)
    preemption.check()
    show_data(config, source, loader, start_step, writer)
    progress = progress_lib.Progress(start_step, tcfg.num_steps,
                                     train_seconds)
    run = Run(config=config, workdir=workdir, setup=setup, source=source,
              loader=loader, writer=writer, keys=keys, progress=progress,
              start_step=start_step)
    with progress.excluded():  # compiling and chores' set-up: not training
      task.log_parameters(run, state)
      train_step = memory.reporting_plan(
          setup.make_train_step(),
          functools.partial(log_step_plan, writer, start_step))
      task_chores = task.chores(run)
    preemption.check()

    k = setup.steps_per_call
    def next_batch():
      return setup.global_batch(data_pipeline.next_model_batch(loader, k))

    save = loop_lib.SaveCheckpoint(config, mngr, loader, progress, task.kind,
                                   task.checkpoint_meta(run))
    chores = [loop_lib.LogProgress(config, writer, loader, progress,
                                   task.metric_names, task.console_extra),
              save, *task_chores]
    logging.info("Training from step %d to %d (%s).", start_step,
                 tcfg.num_steps, task.kind)
    return loop_lib.run_loop(
        state=state, start_step=start_step, num_steps=tcfg.num_steps,
        steps_per_call=k, next_batch=next_batch, train_step=train_step,
        train_key=keys.train, chores=chores, save=save, progress=progress,
        preemption=preemption, status=status,
        to_inference=task.to_inference(setup), hooks=hooks)
