"""Writing a latent cache: a dataset encoded once by a frozen autoencoder.

`write_cache(config, out)` reads the config's data (data.*) in index order,
transforms every image as training does (centre crop, at its bucket's shape
with data.buckets; random crops and flips are refused: the cache holds one
encoding per image), encodes it with the
frozen model.autoencoder and writes the posterior (mean, logvar) [n, h, w, c]
float32 and the captions as shards, then cache.json
(jaxsd/data/latent_cache.py holds the layout and reads it back). One
process; writing again overwrites out's shards.

With a frozen pretrained text encoder (`wants_text_embeddings`) the cache
also holds the captions' text embeddings [u, L, D], one per distinct caption
of a shard, in float32 or float16.

What `jaxsd-cache` runs.
"""
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


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


def wants_text_embeddings(config, text_embeddings: str = "auto") -> bool:
  """Whether the cache stores text embeddings (see the module docstring)."""
  frozen = bool(config.text.pretrained) and not config.text.trainable
  if text_embeddings == "auto":
    return frozen
  if text_embeddings == "true" and not frozen:
    raise ValueError(
        f"--text_embeddings=true needs a frozen pretrained text encoder, but "
        f"text.pretrained={config.text.pretrained!r} and text.trainable="
        f"{config.text.trainable}: a trained (or randomly initialised) "
        "encoder's embeddings change during the run. Set text.pretrained and "
        "text.trainable=False, or --text_embeddings=false.")
  if text_embeddings not in ("true", "false"):
    raise ValueError(f"--text_embeddings={text_embeddings!r}; choose auto, "
                     "true or false.")
  return text_embeddings == "true"


class _TextEmbedder:
  """The run's frozen text encoder over captions, distinct ones once."""

  def __init__(self, config, batch_size: int, dtype: str):
    from jaxsd.autoencoder import frozen as latent
    from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
    self.tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
    encoder = text_lib.TextEncoder(config.text,
                                   text_lib.vocab_size(self.tokenizer))
    self.params = encoder.init(jax.random.key(0))  # pretrained: no rng use
    self.max_length = config.text.max_length
    self.fingerprint = latent.text_fingerprint(self.params, self.max_length)
    self.shape = [self.max_length, encoder.hidden_size]
    self.batch_size, self.dtype = batch_size, np.dtype(dtype)
    self._tokenize = text_lib.tokenize
    self._encode = jax.jit(encoder)

  def __call__(self, captions):
    """captions -> (context [u, L, D] of the distinct ones, index per
    caption)."""
    rows = {}
    index = [rows.setdefault(c, len(rows)) for c in captions]
    distinct = list(rows)
    out = []
    for i in range(0, len(distinct), self.batch_size):
      chunk = distinct[i:i + self.batch_size]
      ids = self._tokenize(self.tokenizer, chunk + [chunk[-1]] * (
          self.batch_size - len(chunk)), self.max_length)
      out.append(np.asarray(jax.device_get(
          self._encode(self.params, jnp.asarray(ids))))[:len(chunk)])
    return np.concatenate(out).astype(self.dtype), index


def _examples(source):
  from jaxsd.data import sources  # pylint: disable=g-import-not-at-top
  if isinstance(source, sources.StreamSource):
    yield from iter(source)
  else:
    for i in range(len(source)):
      yield source[i]


