"""Memory figures of this process: device memory where reported, else
host RSS, in GiB."""
import os
import resource

import jax


def memory_gb() -> float:
  """Device memory in use (GPU/TPU) where reported, else host RSS, in GiB."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_in_use" in stats:
    return stats["bytes_in_use"] / 2**30
  try:
    with open("/proc/self/statm") as f:
      rss_pages = int(f.read().split()[1])
    return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
  except (OSError, ValueError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_gb() -> float:
  """Peak device memory (GPU/TPU) where reported, else the process's peak
  RSS, in GiB."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
