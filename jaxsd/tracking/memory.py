"""Memory figures of this process: device memory where reported, else
host RSS, in GiB."""
import ctypes
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


def release_freed_host_memory() -> bool:
  """Hands the C heap's free pages back to the OS (glibc `malloc_trim`);
  False where there is no glibc.

  Compiling a large step leaves its freed buffers in malloc's arenas, and
  they count in RSS for the rest of the run: the SD-1.5-sized UNet's LoRA
  step with remat had 2.48 GB of RSS after compiling, 1.13 GB with the
  trim (2026-12-07, benchmarks/README.md)."""
  try:  # the process's own symbols: glibc's where it is the C library
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # musl, macOS: no malloc_trim
    return False
  trim.argtypes = [ctypes.c_size_t]
  trim(0)
  return True


# XLA's plan of a compiled program: `compiled.memory_analysis()` fields.
PLAN_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def compiled_plan(compiled) -> dict:
  """{"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
  "generated_code_bytes", "peak_bytes"} of a compiled program; {} where the
  backend reports none. peak_bytes = arguments + temporaries + outputs not
  aliased to (donated) arguments: what running it needs at once."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # backends without it
    return {}
  if stats is None:
    return {}
  plan = {f"{f}_bytes": int(getattr(stats, f"{f}_size_in_bytes", 0) or 0)
          for f in PLAN_FIELDS}
  plan["peak_bytes"] = (plan["argument_bytes"] + plan["temp_bytes"] +
                        plan["output_bytes"] - plan["alias_bytes"])
  return plan


def reporting_plan(step, report):
  """`step(state, batch, rng)` that, the first time it sees a batch shape,
  compiles ahead of time (`step.jitted.lower(...)`) and hands XLA's plan to
  report(plan, shapes) before running, then returns the compiler's freed
  heap to the OS. jax reuses that executable for the call itself, so
  nothing is compiled twice."""
  if hasattr(step, "jitted"):  # the diffusion step: (..., base)
    lower = lambda *args: step.jitted.lower(*args, step.base)
  elif hasattr(step, "lower"):  # a jitted (state, batch, rng) step
    lower = step.lower
  else:
    return step
  seen = set()

  def wrapped(state, batch, rng):
    shapes = tuple((k, tuple(v.shape), str(v.dtype))
                   for k, v in sorted(batch.items()))
    if shapes not in seen:
      seen.add(shapes)
      report(compiled_plan(lower(state, batch, rng).compile()), shapes)
      release_freed_host_memory()  # the compiler's heap, before the step's
    return step(state, batch, rng)
  return wrapped
