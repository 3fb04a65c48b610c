"""CLIP score of a tiny random CLIP vs hand computation and torch CLIPModel."""
import os
import time

import flax
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_flax_pytorch_utils import (
    load_flax_weights_in_pytorch_model)
from PIL import Image

from jaxsd import hub
from jaxsd.evaluation import clip_score

TOKENIZER_DIR = os.environ["JAXSD_CLIP_TOKENIZER"]
PROMPTS = [f"a photograph of the number {d}" for d in (3, 7, 3, 0, 9)]


@pytest.fixture(scope="module")
def images():
  """Five 28x28 grey images in [-1, 1]."""
  return np.random.RandomState(0).uniform(-1, 1, (5, 28, 28, 1)).astype(
      np.float32)


def _randomised_params(params, seed=0):
  """Weights of O(1) effect: transformers' 0.02-std init leaves a tiny CLIP's
  embeddings almost independent of its input (cosines within 0.01)."""
  rng = np.random.RandomState(seed)
  flat = flax.traverse_util.flatten_dict(params)
  for key, value in flat.items():
    shape, name = value.shape, key[-1]
    if name == "kernel":
      value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    elif "embedding" in name:
      value = rng.randn(*shape)
    elif name == "bias":
      value = 0.1 * rng.randn(*shape)
    elif name == "scale":
      value = 1 + 0.1 * rng.randn(*shape)
    elif name == "logit_scale":  # CLIP's initial temperature; unused here
      value = np.full(shape, np.log(1 / 0.07))
    else:
      raise ValueError(f"unexpected CLIP parameter {key}")
    flat[key] = np.asarray(value, np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _negate_text_projection(params):
  params = jax.tree_util.tree_map(lambda x: x, params)  # copy the containers
  kernel = params["text_projection"]["kernel"]
  params["text_projection"]["kernel"] = -kernel
  return params


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, images):
  """A random 2-layer CLIP (32x32 images) saved as a local Flax checkpoint.

  Its text projection's sign is chosen so that the test images' mean cosine
  is positive, where clipping at 0 does not hide the comparison.
  """
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=77),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2),
      projection_dim=16)
  # _do_init=False and shapes only: transformers' eager init takes ~15 s.
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  shapes = jax.eval_shape(
      lambda key: model.init_weights(key, model.input_shape),
      jax.random.key(0))
  params = _randomised_params(shapes)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
  if clip_score.CLIPScorer(model, tokenizer, params).cosine_similarities(
      images, PROMPTS).mean() < 0:
    params = _negate_text_projection(params)
  path = str(tmp_path_factory.mktemp("tiny_clip"))
  model.save_pretrained(path, params=params)
  return path


def _load_flax(path):
  """(model, params) as saved, without a random initialisation."""
  return transformers.FlaxCLIPModel.from_pretrained(path, _do_init=False)


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
  """The scorer as users get it: loaded from a local folder."""
  return clip_score.load_clip_scorer(tiny_clip_dir, TOKENIZER_DIR)


def _hand_pixel_values(images, size):
  """What CLIPImageProcessor does to a square image, via PIL, in numpy."""
  out = []
  for image in (images[..., 0] + 1) / 2:
    resized = np.asarray(Image.fromarray(image, mode="F").resize(
        (size, size), Image.BICUBIC))
    rgb = np.repeat(np.clip(resized, 0, 1)[..., None], 3, axis=-1)
    out.append((rgb - np.array(clip_score.CLIP_IMAGE_MEAN))
               / np.array(clip_score.CLIP_IMAGE_STD))
  return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32)


