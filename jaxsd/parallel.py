"""Devices, processes and sharding: one `data` mesh axis over all devices."""
import os

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def _launched_multiprocess() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed(mode: str = "auto"):
  """jax.distributed.initialize() for multi-process runs (SLURM sets them up).

  mode: "auto" (when SLURM runs several tasks or a coordinator is set),
  "on" (always) or "off".
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"parallel.distributed={mode!r}; use auto, on or off.")
  if mode == "off" or (mode == "auto" and not _launched_multiprocess()):
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global "
               "devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[steps, batch, ...] arrays: batch axis split, steps axis whole."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


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
