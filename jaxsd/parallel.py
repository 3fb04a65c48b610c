"""Devices, processes and sharding.

The mesh has two axes: `data` and `model`. Batches are split over both (every
device gets its own share of each batch). The train state is replicated
(data parallelism, the default) or, with `parallel.fsdp`, its large arrays are
split over the `model` axis (fully-sharded data parallelism: each device holds
1/model_axis_size of the parameters, EMA and optimiser state; XLA gathers
parameters when a layer needs them).
"""
import atexit
import os
import sys
import threading
import time
import traceback
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from jaxsd import xla_flags as xla_flags_lib
from jaxsd.checks import check_choice, check_int

DATA_AXIS = "data"
MODEL_AXIS = "model"
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)  # the batch is split over all devices


def check_parallel(config):
  """parallel.* of a run's config: the valid ranges (jaxsd.config_checks
  runs it before any device is touched)."""
  p = config.parallel
  check_choice("parallel.distributed", p.distributed, ("auto", "on", "off"))
  check_int("parallel.cpu_devices", p.cpu_devices, 0,
            hint="0 = one CPU device")
  check_int("parallel.model_axis_size", p.model_axis_size, 0,
            hint="0 = all devices")
  check_int("parallel.fsdp_min_size", p.fsdp_min_size, 0)


def hide_gpus_from_tensorflow():
  """Keeps TensorFlow off the GPUs JAX uses, if this process imported it.

  TF otherwise reserves GPU memory and starts its own NCCL, which breaks
  multi-GPU JAX jobs (flax issue 4942). jaxsd imports TF only to read tfds
  datasets (jaxsd.data.mnist, data.source_tfds), and those hide its GPUs as
  they import it; this covers TF that the user's code imported before the
  run. It does not import TF itself: that took 9 s of every start (2-core
  AMD EPYC, 2026-12-06) in runs that never read a tfds dataset.
  """
  tf = sys.modules.get("tensorflow")
  if tf is None or not hasattr(tf, "config"):
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices: too late
    logging.warning("TensorFlow was initialised before its GPUs could be "
                    "hidden; it may hold GPU memory.")


_CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def xla_flags_with_cpu_devices(xla_flags: str, count: int) -> str:
  """XLA_FLAGS with the host platform split into `count` devices, unless the
  flags already choose a count (the user's choice wins)."""
  return xla_flags_lib.with_flag(xla_flags, f"{_CPU_DEVICES_FLAG}={count}")


def split_cpu_into_devices(count: int):
  """Presents the CPU as `count` devices, so data parallelism runs one
  stream of ops per core. It paid (1.27x on 2 cores) while XLA:CPU's
  convolutions left a core idle; with jaxsd.xla_flags they do not, and 2
  devices run the MNIST config at 0.98x (benchmarks/README.md). Also how
  tests emulate several devices. Must run before JAX initialises its
  backends; ignored (with a warning) after, and by GPU/TPU runs (their
  devices win).
  """
  if count <= 0:
    return
  if xla_flags_lib.backends_started():
    logging.warning("parallel.cpu_devices=%d ignored: JAX is already "
                    "initialised (set XLA_FLAGS=%s=%d instead).", count,
                    _CPU_DEVICES_FLAG, count)
    return
  os.environ["XLA_FLAGS"] = xla_flags_with_cpu_devices(
      os.environ.get("XLA_FLAGS", ""), count)


def _launched_multiprocess() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _env_int(name: str):
  value = os.environ.get(name)
  return int(value) if value else None