def test_clip_score_matches_hand_computation(scorer, tiny_clip_dir, images):
  got = scorer.score(images, PROMPTS, batch_size=4)  # 2 batches, one padded

  model, params = _load_flax(tiny_clip_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
  tokens = tokenizer(PROMPTS, padding=True, return_tensors="np")
  image_emb = np.asarray(model.get_image_features(
      _hand_pixel_values(images, 32), params=params), np.float64)
  text_emb = np.asarray(model.get_text_features(
      tokens["input_ids"], tokens["attention_mask"], params=params),
                        np.float64)
  image_emb /= np.linalg.norm(image_emb, axis=-1, keepdims=True)
  text_emb /= np.linalg.norm(text_emb, axis=-1, keepdims=True)
  cosines = (image_emb * text_emb).sum(-1)

  np.testing.assert_allclose(
      scorer.cosine_similarities(images, PROMPTS, batch_size=4), cosines,
      atol=1e-5)
  expected = max(cosines.mean(), 0.0)
  assert got["clip_cosine"] == pytest.approx(cosines.mean(), abs=1e-5)
  assert got["clip_score"] == pytest.approx(100 * expected, abs=1e-3)
  assert got["clip_s"] == pytest.approx(
      2.5 * np.maximum(cosines, 0).mean(), abs=1e-5)
  assert expected > 0.05 and np.ptp(cosines) > 0.05  # a non-trivial check


def test_clip_score_matches_torch_clip_model(scorer, tiny_clip_dir, images):
  model, params = _load_flax(tiny_clip_dir)
  torch_model = transformers.CLIPModel(model.config).eval()
  load_flax_weights_in_pytorch_model(torch_model, params)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
  tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
  with torch.no_grad():
    image_emb = torch_model.get_image_features(
        pixel_values=torch.from_numpy(_hand_pixel_values(images, 32)))
    text_emb = torch_model.get_text_features(**tokens)
  cosines = torch.nn.functional.cosine_similarity(image_emb, text_emb).numpy()
  np.testing.assert_allclose(
      scorer.cosine_similarities(images, PROMPTS, batch_size=4), cosines,
      atol=1e-4)
  torchmetrics_style = max(float(100 * cosines.mean()), 0.0)
  got = scorer.score(images, PROMPTS, batch_size=4)["clip_score"]
  assert got == pytest.approx(torchmetrics_style, abs=1e-2)


def test_score_is_clipped_at_zero(scorer, images):
  flipped = clip_score.CLIPScorer(
      scorer.model, scorer.tokenizer,
      params=_negate_text_projection(scorer.params))
  cosines = scorer.cosine_similarities(images, PROMPTS, batch_size=4)
  np.testing.assert_allclose(
      flipped.cosine_similarities(images, PROMPTS, batch_size=4), -cosines,
      atol=1e-6)
  assert cosines.mean() > 0
  got = flipped.score(images, PROMPTS, batch_size=4)
  assert got["clip_score"] == 0.0
  assert got["clip_cosine"] == pytest.approx(-cosines.mean(), abs=1e-6)
  # CLIP-S clips each pair: the pairs whose flipped cosine is positive count.
  assert got["clip_s"] == pytest.approx(
      2.5 * np.maximum(-cosines, 0).mean(), abs=1e-6)


def test_the_three_figures_by_hand():
  """torchmetrics clips the mean, CLIP-S (Hessel et al.) each term, and the
  cosine is not clipped."""
  got = clip_score.clip_scores([0.3, -0.1])
  assert got == pytest.approx(
      {"clip_score": 10.0, "clip_s": 0.375, "clip_cosine": 0.1})
  got = clip_score.clip_scores([-0.3, 0.1])
  assert got == pytest.approx(
      {"clip_score": 0.0, "clip_s": 0.125, "clip_cosine": -0.1})


def test_preprocess_resizes_and_normalises():
  grey = np.random.RandomState(1).uniform(-1, 1, (2, 28, 28, 1)).astype(
      np.float32)
  got = np.asarray(clip_score.preprocess_images(grey, 224))
  assert got.shape == (2, 3, 224, 224)
  np.testing.assert_allclose(got, _hand_pixel_values(grey, 224), atol=1e-5)


def test_missing_weights_fail_fast(tmp_path, monkeypatch):
  start = time.time()
  with pytest.raises(hub.WeightsUnavailableError):
    clip_score.load_clip_scorer(str(tmp_path / "no_such_model"), TOKENIZER_DIR)
  # Hub id, HF cache empty, hub unreachable: one quick, clear error.
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  monkeypatch.setattr(clip_score, "host_reachable",
                      lambda host, port=443, timeout=3.0: False)
  with pytest.raises(hub.WeightsUnavailableError, match="not reachable"):
    clip_score.load_clip_scorer("openai/clip-vit-base-patch32")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(hub.WeightsUnavailableError):
    clip_score.load_clip_scorer("openai/clip-vit-base-patch32")
  assert time.time() - start < 20
