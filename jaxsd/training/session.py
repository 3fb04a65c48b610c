"""A run's process-wide settings and what it holds while it trains: the
workdir's lock, config.json, the metric writers and the MLflow run."""
import contextlib
import os

import jax

from jaxsd import environment
from jaxsd import errors
from jaxsd import parallel
from jaxsd import workdir_lock as lock_lib
from jaxsd.checkpointing import run_config
from jaxsd.tracking import writers as writers_lib
from jaxsd.training.preemption import Preempted, Preemption


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


class RunStatus:
  """The status MLflow records when a run ends: FINISHED unless the run
  stops on an error (FAILED) or a signal (KILLED)."""

  def __init__(self):
    self.value = "FINISHED"


@contextlib.contextmanager
def holding_workdir(workdir: str, preemption: Preemption):
  """The workdir's lock (lock.Lock), taken once by process 0 (every
  process stops if it is held elsewhere or cannot be written) and released on the way out. The
  lock file is all a start writes before its checks are done: a workdir
  this start created is removed again if it stops with nothing in it."""
  created = not os.path.exists(workdir)
  lock, busy = None, None
  if jax.process_index() == 0:
    lock = lock_lib.Lock(workdir)
    try:
      lock.acquire()
    except errors.JaxsdError as e:  # held elsewhere, or not writable
      lock, busy = None, e
  if parallel.any_process(busy is not None):
    raise busy or errors.WorkdirBusyError(
        f"{workdir} cannot be taken by this training run (see process 0's "
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
def run_session(config, workdir: str, preemption: Preemption):
  """What a run writes while it trains, once everything is checked (and
  the workdir held): config.json, the metric writers and the MLflow run.
  Yields (writer, status); whatever ends the run, the writers close and
  MLflow records FINISHED, FAILED (any error) or KILLED (a signal). Shared
  by jaxsd.commands.train_autoencoder."""
  with contextlib.ExitStack() as stack:
    run_config.save_config(config, workdir)
    writer, mlflow_writer = writers_lib.create_writers(config, workdir)
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