def maybe_initialize_distributed(mode: str = "auto"):
  """jax.distributed.initialize() for multi-process runs.

  mode: "auto" (when SLURM runs several tasks or JAX_COORDINATOR_ADDRESS is
  set), "on" (always) or "off". Under SLURM everything is detected. Elsewhere
  set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; JAX_LOCAL_DEVICE_IDS=0,1,.. picks a process's GPUs.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"parallel.distributed={mode!r}; use auto, on or off.")
  if mode == "off" or (mode == "auto" and not _launched_multiprocess()):
    return
  if jax.distributed.is_initialized():
    return
  # jaxsd syncs SIGTERM itself (train._Preemption). JAX's preemption service
  # would install a C++ SIGTERM handler that swallows a SIGTERM arriving
  # before the train loop starts, leaving a process that never stops.
  jax.config.update("jax_enable_preemption_service", False)
  # CPU processes reduce over gloo (TCP); GPUs use NCCL whatever this says.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      num_processes=_env_int("JAX_NUM_PROCESSES"),
      process_id=_env_int("JAX_PROCESS_ID"),
      # A process that dies without a word (killed, out of memory, crashed)
      # is taken for dead after this long without heartbeats, and the
      # coordination service then stops the others (JAX's default is 100 s).
      # Heartbeats come from a C++ thread, so long compiles, file locks and
      # evaluation on one process do not miss them.
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      # The exit barrier waits this long for every process to finish. Kept at
      # JAX's 300 s: process 0 may still score the final evaluation and close
      # MLflow after the others are done, and a timed-out barrier aborts the
      # late process. A process that fails no longer waits here
      # (leave_process_group), so this bounds only a hang, not a failure.
      shutdown_timeout_seconds=300)
  logging.info("jax.distributed: process %d of %d, %d local / %d global "
               "devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    _stop_with_the_first_failure()


# --- One failure stops every process ------------------------------------------
#
# Left alone, a process that raises runs JAX's exit barrier, which waits for
# the others; they wait for it in their next collective, and the job hangs
# until the barrier times out (5 minutes), then aborts with C++ stacks. So a
# failing process posts its one-line error to every other process through
# the coordination service's key-value store and exits at once (as
# `mpi4py -m` aborts its communicator on an uncaught exception); a thread in
# each process waits on its own key and exits with the same line. Under
# SLURM, srun --kill-on-bad-exit also ends the job's other tasks once the
# failed one has exited.

HEARTBEAT_TIMEOUT_S = 10
_FAILURE_KEY = "jaxsd/failure"  # /<process>: the failure it is told of
_SEEN_KEY = "jaxsd/failure_seen"  # /<process>: it has read the failure
_LEFT_KEY = "jaxsd/failure_left"  # /<process>: it is exiting now
_NO_FAILURE = ""  # posted to a process's own key when it exits normally
# At most: the others answer within milliseconds unless the machine is
# swamped (3 s was too short with a load of 9 on 2 cores).
_ACK_WAIT_S = 10.0


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _exit_now(code: int):
  """Exits without atexit handlers: JAX's would run the exit barrier."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


# Process 0 hosts the coordination service. If it exits while another
# process is still alive, that process's agent loses the service and aborts
# (SIGABRT, a C++ stack) instead of exiting with its one line: seen with
# process 1 failing, process 0 acknowledging and exiting before process 1
# had read the acknowledgement. So every leaving process says so, and
# process 0 goes last: after the others' word (at most _ACK_WAIT_S) and a
# moment for their exit to complete.
_LAST_EXIT_GRACE_S = 0.5


def _wait_for_keys(client, keys):
  """Waits until each key is set, _ACK_WAIT_S in all; stops early at the
  first that fails (its process is dead or stuck: the heartbeat timeout
  stops it)."""
  deadline = time.monotonic() + _ACK_WAIT_S
  for key in keys:
    remaining_ms = int((deadline - time.monotonic()) * 1000)
    if remaining_ms <= 0:
      return
    try:
      client.blocking_key_value_get(key, remaining_ms)
    except Exception:  # pylint: disable=broad-except
      return


def _leave(client, code: int):
  """Exits with `code` after a failure; process 0 waits for the others to
  leave first (see above)."""
  me, count = jax.process_index(), jax.process_count()
  try:
    client.key_value_set(f"{_LEFT_KEY}/{me}", "1")
  except Exception:  # pylint: disable=broad-except
    pass
  if me == 0:
    _wait_for_keys(client, [f"{_LEFT_KEY}/{p}" for p in range(1, count)])
    time.sleep(_LAST_EXIT_GRACE_S)
  _exit_now(code)


def leave_process_group(message: str, code: int = 1):
  """After a failure in a multi-process run: tells the other processes
  (they stop with `message`, naming this process) and exits with `code` at
  once. Returns without doing anything outside a multi-process run.

  message: the error as one line, e.g. what `jaxsd: error:` printed.
  """
  client = _client()
  if client is None or jax.process_count() == 1:
    return
  me, count = jax.process_index(), jax.process_count()
  others = [p for p in range(count) if p != me]
  told = []
  for other in others:
    try:
      client.key_value_set(f"{_FAILURE_KEY}/{other}", f"{me}\t{message}")
      told.append(other)
    except Exception:  # pylint: disable=broad-except
      pass  # it failed too, or has exited, or another failure came first
  # The coordination service lives in process 0: wait (briefly) until the
  # others have read the failure, so they learn it even when 0 is leaving.
  _wait_for_keys(client, [f"{_SEEN_KEY}/{other}" for other in told])
  _leave(client, code)


def _watch_for_failure(client, me: int, count: int):
  while True:
    try:
      value = client.blocking_key_value_get(f"{_FAILURE_KEY}/{me}",
                                            24 * 3600 * 1000)
    except Exception as e:  # pylint: disable=broad-except
      if "DEADLINE_EXCEEDED" in str(e):
        continue
      return  # the coordination service is gone: heartbeats take over
    if value == _NO_FAILURE:
      return
    failed, _, message = value.partition("\t")
    try:
      client.key_value_set(f"{_SEEN_KEY}/{me}", "1")
    except Exception:  # pylint: disable=broad-except
      pass
    sys.stderr.write(f"jaxsd: error: process {failed} of {count} failed: "
                     f"{message}\n")
    _leave(client, 1)


