"""Training and periodic evaluation: the host-side loop.

The numerics live in train_step.py (jitted, pure); this file does data,
checkpoints, logging, preemption and sample grids.
"""
import functools
import json
import os
import signal
import time
from typing import Any, Dict, List, Tuple

from absl import logging
import jax
import numpy as np

from jaxsd import build
from jaxsd import checkpoint
from jaxsd import config_checks
from jaxsd import generate
from jaxsd import images as images_lib
from jaxsd import input_pipeline
from jaxsd import metric_logging
from jaxsd import parallel
from jaxsd import train_state as ts
from jaxsd import train_step as step_lib
from jaxsd.evaluation import evaluator as evaluator_lib

CONFIG_FILE = "config.json"


class NonFiniteLossError(FloatingPointError):
  pass


def enable_compilation_cache():
  """Persistent XLA cache: a second run of the same config skips compiling."""
  cache_dir = os.environ.get("JAXSD_COMPILATION_CACHE",
                             os.path.expanduser("~/.cache/jaxsd/xla"))
  if cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def save_config(config, workdir: str):
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


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


def _check_finite(pending: List[Tuple[int, Dict[str, Any]]]):
  for step, metrics in pending:
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


def write_sample_grid(generator: generate.Generator, params, config, rng,
                      step: int, workdir: str, writer, mlflow_writer):
  """Samples the configured prompts and writes a captioned grid (process 0)."""
  prompts = [p for p in config.sampling.prompts
             for _ in range(config.sampling.samples_per_prompt)]
  images = generator(params, prompts, rng)
  if jax.process_index() != 0:
    return
  grid = images_lib.captioned_grid(images, prompts,
                                   ncols=config.sampling.samples_per_prompt
                                   if len(config.sampling.prompts) > 10
                                   else len(config.sampling.prompts))
  path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
  images_lib.save_png_atomic(grid, path)
  writer.write_images(step, {"samples": np.asarray(grid)[None] / 255.0})
  logging.info("Wrote sample grid %s", path)


class _timed:
  """Logs how long a block took."""

  def __init__(self, what: str):
    self.what = what

  def __enter__(self):
    self.start = time.perf_counter()

  def __exit__(self, *exc):
    logging.info("%s took %.1f s", self.what, time.perf_counter() - self.start)


def run_evaluation(evaluator, generator, params, rng, step: int, writer):
  """Samples, evaluates and logs eval/* (metrics on process 0 only)."""
  prompts = evaluator_lib.eval_prompts(evaluator.config.data.caption_template,
                                       evaluator.eval_config.num_samples)
  start = time.perf_counter()
  images = generator(params, prompts, rng)  # every process takes part
  sampling = time.perf_counter() - start
  if jax.process_index() != 0:
    return None
  metrics = evaluator.evaluate(images, prompts)
  metrics["sampling_seconds"] = sampling
  metrics["seconds"] = time.perf_counter() - start
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  logging.info("eval at step %d: %s", step, ", ".join(
      f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k))
  return metrics


