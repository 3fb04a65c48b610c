"""Sampling throughput: images per second for a config's model, guidance on.

python benchmarks/bench_sample.py --config=configs/mnist.py [--batch=256]
    [--steps=25,50] [--sampler=dpmpp_2m] [--repeats=3]

Weights are freshly initialised (speed does not depend on their values).
Prints one JSON object: per step count the median images/s over `repeats`
timed calls after a warm-up call, and the compile seconds.
"""
import json
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file.")
flags.DEFINE_integer("batch", 256, "Images per call.")
flags.DEFINE_list("steps", ["25", "50"], "Sampler step counts.")
flags.DEFINE_string("sampler", "dpmpp_2m", "Sampler name.")
flags.DEFINE_float("guidance_scale", 3.0, "CFG scale (> 1: both branches).")
flags.DEFINE_integer("repeats", 3, "Timed calls per step count.")
FLAGS = flags.FLAGS


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build
  from jaxsd.diffusion import generate
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  mesh = parallel.make_mesh()
  comps = build.build_components(config)
  params = jax.jit(comps.init_params)(jax.random.key(0))
  prompts = [f"a photograph of the number {i % 10}" for i in range(FLAGS.batch)]
  result = {"config": config_flags.get_config_filename(FLAGS["config"]),
            "unet": config.model.implementation, "batch": FLAGS.batch,
            "sampler": FLAGS.sampler, "guidance_scale": FLAGS.guidance_scale,
            "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count()}
  for steps in map(int, FLAGS.steps):
    gen = generate.Generator(comps, mesh, sampler=FLAGS.sampler,
                             num_steps=steps,
                             guidance_scale=FLAGS.guidance_scale,
                             chunk_size=FLAGS.batch,
                             clip_x0=config.sampling.clip_x0)
    ids = gen.tokenize(prompts)
    start = time.perf_counter()
    gen(params, prompts, jax.random.key(0), input_ids=ids)  # compile + run
    first = time.perf_counter() - start
    times = []
    for r in range(FLAGS.repeats):
      start = time.perf_counter()
      gen(params, prompts, jax.random.key(r + 1), input_ids=ids)
      times.append(time.perf_counter() - start)
    med = statistics.median(times)
    result[f"steps_{steps}"] = {
        "images_per_second": FLAGS.batch / med,
        "seconds_per_batch_median": med,
        "seconds_per_batch_all": times,
        "compile_seconds": max(first - med, 0.0)}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
