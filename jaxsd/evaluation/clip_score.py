"""CLIP score of images against their prompts, with transformers' FlaxCLIPModel.

With c_i = cos(E_image_i, E_text_i), the cosine of the i-th image's and
prompt's CLIP embeddings, in [-1, 1], three figures are reported:

  clip_score   max(100 * mean_i c_i, 0), in [0, 100]: torchmetrics'
               `CLIPScore` (the mean is clipped, not each term), the figure
               papers quote as "CLIP score" (about 30 for SD 1.5 on COCO
               with ViT-L/14).
  clip_s       2.5 * mean_i max(c_i, 0), in [0, 2.5]: CLIP-S of Hessel et
               al., "CLIPScore" (EMNLP 2021), each term clipped, w = 2.5.
  clip_cosine  mean_i c_i, in [-1, 1], unclipped: the raw mean cosine.

Images are prepared as CLIPImageProcessor would for square inputs: grey ->
RGB, bicubic resize (PIL's filter, antialiased) to the model's size, CLIP
mean/std.

Models load from Flax weights (flax_model.msgpack) through transformers, or
from PyTorch weights (model.safetensors or pytorch_model.bin, as every CLIP
on the hub ships) through jaxsd's own conversion
(`jaxsd.models.clip_convert.load_clip_model`, no torch needed).
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
from jaxsd.models import clip_convert

# Cheapest of the OpenAI CLIPs (about 4 GFLOPs an image): fine for 28x28
# digits. torchmetrics defaults to openai/clip-vit-large-patch14 (~20x more).
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
# CLIPImageProcessor's normalisation for every OpenAI CLIP checkpoint.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# Hessel et al.'s CLIP-S weight w.
CLIP_S_WEIGHT = 2.5
# What a PyTorch-only hub repo is downloaded for: config, weights, tokenizer.
_PYTORCH_FILES = ("config.json", "model.safetensors*", "pytorch_model.bin*",
                  "tokenizer.json", "tokenizer_config.json", "vocab.json",
                  "merges.txt", "special_tokens_map.json")


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


def clip_scores(cosines) -> Dict[str, float]:
  """The three figures of the module docstring from cosines c [N] in
  [-1, 1]: {"clip_score": max(100 mean c, 0), "clip_s": 2.5 mean max(c, 0),
  "clip_cosine": mean c}."""
  cosines = np.asarray(cosines, np.float64)
  mean = float(np.mean(cosines))
  return {"clip_score": max(100.0 * mean, 0.0),
          "clip_s": CLIP_S_WEIGHT * float(np.mean(np.maximum(cosines, 0.0))),
          "clip_cosine": mean}


class CLIPScorer:
  """Batched, jitted CLIP embeddings and scores for numpy images and prompts."""

  def __init__(self, model, tokenizer, params=None):
    """Args: a transformers FlaxCLIPModel, a CLIP tokenizer (slow or fast),
    and its params (default `model.params`; needed for a model made with
    _do_init=False)."""
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
    """{"clip_score", "clip_s", "clip_cosine"}: see `clip_scores`."""
    return clip_scores(self.cosine_similarities(images, prompts, batch_size))


# --- Loading ------------------------------------------------------------------


def _hub_answers(name: str) -> None:
  """Returns when the hub can be asked for `name`; else raises
  WeightsUnavailableError (from_pretrained retries for minutes when the hub
  is unreachable)."""
  endpoint = environment.get("HF_ENDPOINT", "https://huggingface.co")
  host = urllib.parse.urlparse(endpoint).hostname
  if offline_mode(hugging_face=True) or not host_reachable(host):
    raise WeightsUnavailableError(
        f"{name} is not in the local Hugging Face cache and {host} is not "
        "reachable (offline)")


def _local_folder(name_or_path: str) -> Optional[str]:
  """A local folder for a model: the path itself, or a hub id's snapshot in
  the Hugging Face cache (no network); None for a hub id not cached."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
    raise WeightsUnavailableError(f"no such folder: {name_or_path}")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(name_or_path,
                                             local_files_only=True)
  except Exception:  # pylint: disable=broad-except
    # Not cached (LocalEntryNotFoundError), or not a valid repo id.
    return None


def _has_weights(folder: str) -> bool:
  return (clip_convert.has_flax_weights(folder)
          or clip_convert.pytorch_weight_file(folder) is not None)


