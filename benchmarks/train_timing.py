"""Timing of a config's real train step, shared by bench_train.py and
bench_fast_paths.py (imported as a sibling module: both run as scripts from
this folder).

The step is built by jaxsd.diffusion.setup.TrainSetup, exactly as training builds it.
"""
import os
import statistics
import time


def synthetic_batch(setup):
  """A uniform-noise image batch with empty-prompt captions, in the step's
  batch layout and sharding (speed does not depend on the pixel values)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  comps = setup.components
  k, b = setup.steps_per_call, setup.config.training.batch_size
  lead = (k, b) if k > 1 else (b,)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, lead + comps.image_shape).astype(
               np.float32),
           "input_ids": np.tile(comps.uncond_ids[0], lead + (1,))}
  return jax.device_put(batch, setup.batch_sharding)


def measure(config, windows: int, steps_per_window: int, donate: bool = True):
  """Figures of the config's JAX train step in this process: images/s
  (median over windows), compile seconds (first call minus a steady call),
  peak memory, parameter count, device."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build
  from jaxsd.training import state as ts  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import memory  # pylint: disable=g-import-not-at-top
  setup = build.TrainSetup(config)
  state = setup.create_train_state(jax.random.key(0))
  step = setup.make_train_step(donate=donate)
  batch = synthetic_batch(setup)
  k, b = setup.steps_per_call, config.training.batch_size
  key = jax.random.key(1)
  start = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  calls = max(1, steps_per_window // k)
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(calls):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) / (calls * k))
  med = statistics.median(times)
  return {"implementation": config.model.implementation,
          "images_per_second": b / med,
          "seconds_per_step_median": med,
          "seconds_per_step_windows": times,
          "compile_seconds": max(first - med * k, 0.0),
          "peak_memory_gb": memory.peak_memory_gb(),
          "params": ts.param_count(state.params),
          "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
