"""Aspect-ratio buckets against square data at about the same pixel count.

  python benchmarks/bench_buckets.py [--config=configs/tiny.py] \
      [--image_size=64] [--images=200] [--steps=8] [--repeats=3] \
      [--config.training.batch_size=8]

Makes a folder of mixed aspect ratios with PIL (60% 4:3 landscapes 80x60,
30% 3:4 portraits 60x80, 10% squares 64x64, noise so nothing compresses
away), then, in one process with one train state and one donated jitted
step (TrainSetup.make_train_step, as training builds it):

- compiles: the first call of the step at each batch shape, square and
  every bucket's, minus that shape's median step time afterwards (what a
  run pays once per bucket; the persistent compilation cache is off here);
- throughput after the compiles: windows of `steps` steps of the real loop
  (the loader's next batch, TrainSetup.global_batch, the step) over the
  bucketed data (data.buckets="auto": 56x72, 72x56 and 64x64 at a 64 px
  base) and over the same images square-cropped (64x64), the two
  alternating so a shared machine's load falls on both; medians of
  `repeats` windows, as images per second and as pixels per second
  (the buckets hold ~1.6% fewer pixels than the square);
- the step's cache size at the end: one executable per shape seen, however
  often the shapes alternated.

Prints one JSON object; `ratio` is bucketed / square (> 1: buckets faster).
"""
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs",
                                                       "tiny.py"),
                                "Config file (its model and batch size).")
flags.DEFINE_integer("image_size", 64, "The square base in pixels.")
flags.DEFINE_integer("images", 200, "Images in the generated folder.")
flags.DEFINE_integer("steps", 8, "Steps per timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows per variant (medians).")
FLAGS = flags.FLAGS

# (width, height) at a 64 px base and each one's share of the folder.
MIX = (((80, 60), 0.6), ((60, 80), 0.3), ((64, 64), 0.1))


def make_folder(path: str, count: int, base: int) -> str:
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  sizes = [size for size, share in MIX for _ in range(round(share * count))]
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i, (w, h) in enumerate(sizes):
      w, h = w * base // 64, h * base // 64
      pixels = rng.integers(0, 255, (h, w, 3), np.uint8)
      Image.fromarray(pixels).save(os.path.join(path, f"{i:04d}.png"))
      f.write(json.dumps({"file_name": f"{i:04d}.png",
                          "text": f"a picture {i % 10}"}) + "\n")
  return path


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top

  config = environment.resolve(FLAGS.config)
  folder = make_folder(os.path.join(tempfile.mkdtemp(), "mixed"),
                       FLAGS.images, FLAGS.image_size)
  config.data.source = "imagefolder"
  config.data.path = folder
  config.data.image_size = FLAGS.image_size
  config.data.num_channels = 3
  config.model.in_channels = config.model.out_channels = 3
  config.data.buckets = "auto"
  setup = build.TrainSetup(config)
  shapes = pipeline.bucket_shapes(config, setup.components.autoencoder)
  source = pipeline.make_source(config)
  tokenizer = setup.components.tokenizer
  loaders = {
      "square": pipeline.make_loader(config, tokenizer, source),
      "buckets": pipeline.make_loader(config, tokenizer, source,
                                      bucket_shapes=shapes)}
  step = setup.make_train_step()
  state = setup.create_train_state(jax.random.key(0))
  key = jax.random.key(1)

  def one(variant):
    nonlocal state
    batch = setup.global_batch(loaders[variant].next_batch())
    state, metrics = step(state, batch, key)
    return batch["image"].shape[1:3], metrics

  # Compiles: the first call at each shape (square first, then each bucket
  # as the bucketed loader brings it up).
  first_call = {}
  start = time.perf_counter()
  shape, metrics = one("square")
  jax.block_until_ready(metrics)
  first_call[("square", shape)] = time.perf_counter() - start
  plan = loaders["buckets"].plan
  present = {plan.shapes[k] for k in range(len(plan.shapes))
             if plan.counts[k]}
  calls = 0
  # A bucketed batch also holds its crop offsets, so even its 64x64 bucket
  # is another executable than the square data's.
  while {s for v, s in first_call if v == "buckets"} != present and (
      calls < 200):
    start = time.perf_counter()
    shape, metrics = one("buckets")
    jax.block_until_ready(metrics)
    if ("buckets", shape) not in first_call:
      first_call[("buckets", shape)] = time.perf_counter() - start
    calls += 1

  # Throughput, the variants alternating; per-shape step times on the side.
  times = {"square": [], "buckets": []}
  per_shape = {}
  for r in range(FLAGS.repeats):
    for variant in (("square", "buckets") if r % 2 == 0
                    else ("buckets", "square")):
      start = time.perf_counter()
      for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        shape, metrics = one(variant)
        jax.block_until_ready(metrics)
        per_shape.setdefault((variant, shape), []).append(
            time.perf_counter() - t0)
      times[variant].append(time.perf_counter() - start)
  for loader in loaders.values():
    loader.close()

  batch = config.training.batch_size
  square_pixels = FLAGS.image_size ** 2
  bucket_pixels = float(np.average(
      [h * w for h, w in plan.shapes], weights=plan.counts))
  out = {"device": jax.devices()[0].device_kind,
         "config": {"batch_size": batch, "image_size": FLAGS.image_size,
                    "images": FLAGS.images,
                    "block_out_channels": list(
                        config.model.block_out_channels)},
         "bucket_images": {f"{h}x{w}": int(n) for (h, w), n in
                     zip(plan.shapes, plan.counts)}}
  for variant, pixels in (("square", square_pixels),
                          ("buckets", bucket_pixels)):
    seconds = statistics.median(times[variant]) / FLAGS.steps
    out[variant] = {"images_per_second": batch / seconds,
                    "megapixels_per_second": batch * pixels / seconds / 1e6,
                    "mean_pixels_per_image": pixels,
                    "seconds_per_step_windows": [t / FLAGS.steps for t in
                                                 times[variant]]}
  out["ratio"] = {
      k: out["buckets"][k] / out["square"][k]
      for k in ("images_per_second", "megapixels_per_second")}
  step_medians = {s: statistics.median(v) for s, v in per_shape.items()}
  out["compile_seconds"] = {
      f"{v} {h}x{w}": first_call[(v, (h, w))] - step_medians.get(
          (v, (h, w)), 0.0) for v, (h, w) in first_call}
  out["step_seconds_median"] = {f"{v} {h}x{w}": t for (v, (h, w)), t in
                                step_medians.items()}
  # One per (variant, shape): each bucket compiled once however often the
  # shapes alternated.
  out["executables"] = step.jitted._cache_size()  # pylint: disable=protected-access
  out["shapes_seen"] = len(set(per_shape) | set(first_call))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