def _load_folder(folder: str):
  """(FlaxCLIPModel made with _do_init=False, params) of a local folder:
  Flax weights through transformers, else PyTorch weights through jaxsd's
  conversion."""
  import transformers  # pylint: disable=g-import-not-at-top
  if clip_convert.has_flax_weights(folder):
    # _do_init=False: skip a random initialisation (slow, op by op) that
    # the loaded weights would replace.
    return transformers.FlaxCLIPModel.from_pretrained(folder, _do_init=False)
  if clip_convert.pytorch_weight_file(folder) is None:
    raise WeightsUnavailableError(
        f"no CLIP weights in {folder}: expected {clip_convert.FLAX_WEIGHTS}, "
        "model.safetensors or pytorch_model.bin")
  return clip_convert.load_clip_model(folder)


def _download(name: str):
  """(model, params, folder or None) of a hub id not on disk: its Flax
  weights, else its PyTorch weights downloaded and converted."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  _hub_answers(name)
  try:
    model, params = transformers.FlaxCLIPModel.from_pretrained(
        name, _do_init=False)
    return model, params, None
  except OSError as flax_error:  # no flax_model.msgpack in the repo
    logging.info("no Flax CLIP weights in %s (%s); reading its PyTorch "
                 "weights", name, flax_error)
  try:
    folder = huggingface_hub.snapshot_download(
        name, allow_patterns=list(_PYTORCH_FILES))
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsUnavailableError(f"cannot download {name}: {e}") from e
  return (*_load_folder(folder), folder)


def _tokenizer(name_or_folder: str, snapshot: Optional[str] = None):
  """The CLIP tokenizer of a folder (either layout, jaxsd.text.encoder) or
  a hub id: from its cached `snapshot` folder when that holds one, else
  CLIPTokenizer from the cache or the hub."""
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxsd.errors import TokenizerError  # pylint: disable=g-import-not-at-top
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  if os.path.isdir(name_or_folder):
    return text_lib.load_tokenizer_folder(name_or_folder)
  if snapshot is not None:
    try:
      text_lib.tokenizer_class(snapshot)
      return text_lib.load_tokenizer_folder(snapshot)
    except TokenizerError:  # weights cached, the tokenizer not (yet)
      pass
  try:  # the Hugging Face cache, without touching the network
    return transformers.CLIPTokenizer.from_pretrained(name_or_folder,
                                                      local_files_only=True)
  except OSError:
    pass
  _hub_answers(name_or_folder)
  try:
    return transformers.CLIPTokenizer.from_pretrained(name_or_folder)
  except OSError as e:
    raise WeightsUnavailableError(
        f"cannot load the CLIP tokenizer {name_or_folder}: {e}") from e


def load_clip_scorer(model_name_or_path: str = DEFAULT_CLIP_MODEL,
                     tokenizer_name_or_path: Optional[str] = None
                     ) -> CLIPScorer:
  """A `CLIPScorer` for a hub id or a local folder of a CLIP model.

  A folder (or a hub id's snapshot in the Hugging Face cache) with
  flax_model.msgpack loads through transformers; one with PyTorch weights
  only (model.safetensors or pytorch_model.bin, possibly sharded) through
  `clip_convert.load_clip_model`. A hub id not on disk is downloaded when
  the hub answers.

  Args:
    model_name_or_path: e.g. "openai/clip-vit-base-patch32" or a folder.
    tokenizer_name_or_path: tokenizer id or folder; default the model's.

  Raises:
    WeightsUnavailableError: not on disk and the hub is unreachable; callers
      skip the CLIP score with one log line.
    TokenizerError: a tokenizer folder jaxsd cannot read.
  """
  folder = _local_folder(model_name_or_path)
  # A folder given is read (or refused); a hub id's snapshot only when it
  # holds weights (a cache may hold a repo's tokenizer alone).
  if folder is not None and (os.path.isdir(model_name_or_path)
                             or _has_weights(folder)):
    model, params = _load_folder(folder)
  else:
    model, params, folder = _download(model_name_or_path)
  if tokenizer_name_or_path:
    tokenizer = _tokenizer(tokenizer_name_or_path)
  elif os.path.isdir(model_name_or_path):
    tokenizer = _tokenizer(model_name_or_path)
  else:  # a hub id, maybe in the Hugging Face cache
    tokenizer = _tokenizer(model_name_or_path, snapshot=folder)
  return CLIPScorer(model, tokenizer, params)