def write_cache(config, out: str, batch_size: int = 64,
                shard_size: int = 4096, text_embeddings: str = "auto",
                embedding_dtype: str = "float32"):
  """Encodes config's data with model.autoencoder (and, see
  `wants_text_embeddings`, its captions with the frozen text encoder) into
  `out`; returns the CacheInfo written."""
  from jaxsd import config_checks
  from jaxsd import environment
  from jaxsd.autoencoder import frozen as latent  # pylint: disable=g-import-not-at-top
  from jaxsd.data import latent_cache as layout  # pylint: disable=g-import-not-at-top
  from jaxsd.data import buckets, pipeline, transforms  # pylint: disable=g-import-not-at-top
  from jaxsd.interop import sd_pipeline  # pylint: disable=g-import-not-at-top
  config = sd_pipeline.resolve(environment.resolve(config))
  config_checks.validate(config)
  _check(config)
  frozen = latent.load(config.model.autoencoder)
  latent.check_run_config(frozen, config)
  config_checks.check_latent_size(config, frozen.config.downsample_factor)
  embed = (_TextEmbedder(config, batch_size, embedding_dtype)
           if wants_text_embeddings(config, text_embeddings) else None)
  source = pipeline.make_source(config)
  transform = pipeline.image_transform(config.data)
  os.makedirs(out, exist_ok=True)
  info_path = os.path.join(out, layout.INFO_FILE)
  if os.path.exists(info_path):
    os.remove(info_path)  # incomplete until written again
  encode = jax.jit(lambda p, x: frozen.encode(p, x))
  total = len(source) if hasattr(source, "__len__") else None
  shapes = pipeline.bucket_shapes(config, frozen)
  assignment = (buckets.source_assignment(source, shapes) if shapes
                else None)
  # One group of pending examples per bucket (one in all without buckets);
  # a shard holds one group's examples.
  groups = {}
  shards = []
  count, start = 0, time.perf_counter()

  def group(k):
    if k not in groups:
      groups[k] = {"images": [], "captions": [], "keys": [], "extra": [],
                   "pending": {"mean": [], "logvar": [], "captions": [],
                               "keys": [], "extra": []}}
    return groups[k]

  def flush_batch(g):
    images, pending = g["images"], g["pending"]
    n = len(images)
    batch = np.stack(images + [images[-1]] * (batch_size - n))
    mean, logvar = jax.device_get(encode(frozen.params, jnp.asarray(batch)))
    pending["mean"].append(mean[:n])
    pending["logvar"].append(logvar[:n])
    for name in ("captions", "keys", "extra"):
      pending[name] += g[name]
      g[name].clear()
    images.clear()

  def flush_shard(k, g):
    pending = g["pending"]
    name = f"{len(shards):05d}"
    mean = np.concatenate(pending["mean"])
    context, index = embed(pending["captions"]) if embed else (None, None)
    extra = None
    if shapes:
      extra = {field: [int(e[i]) for e in pending["extra"]] for i, field in
               enumerate(("indices", "crop_top", "crop_left"))}
    layout.write_shard(out, name, mean, np.concatenate(pending["logvar"]),
                       pending["captions"], pending["keys"], context, index,
                       extra)
    shards.append({"name": name, "examples": len(mean)})
    if shapes:
      shards[-1]["bucket"] = list(shapes[k])
    for v in pending.values():
      v.clear()

  for example in _examples(source):
    key = str(example.get("key", count))
    if shapes:
      k = int(assignment[count])
      made = transform.to_bucket(example["image"], shapes[k], key)
      image, extra = (None, None) if made is None else (
          made[0], (count, made[1], made[2]))
    else:
      k, image, extra = 0, transform(example["image"], key), None
    if image is None:
      raise ValueError(
          f"Image {key!r} does not decode. A latent cache keeps example i of "
          "the data as its example i, so it cannot skip it: fix or remove the "
          "file, then write the cache again.")
    g = group(k)
    g["images"].append(image)
    g["captions"].append(transforms.caption_of(example, key))
    g["keys"].append(key)
    g["extra"].append(extra)
    count += 1
    if len(g["images"]) == batch_size:
      flush_batch(g)
      if sum(len(m) for m in g["pending"]["mean"]) >= shard_size:
        flush_shard(k, g)
      if count % (batch_size * 20) == 0:
        rate = count / (time.perf_counter() - start)
        eta = (f", ETA {(total - count) / rate:.0f} s" if total else "")
        logging.info("cache: %d%s examples, %.0f/s%s", count,
                     f"/{total}" if total else "", rate, eta)
  for k in sorted(groups):
    if groups[k]["images"]:
      flush_batch(groups[k])
    if groups[k]["pending"]["mean"]:
      flush_shard(k, groups[k])
  if not count:
    raise ValueError("The data holds no examples to cache.")
  info = layout.CacheInfo(
      examples=count, shards=shards,
      latent_shape=list(frozen.latent_shape(config.data.image_size)),
      autoencoder=config.model.autoencoder,
      autoencoder_fingerprint=frozen.fingerprint(),
      data=layout.data_fields(config.data),
      buckets=[list(shape) for shape in shapes] if shapes else None)
  if embed:
    info.text_fingerprint = embed.fingerprint
    info.text_encoder = config.text.pretrained
    info.context_shape = embed.shape
    info.context_dtype = embedding_dtype
  info.save(out)
  logging.info("Wrote a latent cache of %d examples in %d shards to %s in "
               "%.1f s%s.", count, len(shards), out,
               time.perf_counter() - start,
               " with text embeddings" if embed else "")
  return info
