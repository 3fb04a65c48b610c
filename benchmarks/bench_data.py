"""Data loading speed and memory: jaxsd.data's loader over JPEG files.

python benchmarks/bench_data.py [--sizes=64,256] [--workers=0,1,2]
    [--examples=256] [--batch=32] [--repeats=3] [--shards=4]
    [--train_steps=0]

Writes synthetic photos (512x384 JPEG, noise under coloured shapes) to a
temporary folder, once as an image folder (metadata.jsonl) and once as
webdataset shards, then prints one JSON object:
- `throughput`: examples per second of each source at each image size and
  worker count, the median of `repeats` passes over all examples after a
  warm-up batch (decode, resize, crop, flip, scale, tokenise);
- `stream_memory`: peak RSS of a child process streaming the webdataset
  source through the loader twice over, with `shards` and with 10x as many
  shards of the same size (bounded memory: the two within 10%), with
  data.shuffle_buffer=--stream_buffer (the window of raw examples a reader
  holds, the memory to budget: shuffle_buffer x the mean example size, per
  worker);
- with --train_steps=N: `data_wait_percent` of a configs/imagefolder.py run
  of N steps on the image folder (system/data_wait_percent, the share of
  training time the loop waited for the next batch; the first log interval,
  which includes compiling, is left out).
"""
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

flags.DEFINE_list("sizes", ["64", "256"], "data.image_size values.")
flags.DEFINE_list("workers", ["0", "1", "2"], "data.workers values.")
flags.DEFINE_integer("examples", 256, "Synthetic photos.")
flags.DEFINE_integer("batch", 32, "Global batch size.")
flags.DEFINE_integer("repeats", 3, "Timed passes (median reported).")
flags.DEFINE_integer("shards", 4, "Webdataset shards (memory test: x1, x10).")
flags.DEFINE_integer("train_steps", 0, "Steps of an imagefolder training run "
                     "for data_wait_percent (0: skip).")
flags.DEFINE_integer("stream_buffer", 100, "data.shuffle_buffer of the memory "
                     "test (below the smaller run's examples, so both hold a "
                     "full window).")