def _stop_with_the_first_failure():
  """Makes the first failure of any process stop them all within seconds:
  an uncaught exception leaves the group after its traceback (a one-line
  error leaves it through the command, see jaxsd.commands.cli), and a
  thread stops this process when another posts its failure."""
  client = _client()
  me, count = jax.process_index(), jax.process_count()
  watcher = threading.Thread(target=_watch_for_failure,
                             args=(client, me, count),
                             name="jaxsd-failure-watch", daemon=True)
  watcher.start()

  def stop_watching():
    # Before JAX's own atexit handler shuts the client down: a daemon
    # thread woken during interpreter shutdown would abort the process
    # (its C++ frames cannot unwind), so wake it and let it end first.
    try:
      client.key_value_set(f"{_FAILURE_KEY}/{me}", _NO_FAILURE)
    except Exception:  # pylint: disable=broad-except
      return  # a failure was posted (the watcher is exiting) or no service
    watcher.join(timeout=5)
  atexit.register(stop_watching)  # runs before JAX's (registered earlier)

  previous_hook = sys.excepthook

  def leave_after_traceback(kind, value, tb):
    previous_hook(kind, value, tb)
    line = traceback.format_exception_only(kind, value)[-1].strip()
    leave_process_group(line.splitlines()[0] if line else kind.__name__)
  sys.excepthook = leave_after_traceback


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a collective: all
  processes must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.any(flags))


# --- Mesh and shardings -----------------------------------------------------


def model_axis_size(parallel_config) -> int:
  """Devices that share one copy of the state: 1 without FSDP; with FSDP
  parallel.model_axis_size, or all devices when that is 0."""
  if not parallel_config.fsdp:
    return 1
  n = jax.device_count()
  m = parallel_config.model_axis_size or n
  if m < 1 or n % m:
    raise ValueError(
        f"parallel.model_axis_size={parallel_config.model_axis_size} must "
        f"divide the device count ({n}); 0 means all devices.")
  return m


def make_mesh(model_axis_size: int = 1) -> Mesh:
  """[device_count / model_axis_size, model_axis_size] mesh of all devices.

  jax.devices() lists a process's devices together, so a model axis no larger
  than a node's GPU count stays within the node (fast links); the data axis
  spans nodes.
  """
  n = jax.device_count()
  if model_axis_size < 1 or n % model_axis_size:
    raise ValueError(f"model_axis_size={model_axis_size} must divide the "
                     f"device count ({n}).")
  devices = np.asarray(jax.devices()).reshape(n // model_axis_size,
                                              model_axis_size)
  return Mesh(devices, (DATA_AXIS, MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices."""
  return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[steps, batch, ...] arrays: batch axis split, steps axis whole."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def array_spec(shape, model_size: int, min_size: int) -> P:
  """Partition spec of one state array: its largest axis that divides by
  model_size is split over the model axis; arrays with fewer than min_size
  elements (or no such axis) are replicated."""
  if model_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [(dim, i) for i, dim in enumerate(shape)
                if dim % model_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)  # ties: the last such axis (output channels)
  spec = [None] * len(shape)
  spec[axis] = MODEL_AXIS
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2**16):
  """NamedSharding for every array of a state tree (arrays or
  ShapeDtypeStructs): FSDP-split over the model axis where array_spec says,
  replicated otherwise (all of it when the model axis has size 1).

  Optimiser moments and EMA have their parameter's shape, so they are split
  the same way as it.
  """
  model_size = mesh.shape[MODEL_AXIS]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, array_spec(x.shape, model_size, min_size)),
      abstract_state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the given shardings (for jit and restore)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)


def gather_replicated(tree: Any, mesh: Mesh) -> Any:
  """Replicated copies of FSDP-sharded arrays, for code that takes
  replicated parameters (sampling); a no-op without FSDP."""
  if mesh.shape[MODEL_AXIS] == 1:
    return tree
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def check_batch_size(global_batch_size: int, grad_accum_steps: int = 1):
  """Raises unless every device gets a whole share of every micro-batch."""
  n = jax.device_count()
  if global_batch_size % (n * grad_accum_steps):
    raise ValueError(
        f"training.batch_size={global_batch_size} must be divisible by the "
        f"device count ({n}) x optim.grad_accum_steps ({grad_accum_steps}) "
        f"= {n * grad_accum_steps}; try "
        f"{max(1, round(global_batch_size / (n * grad_accum_steps))) * n * grad_accum_steps}.")


def global_batch(local_batch, sharding: NamedSharding):
  """Assembles each process's share into one global, sharded jax.Array."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def shard_replicated_host_array(array: np.ndarray, sharding: NamedSharding):
  """A global jax.Array from a host array every process holds in full."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])
