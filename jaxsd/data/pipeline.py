"""A config's training data: its source, its loader, and what a run shows.

Training, benchmarks and tests build data through these, so the batches a
benchmark times are the ones a run trains on.
"""
import json
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from jaxsd import errors
from jaxsd import parallel
from jaxsd.text import encoder as text_lib
from jaxsd.data import buckets as buckets_lib
from jaxsd.data import loader as loader_lib
from jaxsd.data import sources
from jaxsd.data import transforms

PREVIEW_EXAMPLES = 8  # training examples shown at the start of a run


def make_source(config, split: Optional[str] = None):
  return sources.make_source(config.data, split)


def make_latent_cache_source(config, image_source, autoencoder,
                             text_fingerprint: Optional[str] = None):
  """The latent cache of data.latent_cache, checked: written from this data
  (same fields, same number of examples) by this autoencoder.

  text_fingerprint: the run's frozen text encoder's
  (Components.frozen_text_fingerprint(), None if it trains); a cache with
  text embeddings then delivers them as "context", checked to be that
  encoder's.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jaxsd.data import latent_cache  # pylint: disable=g-import-not-at-top
  directory = config.data.latent_cache
  if autoencoder is None:
    raise ValueError(
        f"data.latent_cache={directory!r} holds autoencoder latents, but "
        "model.autoencoder is empty (a pixel-space run); set "
        "model.autoencoder to the autoencoder the cache was written with.")
  cache = latent_cache.LatentCacheSource(directory)
  latent_cache.check_matches(cache.info, config.data,
                             autoencoder.fingerprint(), directory)
  shapes = bucket_shapes(config, autoencoder)
  stored = ([tuple(s) for s in cache.info.buckets] if cache.info.buckets
            else None)
  if stored != (list(shapes) if shapes else None):
    name = lambda s: ",".join(map(buckets_lib.name, s)) if s else "off"
    raise ValueError(
        f"The latent cache {directory} was written with buckets "
        f"{name(stored)}, this run's data.buckets gives {name(shapes)}; "
        "write the cache again (jaxsd-cache) or match data.buckets.")
  if (not isinstance(image_source, sources.StreamSource)
      and len(image_source) != len(cache)):
    raise ValueError(
        f"The latent cache {directory} holds {len(cache)} examples but the "
        f"data has {len(image_source)}; the data changed since it was "
        "written: write it again (jaxsd-cache).")
  if cache.info.has_text_embeddings:
    if text_fingerprint is None:
      logging.info("The latent cache's text embeddings are not used: this "
                   "run's text encoder is not a frozen pretrained one, so "
                   "the step encodes the captions.")
    else:
      latent_cache.check_text_matches(cache.info, text_fingerprint, directory)
      cache.read_context = True
  return cache


def bucket_shapes(config, autoencoder=None):
  """The run's aspect-ratio buckets in pixels ((height, width), sorted), or
  None with data.buckets off; "auto" sizes them for the model (the UNet's
  downsampling times `autoencoder`'s, a latent run's FrozenAutoencoder)."""
  factor = autoencoder.config.downsample_factor if autoencoder else 1
  return buckets_lib.shapes_of(config, factor)


def make_loader(config, tokenizer, source=None, process_index: int = 0,
                process_count: int = 1, bucket_shapes=None):
  """This process's loader of the config's training batches.

  MNIST's 28x28 digits are padded, not upscaled, to a larger image_size.
  bucket_shapes: the run's buckets (`bucket_shapes(config, autoencoder)`),
  None for square batches.
  """
  data = config.data
  source = source if source is not None else make_source(config)

  def tokenize(captions: List[str]) -> np.ndarray:
    return text_lib.tokenize(tokenizer, captions, config.text.max_length)
  return loader_lib.make_loader(
      source, global_batch_size=config.training.batch_size,
      image_size=data.image_size, tokenize_fn=tokenize,
      seed=config.training.seed, shuffle=data.shuffle,
      num_channels=data.num_channels, crop=data.crop,
      random_flip=data.random_flip, pad_small=data.source == "mnist",
      background=background(data), workers=data.workers, shuffle_buffer=data.shuffle_buffer,
      cycle_length=data.cycle_length, process_index=process_index,
      process_count=process_count, bucket_shapes=bucket_shapes)


def next_model_batch(loader, steps: int = 1) -> Dict[str, np.ndarray]:
  """The next batch; with steps > 1 the next `steps` batches stacked on a
  leading axis (one call of training.steps_per_call steps)."""
  if steps == 1:
    return loader.next_batch()
  parts = [loader.next_batch() for _ in range(steps)]
  return {key: np.stack([p[key] for p in parts]) for key in parts[0]}


class TooManySkippedImagesError(errors.DataError):
  """More of the data's images did not decode than data.max_skipped_fraction
  allows."""


def check_skipped(loader, max_fraction: float) -> None:
  """Raises on every process once more than `max_fraction` of the images
  one process read did not decode, naming the first of them (a collective
  in multi-process runs: every process must call it)."""
  stats = loader.statistics()
  too_many = bool(stats["skipped"]) and stats["skipped_fraction"] > max_fraction
  if not parallel.any_process(too_many):
    return
  # Distinct: an undecodable image read again in a later epoch is one file.
  first = list(dict.fromkeys(stats["skipped_keys"]))
  raise TooManySkippedImagesError(
      (f"{stats['skipped']} images ({100 * stats['skipped_fraction']:.1f}% "
       f"of those read) did not decode" if too_many else
       "Another process's images did not decode (its log names them)")
      + f", more than data.max_skipped_fraction={max_fraction}"
      + (f"; the first: {', '.join(first)}" if first else "")
      + ". Fix or remove the files, or raise data.max_skipped_fraction.")


# --- Loader state in checkpoints ------------------------------------------------


def per_process_state(loader) -> bool:
  """Whether each process's loader has a state of its own (streamed
  sources); a random-access loader's state is the same on every process."""
  return isinstance(loader, loader_lib.StreamLoader)


