"""Encode a dataset once into a latent cache for latent diffusion runs.

python -m jaxsd.cache --config=configs/mnist_latent.py --out=DIR \
    [--config.model.autoencoder=...] [--batch_size=64] [--shard_size=4096]

Reads the config's data (data.*) in index order, transforms every image as
training does (centre crop; random crops and flips are refused: the cache
holds one encoding per image), encodes it with the frozen model.autoencoder
and writes the posterior (mean, logvar) and the captions as shards
(jaxsd/data/latent_cache.py), then cache.json. Train from it with
`--config.data.latent_cache=DIR`: the loader reads the cache instead of the
images, in the same order, and the step samples the posterior as before.
One process; rerunning overwrites DIR's shards.
"""
import os
import time

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from jaxsd import cli

FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "The training configuration whose data and "
      "model.autoencoder to cache.", lock_config=True)
  flags.DEFINE_string("out", None, "The cache folder (created).")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
  flags.DEFINE_integer("shard_size", 4096, "Examples per shard.")
  flags.mark_flags_as_required(["config", "out"])


def _check(config):
  data = config.data
  if not config.model.autoencoder:
    raise ValueError("model.autoencoder is empty: a latent cache holds an "
                     "autoencoder's latents; name the autoencoder "
                     "(--config.model.autoencoder=...).")
  if data.random_flip or data.crop != "center":
    raise ValueError(
        f"data.random_flip={data.random_flip}, data.crop={data.crop!r}: a "
        "latent cache holds one encoding per image, so random flips and "
        "crops cannot vary per epoch. Set data.random_flip=False and "
        "data.crop='center' for cached runs.")
  if data.latent_cache:
    raise ValueError("data.latent_cache is set: cache the images, not a "
                     "cache (drop --config.data.latent_cache).")


def _examples(source):
  from jaxsd.data import sources  # pylint: disable=g-import-not-at-top
  if isinstance(source, sources.StreamSource):
    yield from iter(source)
  else:
    for i in range(len(source)):
      yield source[i]


def write_cache(config, out: str, batch_size: int = 64,
                shard_size: int = 4096):
  """Encodes config's data with model.autoencoder into `out`; returns the
  CacheInfo written."""
  from jaxsd import config_checks, environment, latent  # pylint: disable=g-import-not-at-top
  from jaxsd.data import latent_cache, pipeline, transforms  # pylint: disable=g-import-not-at-top
  config = environment.resolve(config)
  config_checks.validate(config)
  _check(config)
  frozen = latent.load(config.model.autoencoder)
  latent.check_run_config(frozen, config)
  source = pipeline.make_source(config)
  transform = transforms.ImageTransform(
      image_size=config.data.image_size, num_channels=config.data.num_channels,
      pad_small=config.data.source == "mnist")
  os.makedirs(out, exist_ok=True)
  info_path = os.path.join(out, latent_cache.INFO_FILE)
  if os.path.exists(info_path):
    os.remove(info_path)  # incomplete until written again
  encode = jax.jit(lambda p, x: frozen.encode(p, x))
  total = len(source) if hasattr(source, "__len__") else None
  shards, pending = [], {"mean": [], "logvar": [], "captions": [], "keys": []}
  images, captions, keys = [], [], []
  count, start = 0, time.perf_counter()

  def flush_batch():
    n = len(images)
    batch = np.stack(images + [images[-1]] * (batch_size - n))
    mean, logvar = jax.device_get(encode(frozen.params, jnp.asarray(batch)))
    pending["mean"].append(mean[:n])
    pending["logvar"].append(logvar[:n])
    pending["captions"] += captions
    pending["keys"] += keys
    images.clear(), captions.clear(), keys.clear()

  def flush_shard():
    name = f"{len(shards):05d}"
    mean = np.concatenate(pending["mean"])
    latent_cache.write_shard(out, name, mean,
                             np.concatenate(pending["logvar"]),
                             pending["captions"], pending["keys"])
    shards.append({"name": name, "examples": len(mean)})
    for v in pending.values():
      v.clear()

  for example in _examples(source):
    key = str(example.get("key", count))
    image = transform(example["image"], key)
    if image is None:
      raise ValueError(
          f"Image {key!r} does not decode. A latent cache keeps example i of "
          "the data as its example i, so it cannot skip it: fix or remove the "
          "file, then write the cache again.")
    images.append(image)
    captions.append(transforms.caption_of(example, key))
    keys.append(key)
    count += 1
    if len(images) == batch_size:
      flush_batch()
      if sum(len(m) for m in pending["mean"]) >= shard_size:
        flush_shard()
      if count % (batch_size * 20) == 0:
        rate = count / (time.perf_counter() - start)
        eta = (f", ETA {(total - count) / rate:.0f} s" if total else "")
        logging.info("cache: %d%s examples, %.0f/s%s", count,
                     f"/{total}" if total else "", rate, eta)
  if images:
    flush_batch()
  if pending["mean"]:
    flush_shard()
  if not count:
    raise ValueError("The data holds no examples to cache.")
  info = latent_cache.CacheInfo(
      examples=count, shards=shards,
      latent_shape=list(frozen.latent_shape(config.data.image_size)),
      autoencoder=config.model.autoencoder,
      autoencoder_fingerprint=frozen.fingerprint(),
      data=latent_cache.data_fields(config.data))
  info.save(out)
  logging.info("Wrote a latent cache of %d examples in %d shards to %s in "
               "%.1f s.", count, len(shards), out,
               time.perf_counter() - start)
  return info


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  write_cache(FLAGS.config, FLAGS.out, FLAGS.batch_size, FLAGS.shard_size)


def run():
  """The `jaxsd-cache` command (`python -m jaxsd.cache`)."""
  cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