flags.DEFINE_string("child_stream", None, "Internal: stream these shards and "
                    "print the peak RSS.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(i: int) -> bytes:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(i)
  image = Image.fromarray(rng.integers(0, 255, (384, 512, 3), np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(5):
    x, y = rng.integers(0, 400), rng.integers(0, 300)
    draw.ellipse([x, y, x + 100, y + 80],
                 fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def write_datasets(root: str, count: int, shards: int):
  """(image folder, webdataset shard pattern) of `count` photos."""
  folder = os.path.join(root, "images")
  os.makedirs(folder)
  photos = [_photo(i) for i in range(count)]
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    for i, data in enumerate(photos):
      with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as image:
        image.write(data)
      f.write(json.dumps({"file_name": f"{i:05d}.jpg",
                          "text": f"photo number {i}"}) + "\n")
  return folder, write_shards(os.path.join(root, "shards"), photos, shards)


def write_shards(folder: str, photos, shards: int) -> str:
  os.makedirs(folder, exist_ok=True)
  per_shard = -(-len(photos) // shards)
  for s in range(shards):
    with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
      for i in range(s * per_shard, min((s + 1) * per_shard, len(photos))):
        for suffix, data in (("jpg", photos[i]),
                             ("txt", f"photo number {i}".encode())):
          info = tarfile.TarInfo(f"{i:06d}.{suffix}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(folder, f"{{00000..{shards - 1:05d}}}.tar")


def _config(source: str, path: str, size: int, workers: int):
  from configs import imagefolder  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  config = environment.resolve(imagefolder.get_config())
  config.data.source, config.data.path = source, path
  config.data.image_size, config.data.workers = size, workers
  config.training.batch_size = FLAGS.batch
  return config


def throughput(source_name: str, path: str, size: int, workers: int):
  """Median examples/s over passes of the loader through all examples."""
  from jaxsd.text import encoder as text  # pylint: disable=g-import-not-at-top
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _config(source_name, path, size, workers)
  tokenizer = text.load_tokenizer(config.text.tokenizer)
  loader = pipeline.make_loader(config, tokenizer)
  try:
    loader.next_batch()  # warm-up: workers start, first batch
    batches = max(1, FLAGS.examples // FLAGS.batch)
    rates = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      for _ in range(batches):
        loader.next_batch()
      rates.append(batches * FLAGS.batch / (time.perf_counter() - start))
  finally:
    loader.close()
  return statistics.median(rates)


def stream_child(pattern: str):
  """Streams the shards through the loader twice over; prints peak RSS."""
  from jaxsd.text import encoder as text  # pylint: disable=g-import-not-at-top
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _config("webdataset", pattern, 64, 0)
  config.data.shuffle_buffer = FLAGS.stream_buffer
  tokenizer = text.load_tokenizer(config.text.tokenizer)
  loader = pipeline.make_loader(config, tokenizer)
  batches = 2 * FLAGS.examples // FLAGS.batch
  for _ in range(batches):
    loader.next_batch()
  loader.close()
  print(json.dumps({"peak_rss_mb": resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024, "batches": batches,
                    "shuffle_buffer": FLAGS.stream_buffer}))


def stream_memory(root: str):
  """Peak RSS streaming `shards` and 10x as many shards of the same size,
  each twice over (so the larger run reads 10x more data)."""
  photos = [_photo(i) for i in range(FLAGS.examples)]
  out = {}
  for factor in (1, 10):
    folder = os.path.join(root, f"memory_x{factor}")
    pattern = write_shards(folder, photos * factor, FLAGS.shards * factor)
    cmd = [sys.executable, os.path.abspath(__file__),
           f"--child_stream={pattern}",
           f"--examples={FLAGS.examples * factor}",
           f"--batch={FLAGS.batch}",
           f"--stream_buffer={FLAGS.stream_buffer}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            check=True)
    out[f"shards_{FLAGS.shards * factor}"] = json.loads(
        result.stdout.strip().splitlines()[-1])
  small, large = (out[f"shards_{FLAGS.shards * f}"]["peak_rss_mb"]
                  for f in (1, 10))
  out["ratio"] = large / small
  return out


def data_wait(folder: str, root: str):
  """system/data_wait_percent of a short configs/imagefolder.py run."""
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  config = _config("imagefolder", folder, 64, 1)
  config.training.batch_size = 16
  config.training.num_steps = FLAGS.train_steps
  config.training.log_every = max(1, FLAGS.train_steps // 5)
  config.training.eval_every = config.training.checkpoint_every = 10**9
  config.eval.metrics = ()
  workdir = os.path.join(root, "run")
  diffusion_task.train_and_evaluate(config, workdir)
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  (run,) = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  history = client.get_metric_history(run.info.run_id,
                                      "system/data_wait_percent")
  values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
  return {"steps": FLAGS.train_steps, "per_interval": values,
          "median": statistics.median(values) if values else None}


def main(argv):
  del argv
  if FLAGS.child_stream:
    stream_child(FLAGS.child_stream)
    return
  import jax  # pylint: disable=g-import-not-at-top
  result = {"examples": FLAGS.examples, "batch": FLAGS.batch,
            "cpu_count": os.cpu_count(), "throughput": {}}
  with tempfile.TemporaryDirectory(prefix="jaxsd-bench-data-") as root:
    folder, pattern = write_datasets(root, FLAGS.examples, FLAGS.shards)
    for source, path in (("imagefolder", folder), ("webdataset", pattern)):
      for size in map(int, FLAGS.sizes):
        for workers in map(int, FLAGS.workers):
          result["throughput"][f"{source}/{size}px/workers_{workers}"] = (
              throughput(source, path, size, workers))
    result["stream_memory"] = stream_memory(root)
    if FLAGS.train_steps:
      result["data_wait_percent"] = data_wait(folder, root)
  result["device"] = jax.devices()[0].device_kind
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