def checkpoint_state(loader) -> Dict[str, Any]:
  """What a checkpoint's metadata keeps of the loader (a collective in
  multi-process runs of streamed sources: every process must call it)."""
  if not per_process_state(loader):
    return {"data_state": loader.get_state()}
  return {"data_states": _allgather_json(loader.get_state())}


def restore_state(loader, meta: Dict[str, Any]) -> None:
  """Puts the loader where the checkpoint's run was."""
  if "data_states" in meta:
    states = meta["data_states"]
    if len(states) != jax.process_count():
      raise errors.ResumeMismatchError(
          f"The checkpoint's streamed data position was saved by "
          f"{len(states)} processes; resume with the same number "
          f"({jax.process_count()} now).")
    loader.set_state(states[jax.process_index()])
  elif "data_state" in meta:
    loader.set_state(meta["data_state"])
  else:  # checkpoints written before the loader kept a state
    loader.set_state({**loader.get_state(),
                      "position": int(meta["data_position"])})


def _allgather_json(obj) -> List[Any]:
  """Every process's `obj` (JSON-serialisable), in process order."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(
      np.asarray([len(data)], np.int32))))
  padded = np.zeros(length, np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


# --- What a run shows of its data -------------------------------------------------


def statistics(source, loader) -> Dict[str, float]:
  """Numeric facts of the data for `data/*` scalars (examples or shards,
  caption lengths, batches per epoch)."""
  facts = {**source.statistics(), **loader.statistics()}
  return {k: float(v) for k, v in facts.items()
          if isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, bool)}


def background(data_config) -> transforms.Color:
  """data.background as (r, g, b); white for runs saved before it."""
  return transforms.parse_color(data_config.get("background", "white"))


def image_transform(data_config, image_size: Optional[int] = None
                    ) -> transforms.ImageTransform:
  """The transform of images as the model sees them outside training (centre
  crop, no flip): previews, FID references, held-out examples, the latent
  cache. MNIST's digits are padded, not upscaled."""
  return transforms.ImageTransform(
      image_size=image_size or data_config.image_size,
      num_channels=data_config.num_channels,
      pad_small=data_config.source == "mnist",
      background=background(data_config))


def preview(config, source, count: int = PREVIEW_EXAMPLES,
            image_size: Optional[int] = None
            ) -> Tuple[np.ndarray, List[str]]:
  """The first `count` decodable examples as the model sees them (centre
  crop, no flip): images float32 [n, S, S, C] in [-1, 1] (S = image_size,
  default data.image_size) and their captions. Also the real images of
  FID references."""
  transform = image_transform(config.data, image_size)
  examples = (iter(source) if isinstance(source, sources.StreamSource)
              else (source.example(i, 0) for i in range(len(source))))
  images, captions = [], []
  for example in examples:
    image = transform(example["image"], example.get("key", ""))
    if image is not None:
      images.append(image)
      captions.append(example["caption"])
    if len(images) == count:
      break
  return np.stack(images), captions


def bucket_preview(config, source, shapes, count: int = 4
                   ) -> Dict[str, Tuple[np.ndarray, List[str]]]:
  """{"HxW": (images float32 [n, h, w, C] in [-1, 1], captions)}: each
  bucket's first `count` decodable examples (index order) as the model sees
  them (centre crop, no flip); buckets without examples are left out."""
  transform = image_transform(config.data)
  assignment = buckets_lib.source_assignment(source, shapes)
  out = {}
  for k, shape in enumerate(shapes):
    images, captions = [], []
    for index in np.flatnonzero(assignment == k):
      example = source.example(int(index), 0)
      made = transform.to_bucket(example["image"], shape,
                                 example.get("key", ""))
      if made is not None:
        images.append(made[0])
        captions.append(example["caption"])
      if len(images) == count:
        break
    if images:
      out[buckets_lib.name(shape)] = (np.stack(images), captions)
  return out


def first_captions(source, count: int, scan: int = 10_000) -> List[str]:
  """Up to `count` distinct captions among the source's first `scan`
  examples, in order: prompts for data without configured ones."""
  if isinstance(source, sources.StreamSource):
    captions = (example["caption"] for example in iter(source))
  else:
    captions = (source.caption(i) for i in range(len(source)))
  out: List[str] = []
  for i, caption in enumerate(captions):
    if caption not in out:
      out.append(caption)
    if len(out) == count or i + 1 >= scan:
      break
  return out
