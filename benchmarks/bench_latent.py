"""Latent diffusion's train step: encoding on the fly vs a latent cache, and
the pixel-space step for scale.

python benchmarks/bench_latent.py [--config=configs/mnist_latent.py]
    [--autoencoder=PATH] [--windows=5] [--steps=10]

Prints one JSON object with seconds per step (median of `windows` windows of
`steps` steps, after a compiling call) of:
- `on_the_fly`: the pixel batch through TrainSetup.global_batch (the frozen
  autoencoder encodes it) and the train step, as a run without a cache;
- `cached`: the step on a stored (mean, logvar) batch, as a run with
  data.latent_cache (reading the cache is not timed: the loader prefetches);
- `pixel`: configs/mnist.py's pixel-space step (batch 32, 28x28), if
  --pixel_config is set;
and the ratios. With --frozen_text=LAYERS,HIDDEN,LENGTH (e.g. 12,768,77,
CLIP ViT-L/14's text tower as in SD 1.x) the latent config also gets a
frozen "pretrained" random text encoder of that size, and `text_embeddings`
times the cached-latent step encoding the captions against reading their
stored embeddings (a cache written with text embeddings). Without --autoencoder a random autoencoder of the config's
`autoencoder` architecture is written to a temporary folder (speed does not
depend on the weights).
"""
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("config", "configs/mnist_latent.py", "A latent config.")
flags.DEFINE_string("autoencoder", "", "model.autoencoder (default: random).")
flags.DEFINE_string("pixel_config", "configs/mnist.py",
                    "A pixel-space config to time too ('' = skip).")
flags.DEFINE_string("frozen_text", "",
                    "LAYERS,HIDDEN,LENGTH of a frozen text encoder to time "
                    "stored text embeddings with ('' = skip).")
flags.DEFINE_integer("windows", 5, "Timed windows (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per window.")
FLAGS = flags.FLAGS


def _load(path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _random_autoencoder(config, folder):
  import jax  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxsd.models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  a = config.autoencoder
  ae_config = ae_lib.AutoencoderConfig(
      in_channels=config.data.num_channels,
      out_channels=config.data.num_channels,
      block_out_channels=tuple(a.block_out_channels),
      layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
      norm_num_groups=a.norm_num_groups,
      mid_block_add_attention=a.mid_block_add_attention, scaling_factor=1.0)
  params = ae_lib.init_params(ae_lib.AutoencoderKL(ae_config),
                              jax.random.key(0), config.data.image_size)
  save_file(ae_lib.to_diffusers_weights(params),
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(ae_config.to_diffusers(), f)
  return folder


def _time(fn, windows, steps):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / steps)
  return {"seconds_per_step_median": statistics.median(times),
          "windows": times}


def _latent_timings(config):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  setup = build.TrainSetup(config)
  comps = setup.components
  b = config.training.batch_size
  rng = np.random.default_rng(0)
  pixels = {"image": rng.uniform(-1, 1, (b,) + comps.pixel_shape).astype(
      np.float32), "input_ids": np.tile(comps.uncond_ids[0], (b, 1))}
  step = setup.make_train_step(donate=False)
  state = setup.create_train_state(jax.random.key(0))
  key = jax.random.key(1)
  stored = jax.device_get(setup.global_batch(pixels))

  def fly():
    return step(state, setup.global_batch(pixels), key)[1]

  def cached():
    return step(state, setup.global_batch(stored), key)[1]
  return {"on_the_fly": _time(fly, FLAGS.windows, FLAGS.steps),
          "cached": _time(cached, FLAGS.windows, FLAGS.steps),
          "latent_shape": list(comps.image_shape), "batch": b}


def _frozen_text_encoder(config, folder):
  """config.text -> a random frozen 'pretrained' CLIP text encoder of
  FLAGS.frozen_text's size, saved in folder."""
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  layers, hidden, length = (int(v) for v in FLAGS.frozen_text.split(","))
  t = config.text
  t.num_layers, t.hidden_size, t.max_length = layers, hidden, length
  t.num_heads, t.intermediate_size = max(hidden // 64, 1), 4 * hidden
  vocab = text_lib.vocab_size(text_lib.load_tokenizer(t.tokenizer))
  transformers.FlaxCLIPTextModel(text_lib.text_encoder_config(t, vocab),
                                 seed=0).save_pretrained(folder)
  t.pretrained, t.trainable = folder, False


def _text_embedding_timings(config):
  """The cached-latent step with a frozen text encoder: captions encoded in
  the step vs their stored embeddings."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  setup = build.TrainSetup(config)
  comps = setup.components
  b = config.training.batch_size
  rng = np.random.default_rng(0)
  pixels = {"image": rng.uniform(-1, 1, (b,) + comps.pixel_shape).astype(
      np.float32), "input_ids": np.tile(comps.uncond_ids[0], (b, 1))}
  stored = jax.device_get(setup.global_batch(pixels))
  state = setup.create_train_state(jax.random.key(0))
  with_context = {**stored, "context": np.asarray(comps.encode(
      state.params, stored["input_ids"]))}
  step = setup.make_train_step(donate=False)
  key = jax.random.key(1)
  encode = _time(lambda: step(state, setup.global_batch(stored), key)[1],
                 FLAGS.windows, FLAGS.steps)
  read = _time(lambda: step(state, setup.global_batch(with_context), key)[1],
               FLAGS.windows, FLAGS.steps)
  return {"text_encoder": FLAGS.frozen_text, "encode_captions": encode,
          "stored_embeddings": read,
          "speedup": (encode["seconds_per_step_median"]
                      / read["seconds_per_step_median"])}


def _pixel_timing(config):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  setup = build.TrainSetup(config)
  comps = setup.components
  b = config.training.batch_size
  batch = setup.global_batch({
      "image": np.random.default_rng(0).uniform(
          -1, 1, (b,) + comps.image_shape).astype(np.float32),
      "input_ids": np.tile(comps.uncond_ids[0], (b, 1))})
  step = setup.make_train_step(donate=False)
  state = setup.create_train_state(jax.random.key(0))
  key = jax.random.key(1)
  return _time(lambda: step(state, batch, key)[1], FLAGS.windows, FLAGS.steps)


def _cpu():
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return {}
  name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
               if line.startswith("model name")), "")
  return {"cpu": name, "avx512f": " avx512f " in text}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  config = environment.resolve(_load(FLAGS.config))
  result = {"config": FLAGS.config, **_cpu(), "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    with config.unlocked():
      config.model.autoencoder = (FLAGS.autoencoder
                                  or _random_autoencoder(config, tmp))
    result.update(_latent_timings(config))
    if FLAGS.frozen_text:
      with config.unlocked():
        _frozen_text_encoder(config, os.path.join(tmp, "text"))
      result["text_embeddings"] = _text_embedding_timings(config)
  fly = result["on_the_fly"]["seconds_per_step_median"]
  cached = result["cached"]["seconds_per_step_median"]
  result["cache_speedup"] = fly / cached
  if FLAGS.pixel_config:
    pixel = environment.resolve(_load(FLAGS.pixel_config))
    result["pixel"] = _pixel_timing(pixel)
    result["pixel_over_cached"] = (
        result["pixel"]["seconds_per_step_median"] / cached)
  result["device"] = jax.devices()[0].device_kind
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
