"""Training throughput of a config's model: jaxsd's UNet against diffusers'.

python benchmarks/bench_train.py --config=configs/mnist.py [--windows=5]
    [--steps_per_window=5] [--skip_diffusers]

For each UNet implementation (the config's, then diffusers' Flax UNet at the
same architecture) builds the real train step (text encoder, loss, AdamW,
EMA, batch sharded over all devices), times `windows` windows of
`steps_per_window` steps after a warm-up, and prints one JSON object:
images_per_second (median over windows), compile_seconds (first call minus a
steady step), peak_memory_gb (the process's peak RSS on CPU, the device's peak
bytes in use on GPU), the same for diffusers, and speedup_vs_diffusers.
Each implementation runs in a subprocess so its memory and compile cache are
its own.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file.")
flags.DEFINE_integer("windows", 5, "Timed windows (median reported).")
flags.DEFINE_integer("steps_per_window", 5, "Train steps per window.")
flags.DEFINE_bool("skip_diffusers", False, "Only the config's UNet.")
flags.DEFINE_string("implementation", None, "Internal: measure this UNet "
                    "implementation in this process and print its figures.")
FLAGS = flags.FLAGS


def _peak_memory_gb(jax):
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(config):
  """Figures of one implementation in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxsd import build, parallel, train_state as ts  # pylint: disable=g-import-not-at-top
  from jaxsd import train_step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  comps = build.build_components(config)
  tcfg = config.training
  k = tcfg.steps_per_call
  tx = ts.make_optimizer(config.optim, 10**6, config.text.trainable)
  replicated = parallel.replicated(mesh)
  state = jax.jit(lambda r: ts.create(comps.init_params(r), tx),
                  out_shardings=replicated)(jax.random.key(0))
  fn = step_lib.make_step_fn(
      unet_apply=comps.unet.apply, text_apply=comps.text_encoder,
      schedule=comps.schedule, uncond_ids=comps.uncond_ids, config=config,
      tx=tx, steps_per_call=k)
  sharding = (parallel.batch_sharding(mesh) if k == 1
              else parallel.stacked_batch_sharding(mesh))
  step = jax.jit(fn, in_shardings=(replicated, sharding, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  b = tcfg.batch_size
  lead = (k, b) if k > 1 else (b,)
  batch = {"image": rng.uniform(-1, 1, lead + comps.image_shape).astype(
               np.float32),
           "input_ids": np.tile(comps.uncond_ids[0], lead + (1,))}
  batch = jax.device_put(batch, sharding)
  key = jax.random.key(1)
  start = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  calls = max(1, FLAGS.steps_per_window // k)
  times = []
  for _ in range(FLAGS.windows):
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
          "peak_memory_gb": _peak_memory_gb(jax),
          "params": build.param_count(state.params),
          "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count()}


def _run_child(config_path, implementation, extra):
  cmd = [sys.executable, os.path.abspath(__file__), f"--config={config_path}",
         f"--implementation={implementation}",
         f"--windows={FLAGS.windows}",
         f"--steps_per_window={FLAGS.steps_per_window}", *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       check=False)
  if out.returncode:
    raise RuntimeError(f"{implementation} benchmark failed:\n"
                       f"{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  if FLAGS.implementation:
    config = FLAGS.config
    config.model.implementation = FLAGS.implementation
    print(json.dumps(measure(config)))
    return
  config_path = config_flags.get_config_filename(FLAGS["config"])
  extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
  del argv
  ours = _run_child(config_path, FLAGS.config.model.implementation, extra)
  result = {"config": config_path, "overrides": extra, **ours}
  if not FLAGS.skip_diffusers and ours["implementation"] != "diffusers":
    theirs = _run_child(config_path, "diffusers", extra)
    result.update({
        "diffusers_images_per_second": theirs["images_per_second"],
        "diffusers_compile_seconds": theirs["compile_seconds"],
        "diffusers_peak_memory_gb": theirs["peak_memory_gb"],
        "speedup_vs_diffusers": ours["images_per_second"]
                                / theirs["images_per_second"]})
  result["config_values"] = FLAGS.config.to_dict()
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
