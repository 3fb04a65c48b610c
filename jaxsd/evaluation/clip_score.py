"""CLIP score of images against their prompts, with transformers' FlaxCLIPModel.

CLIP score = max(100 * mean_i cos(E_image_i, E_text_i), 0), as torchmetrics'
`clip_score` computes it (the mean is clipped, not each term). Images are
prepared as CLIPImageProcessor would for square inputs: grey -> RGB, bicubic
resize (PIL's filter, antialiased) to the model's size, CLIP mean/std.
"""
import logging
import os
import urllib.parse
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import environment
from jaxsd.hub import WeightsUnavailableError, host_reachable, offline_mode

# Cheapest of the OpenAI CLIPs (about 4 GFLOPs an image): fine for 28x28
# digits. torchmetrics defaults to openai/clip-vit-large-patch14 (~20x more).
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
# CLIPImageProcessor's normalisation for every OpenAI CLIP checkpoint.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images, image_size: int,
                      mean: Sequence[float] = CLIP_IMAGE_MEAN,
                      std: Sequence[float] = CLIP_IMAGE_STD) -> jnp.ndarray:
  """Images [B, H, W, 1 or 3] in [-1, 1] -> pixel_values [B, 3, S, S].

  Shortest side resized to S (bicubic with antialiasing, which equals PIL's
  BICUBIC used by CLIPImageProcessor), centre crop to SxS, clipped to [0, 1]
  as the processor's uint8 round trip clips, then normalised.
  """
  x = (jnp.asarray(images, jnp.float32) + 1) / 2
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, h, w, c = x.shape
  scale = image_size / min(h, w)
  new_h, new_w = max(image_size, round(h * scale)), max(image_size,
                                                         round(w * scale))
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (b, new_h, new_w, c), "bicubic", antialias=True)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  x = (jnp.clip(x, 0, 1) - jnp.asarray(mean)) / jnp.asarray(std)
  return x.transpose(0, 3, 1, 2)  # FlaxCLIPModel takes NCHW pixel values


def _normalise(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
  """Batched, jitted CLIP embeddings and scores for numpy images and prompts."""

  def __init__(self, model, tokenizer, params=None):
    """Args: a transformers FlaxCLIPModel, a CLIPTokenizer, and its params
    (default `model.params`; needed for a model made with _do_init=False)."""
    self.model = model
    self.tokenizer = tokenizer
    self.params = params if params is not None else model.params
    self.image_size = model.config.vision_config.image_size
    self.max_length = model.config.text_config.max_position_embeddings

    def image_embed(params, images):
      pixels = preprocess_images(images, self.image_size)
      return _normalise(model.get_image_features(pixels, params=params))

    def text_embed(params, input_ids, attention_mask):
      return _normalise(model.get_text_features(
          input_ids, attention_mask, params=params))

    self._image_embed = jax.jit(image_embed)
    self._text_embed = jax.jit(text_embed)

  def image_embeddings(self, images, batch_size: int = 64) -> np.ndarray:
    """images [N, H, W, 1 or 3] in [-1, 1] -> unit-norm embeddings [N, D]."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      images = images[..., None]
    out = []
    for i in range(0, images.shape[0], batch_size):
      batch = images[i:i + batch_size]
      n = batch.shape[0]
      if n < batch_size:  # pad: one compiled shape for any N
        batch = np.concatenate(
            [batch, np.zeros((batch_size - n,) + batch.shape[1:], np.float32)])
      out.append(np.asarray(self._image_embed(self.params, batch))[:n])
    return np.concatenate(out)

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    """N prompts -> unit-norm embeddings [N, D] (each distinct prompt once)."""
    unique = sorted(set(prompts))
    tokens = self.tokenizer(unique, padding="longest", truncation=True,
                            max_length=self.max_length, return_tensors="np")
    embeddings = np.asarray(self._text_embed(
        self.params, tokens["input_ids"], tokens["attention_mask"]))
    index = {p: i for i, p in enumerate(unique)}
    return embeddings[[index[p] for p in prompts]]

  def cosine_similarities(self, images, prompts: Sequence[str],
                          batch_size: int = 64) -> np.ndarray:
    """cos(image_i, prompt_i) float [N] in [-1, 1]."""
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return np.sum(self.image_embeddings(images, batch_size)
                  * self.text_embeddings(list(prompts)), axis=-1)

  def score(self, images, prompts: Sequence[str],
            batch_size: int = 64) -> Dict[str, float]:
    """{"clip_similarity": max(mean cos, 0) in [0, 1], "clip_score": x100}."""
    similarity = max(float(np.mean(self.cosine_similarities(
        images, prompts, batch_size))), 0.0)
    return {"clip_similarity": similarity, "clip_score": 100 * similarity}


# --- Loading ------------------------------------------------------------------


def _from_pretrained(cls, name_or_path: str, **kwargs):
  """cls.from_pretrained: local files first; the hub only if it answers."""
  if os.path.isdir(name_or_path):
    return cls.from_pretrained(name_or_path, **kwargs)
  if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
    raise WeightsUnavailableError(f"no such folder: {name_or_path}")
  try:  # the Hugging Face cache, without touching the network
    return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
  except OSError as local_error:
    endpoint = environment.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlparse(endpoint).hostname
    # from_pretrained retries for minutes when the hub is unreachable.
    if offline_mode(hugging_face=True) or not host_reachable(host):
      raise WeightsUnavailableError(
          f"{name_or_path} is not in the local Hugging Face cache and {host} "
          f"is not reachable (offline): {local_error}") from local_error
  return cls.from_pretrained(name_or_path, **kwargs)


def load_clip_scorer(model_name_or_path: str = DEFAULT_CLIP_MODEL,
                     tokenizer_name_or_path: Optional[str] = None
                     ) -> CLIPScorer:
  """A `CLIPScorer` for a hub id or a local folder of a CLIP model.

  Falls back to PyTorch weights (`from_pt`, needs torch) when a checkpoint
  has no Flax weights.

  Args:
    model_name_or_path: e.g. "openai/clip-vit-base-patch32" or a folder.
    tokenizer_name_or_path: tokenizer id or folder; default the model's.

  Raises:
    WeightsUnavailableError: not on disk and the hub is unreachable; callers
      skip the CLIP score with one log line.
  """
  import transformers  # pylint: disable=g-import-not-at-top

  # _do_init=False: skip a random initialisation (slow, op by op) that the
  # loaded weights would replace; returns (model, params).
  try:
    model, params = _from_pretrained(transformers.FlaxCLIPModel,
                                     model_name_or_path, _do_init=False)
  except WeightsUnavailableError:
    raise
  except OSError as flax_error:  # e.g. a checkpoint with PyTorch weights only
    logging.info("no Flax CLIP weights in %s (%s); trying PyTorch weights",
                 model_name_or_path, flax_error)
    try:
      model, params = _from_pretrained(transformers.FlaxCLIPModel,
                                       model_name_or_path, _do_init=False,
                                       from_pt=True)
    except (OSError, ImportError) as e:
      raise WeightsUnavailableError(
          f"cannot load CLIP weights from {model_name_or_path}: {e}") from e
  try:
    tokenizer = _from_pretrained(transformers.CLIPTokenizer,
                                 tokenizer_name_or_path or model_name_or_path)
  except OSError as e:
    raise WeightsUnavailableError(
        f"cannot load the CLIP tokenizer "
        f"{tokenizer_name_or_path or model_name_or_path}: {e}") from e
  return CLIPScorer(model, tokenizer, params)