def train_and_evaluate(config, workdir: str):
  """Trains config's model in workdir, resuming from its latest checkpoint."""
  config_checks.validate(config)
  parallel.hide_gpus_from_tensorflow()
  parallel.split_cpu_into_devices(config.parallel.cpu_devices)
  parallel.maybe_initialize_distributed(config.parallel.distributed)
  enable_compilation_cache()
  os.makedirs(workdir, exist_ok=True)
  tcfg = config.training
  parallel.check_batch_size(tcfg.batch_size, config.optim.grad_accum_steps)
  mesh = parallel.make_mesh(parallel.model_axis_size(config.parallel))
  logging.info("%d processes, %d devices (%s)", jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  save_config(config, workdir)
  writer, mlflow_writer = metric_logging.create_writers(config, workdir)
  if jax.process_index() == 0:
    writer.write_hparams(config.to_dict())

  # --- Data ---------------------------------------------------------------
  train_images, train_labels = input_pipeline.load_mnist(config.data, "train")
  stats = input_pipeline.dataset_statistics(train_images, train_labels)
  logging.info("Train data: %s", json.dumps(stats))
  comps = build.build_components(config)
  data = input_pipeline.training_data(
      config, comps.tokenizer, train_images, train_labels,
      process_index=jax.process_index(), process_count=jax.process_count())

  # --- State ----------------------------------------------------------------
  base_rng = jax.random.key(tcfg.seed)
  init_rng, train_rng, sample_rng = jax.random.split(base_rng, 3)
  tx = ts.make_optimizer(config.optim, tcfg.num_steps, config.text.trainable)
  def init_state(rng):
    return ts.create(comps.init_params(rng), tx)
  replicated = parallel.replicated(mesh)
  abstract = jax.eval_shape(init_state, init_rng)
  # Replicated, or FSDP-split with parallel.fsdp; checkpoints restore into it.
  state_sharding = parallel.state_shardings(abstract, mesh,
                                            config.parallel.fsdp_min_size)
  abstract = parallel.with_shardings(abstract, state_sharding)
  mngr = checkpoint.manager(workdir, keep=tcfg.keep_checkpoints)
  if mngr.latest_step() is not None:
    state, meta, start_step = checkpoint.restore(mngr, abstract)
    data_position = int(meta["data_position"])
    train_seconds = float(meta.get("train_seconds", 0.0))
    logging.info("Resumed from checkpoint at step %d (data position %d).",
                 start_step, data_position)
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)(init_rng)
    start_step, data_position, train_seconds = 0, 0, 0.0
  n_total = build.param_count(state.params)
  n_trainable = build.param_count(
      state.params if config.text.trainable else state.params["unet"])
  logging.info("Parameters: %d total (UNet %d, text %d), %d trainable.",
               n_total, build.param_count(state.params["unet"]),
               build.param_count(state.params["text"]), n_trainable)
  if jax.process_index() == 0:
    writer.write_scalars(start_step, {
        **{f"data/{k}": v for k, v in stats.items()},
        "model/params_total": n_total, "model/params_trainable": n_trainable})

  # --- Steps ----------------------------------------------------------------
  k = tcfg.steps_per_call
  step_fn = step_lib.make_step_fn(
      unet_apply=comps.unet.apply, text_apply=comps.text_encoder,
      schedule=comps.schedule, uncond_ids=comps.uncond_ids, config=config,
      tx=tx, steps_per_call=k)
  batch_sharding = (parallel.batch_sharding(mesh) if k == 1
                    else parallel.stacked_batch_sharding(mesh))
  jit_step = jax.jit(step_fn,
                     in_shardings=(state_sharding, batch_sharding, replicated),
                     out_shardings=(state_sharding, replicated),
                     donate_argnums=(0,))
  generator = generate.Generator.from_config(comps, mesh, config.sampling)
  lr_fn = ts.learning_rate_schedule(config.optim, tcfg.num_steps)
  evaluator, eval_generator = None, None
  if config.eval.metrics and jax.process_count() > 1:
    # The classifier cache's orbax barriers would deadlock while only
    # process 0 evaluates; evaluate the checkpoints with jaxsd.evaluate.
    logging.warning("Periodic evaluation (eval.metrics) runs in single-process "
                    "runs only; skipped here. Run `python -m jaxsd.evaluate "
                    "--workdir=%s --all_checkpoints` afterwards.", workdir)
  elif config.eval.metrics:
    evaluator = evaluator_lib.Evaluator(config)
    if jax.process_index() == 0:
      with _timed("eval setup (classifier, reference statistics)"):
        evaluator.prepare()
    eval_generator = generator.with_chunk_size(config.eval.chunk_size)
  eval_rng = jax.random.fold_in(sample_rng, 1 << 20)

  def next_batch(position):
    return parallel.global_batch(
        input_pipeline.model_inputs(data, position, k), batch_sharding)

  prefetcher = input_pipeline.Prefetcher(
      next_batch, stride=k) if tcfg.prefetch else None

  def save(step):
    checkpoint.save(mngr, step, state, {
        "step": step, "data_position": data_position,
        "train_seconds": progress.train_seconds, "rng_seed": tcfg.seed,
        "config": config.to_dict()})

  preemption = _Preemption(sync_every=tcfg.log_every)
  progress = metric_logging.Progress(start_step, tcfg.num_steps,
                                     train_seconds)
  pending = []  # (first step, device metrics) not yet fetched
  step = start_step
  status = "FINISHED"
  logging.info("Training from step %d to %d.", start_step, tcfg.num_steps)
  try:
    while step < tcfg.num_steps:
      batch = (prefetcher.get(data_position) if prefetcher
               else next_batch(data_position))
      state, metrics = jit_step(state, batch, train_rng)
      pending.append((step + 1, metrics))
      step += k
      data_position += k
      last = step >= tcfg.num_steps
      preempted = preemption.reached(step)
      do_log = step % tcfg.log_every == 0 or last
      do_ckpt = step % tcfg.checkpoint_every == 0 or last or preempted
      do_eval = step % tcfg.eval_every == 0 or last
      if do_log or do_ckpt or do_eval or preempted:
        fetched = _fetch_metrics(pending)
        pending = []
        _check_finite(fetched)
        if do_log and jax.process_index() == 0:
          scalars = {
              "train/loss": float(np.mean([m["loss"] for _, m in fetched])),
              "train/grad_norm": fetched[-1][1]["grad_norm"],
              "train/learning_rate": float(lr_fn(step - 1)),
              "system/memory_gb": metric_logging.memory_gb(),
              "system/peak_memory_gb": metric_logging.peak_memory_gb(),
              **progress.update(step)}
          writer.write_scalars(step, scalars)
          logging.info(progress.line(step, scalars))
      if do_ckpt:
        save(step)
      if do_eval:
        with progress.excluded():  # not training time
          params = (state.ema_params if config.sampling.use_ema
                    else state.params)
          params = parallel.gather_replicated(params, mesh)  # FSDP: gather
          write_sample_grid(generator, params, config,
                            jax.random.fold_in(sample_rng, step), step,
                            workdir, writer, mlflow_writer)
          if evaluator is not None:
            run_evaluation(evaluator, eval_generator, params,
                           jax.random.fold_in(eval_rng, step), step, writer)
      if preempted and not last:
        status = "KILLED"
        logging.warning("Stopped at step %d after preemption; the next start "
                        "resumes here.", step)
        break
  except NonFiniteLossError:
    status = "FAILED"
    raise
  finally:
    if prefetcher:
      prefetcher.close()
    preemption.restore()
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
    if mlflow_writer is not None:
      mlflow_writer.close(status)
  return state
