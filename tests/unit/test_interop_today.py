"""Folders saved by today's PyTorch stack, with PyTorch (transformers 4.57)
as the oracle.

- A tokenizer saved as tokenizer.json + tokenizer_config.json only
  (transformers 5) loads and gives the slow tokenizer's ids; a folder
  neither layout reads is a one-line TokenizerError naming the files.
- A CLIPTextModel saved without the `text_model.` key prefix (transformers
  5) encodes as PyTorch does through text.pretrained.
- A CLIPModel folder with PyTorch weights only (safetensors or .bin, as the
  hub ships CLIPs) scores as PyTorch's CLIPModel does, from a folder or
  from the Hugging Face cache.
(The tiny pipeline in the new layout: tests/test_sd_pipeline.py.)
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsd import errors
from jaxsd.evaluation import clip_score
from jaxsd.models import clip_convert
from jaxsd.text import encoder as text_lib

import _interop_layouts as layouts  # tests/ is on sys.path under pytest

TOKENIZER_DIR = os.environ["JAXSD_CLIP_TOKENIZER"]
TOL = 1e-4  # as tests/test_clip_convert.py: max abs difference to PyTorch
# ASCII, case, punctuation, contractions, accents, whitespace, an emoji and
# a prompt longer than the context. (CJK text differs: transformers 4's slow
# CLIPTokenizer without ftfy splits each CJK character apart; the fast one,
# like OpenAI's tokenizer and transformers 5's, does not.)
PROMPTS = ["a photograph of the number 3", "",
           "A Red CUBE, on a blue-sphere!! at 3:45pm", "don't won't it's",
           "café naïve résumé 😀", "  spaces\tand\nnewlines  ",
           "a very long prompt " * 30]


@pytest.fixture(scope="module")
def fast_only(tmp_path_factory):
  """A tokenizer folder as transformers 5 saves it; tests copy it before
  changing it."""
  return layouts.fast_only_tokenizer(
      TOKENIZER_DIR, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


# --- Tokenizer ------------------------------------------------------------


def test_tokenizer_json_only_gives_the_slow_tokenizers_ids(fast_only,
                                                           tokenizer):
  fast = text_lib.load_tokenizer(fast_only)
  assert isinstance(fast, transformers.CLIPTokenizerFast)
  assert isinstance(tokenizer, transformers.CLIPTokenizer)  # legacy layout
  assert text_lib.vocab_size(fast) == text_lib.vocab_size(tokenizer) == 49408
  np.testing.assert_array_equal(text_lib.tokenize(fast, PROMPTS, 77),
                                text_lib.tokenize(tokenizer, PROMPTS, 77))
  for prompt in PROMPTS:  # unpadded too
    assert fast(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
  np.testing.assert_array_equal(text_lib.empty_prompt_ids(fast, 77),
                                text_lib.empty_prompt_ids(tokenizer, 77))


@pytest.mark.parametrize("source", ["fast_only", "legacy"])
def test_save_tokenizer_writes_both_layouts(source, fast_only, tokenizer,
                                            tmp_path):
  """An export holds vocab.json + merges.txt for transformers 4 (diffusers
  0.39) and tokenizer.json for transformers 5, whichever layout the run's
  tokenizer was read from."""
  out = str(tmp_path / "tokenizer")
  text_lib.save_tokenizer(text_lib.load_tokenizer(
      fast_only if source == "fast_only" else TOKENIZER_DIR), out)
  assert {"tokenizer.json", "vocab.json", "merges.txt",
          "tokenizer_config.json"} <= set(os.listdir(out))
  want = text_lib.tokenize(tokenizer, PROMPTS, 77)
  for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
    np.testing.assert_array_equal(
        text_lib.tokenize(cls.from_pretrained(out), PROMPTS, 77), want)
  only_json = str(tmp_path / "only_json")
  os.makedirs(only_json)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(out, name), only_json)
  np.testing.assert_array_equal(
      text_lib.tokenize(text_lib.load_tokenizer(only_json), PROMPTS, 77), want)


def _one_line_error(folder):
  with pytest.raises(errors.TokenizerError) as info:
    text_lib.load_tokenizer(folder)
  message = str(info.value)
  assert isinstance(info.value, errors.JaxsdError)
  assert "\n" not in message and folder in message
  return message


@pytest.mark.parametrize("keep", [(), ("vocab.json",), ("tokenizer_config.json",
                                                        "special_tokens_map.json")])
def test_unreadable_tokenizer_folder_is_one_line(keep, tmp_path):
  folder = tmp_path / "tokenizer"
  folder.mkdir()
  for name in keep:
    shutil.copy(os.path.join(TOKENIZER_DIR, name), folder)
  message = _one_line_error(str(folder))
  assert "expected tokenizer.json" in message
  assert "vocab.json + merges.txt" in message
  assert (", ".join(sorted(keep)) if keep else "no files") in message


def test_damaged_tokenizer_json_is_one_line(fast_only, tmp_path):
  folder = str(tmp_path / "tokenizer")
  shutil.copytree(fast_only, folder)
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    f.write('{"version": "1.0", "model": ')
  assert "(tokenizer.json)" in _one_line_error(folder)


# --- Text encoder without the text_model. prefix ---------------------------


def _perturbed(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def torch_text():
  return _perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)), seed=0)


def test_both_key_layouts_convert_to_the_same_params(torch_text, tmp_path):
  old = str(tmp_path / "old")
  torch_text.save_pretrained(old)
  new = str(tmp_path / "new")
  shutil.copytree(old, new)
  layouts.drop_text_prefix(new)
  _, want, _ = clip_convert.load_text_encoder(old)
  _, got, _ = clip_convert.load_text_encoder(new)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  assert flat_got.keys() == flat_want.keys()
  for key, value in flat_want.items():
    np.testing.assert_array_equal(np.asarray(flat_got[key]), np.asarray(value))
  # The layouts never mix: an unprefixed key beside prefixed ones is unknown.
  state = clip_convert.read_pytorch_weights(old)
  state["final_layer_norm.bias"] = state.pop("text_model.final_layer_norm.bias")
  with pytest.raises(ValueError, match=r"missing \['text_model\."
                     r"final_layer_norm\.bias'\], unexpected \["
                     r"'final_layer_norm\.bias'\]"):
    clip_convert.convert_clip_text_weights(state, torch_text.config)


@pytest.mark.parametrize("layout", ["text_encoder", "pipeline"])
def test_text_pretrained_in_todays_layout_encodes_as_pytorch(
    tiny_config, fast_only, tokenizer, torch_text, layout, tmp_path):
  """text.pretrained and text.tokenizer on folders saved as transformers 5
  saves them: the run encodes the prompts as PyTorch does."""
  root = tmp_path / "pipeline"
  text_dir = str(root / "text_encoder")
  torch_text.save_pretrained(text_dir)
  layouts.drop_text_prefix(text_dir)
  shutil.copytree(fast_only, root / "tokenizer")
  text_config = tiny_config().text
  text_config.pretrained = text_dir if layout == "text_encoder" else str(root)
  text_config.tokenizer = str(root / "tokenizer")
  text_config.max_length = 77
  run_tokenizer = text_lib.load_tokenizer(text_config.tokenizer)
  encoder = text_lib.TextEncoder(text_config,
                                 text_lib.vocab_size(run_tokenizer))
  ids = text_lib.tokenize(run_tokenizer, PROMPTS, 77)
  ours = np.asarray(jax.jit(encoder)(encoder.init(jax.random.key(0)),
                                     jnp.asarray(ids)))
  with torch.no_grad():  # PyTorch with the slow tokenizer's ids
    theirs = torch_text(torch.from_numpy(text_lib.tokenize(
        tokenizer, PROMPTS, 77).astype(np.int64))).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  assert np.abs(theirs).max() > 0.5  # not vacuous


# --- A CLIPModel with PyTorch weights only (the CLIP score) ----------------


def _tiny_torch_clip(images, prompts, tokenizer):
  """A random 2-layer PyTorch CLIPModel (32x32 images) with O(1) weights,
  its text projection's sign chosen so that the mean cosine is positive."""
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=77),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      fan_in = p.shape[1] if p.ndim == 2 else (p[0].numel() if p.ndim == 4
                                               else 1)
      scale = (1 / fan_in ** 0.5) if p.ndim in (2, 4) else 0.2
      p.copy_(scale * torch.randn_like(p) + (1.0 if name.endswith(
          "norm1.weight") or name.endswith("norm2.weight") else 0.0))
    model.logit_scale.fill_(2.5)
  model.eval()
  if _torch_cosines(model, images, prompts, tokenizer).mean() < 0:
    with torch.no_grad():
      model.text_projection.weight.neg_()
  return model


def _torch_embeddings(model, images, prompts, tokenizer):
  """Unit-norm image and text embeddings from PyTorch, on the pixel values
  jaxsd prepares (tests/test_eval_clip_score.py checks those against
  CLIPImageProcessor's)."""
  pixels = np.array(clip_score.preprocess_images(images, 32))  # writable
  tokens = tokenizer(prompts, padding=True, return_tensors="pt")
  with torch.no_grad():
    image = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    text = model.get_text_features(**tokens)
  image = torch.nn.functional.normalize(image, dim=-1).numpy()
  text = torch.nn.functional.normalize(text, dim=-1).numpy()
  return image, text


def _torch_cosines(model, images, prompts, tokenizer):
  image, text = _torch_embeddings(model, images, prompts, tokenizer)
  return (image * text).sum(-1)


CLIP_PROMPTS = [f"a photograph of the number {d}" for d in (3, 7, 3, 0, 9)]


@pytest.fixture(scope="module")
def clip_images():
  return np.random.RandomState(0).uniform(-1, 1, (5, 28, 28, 1)).astype(
      np.float32)


@pytest.fixture(scope="module")
def torch_clip(clip_images, tokenizer):
  return _tiny_torch_clip(clip_images, CLIP_PROMPTS, tokenizer)


@pytest.mark.parametrize("safe_serialization", [True, False],
                         ids=["safetensors", "bin"])
def test_pytorch_only_clip_folder_scores_as_pytorch(
    torch_clip, clip_images, tokenizer, safe_serialization, tmp_path):
  folder = str(tmp_path / "clip")
  torch_clip.save_pretrained(folder, safe_serialization=safe_serialization)
  weights = ("model.safetensors" if safe_serialization else
             "pytorch_model.bin")
  assert set(os.listdir(folder)) == {"config.json", weights}
  scorer = clip_score.load_clip_scorer(folder, TOKENIZER_DIR)
  image, text = _torch_embeddings(torch_clip, clip_images, CLIP_PROMPTS,
                                  tokenizer)
  np.testing.assert_allclose(scorer.image_embeddings(clip_images, 4), image,
                             atol=TOL)
  np.testing.assert_allclose(scorer.text_embeddings(CLIP_PROMPTS), text,
                             atol=TOL)
  cosines = (image * text).sum(-1)
  assert cosines.mean() > 0.05 and np.ptp(cosines) > 0.1  # not vacuous
  got = scorer.score(clip_images, CLIP_PROMPTS, batch_size=4)
  assert got["clip_score"] == pytest.approx(100 * cosines.mean(), abs=1e-2)
  assert got["clip_s"] == pytest.approx(
      2.5 * np.maximum(cosines, 0).mean(), abs=1e-4)
  assert got["clip_cosine"] == pytest.approx(cosines.mean(), abs=1e-4)
  # The logit scale comes across too (the score does not use it).
  np.testing.assert_allclose(np.asarray(scorer.params["logit_scale"]), 2.5)


def test_pytorch_only_clip_in_the_hugging_face_cache(
    torch_clip, clip_images, fast_only, tmp_path, monkeypatch):
  """A hub id whose cached snapshot holds PyTorch weights and a
  tokenizer.json-only tokenizer loads offline, with no download tried."""
  hub_cache = tmp_path / "hub"
  repo = hub_cache / "models--someone--tiny-clip"
  snapshot = repo / "snapshots" / ("0" * 40)
  torch_clip.save_pretrained(str(snapshot))
  for name in os.listdir(fast_only):
    shutil.copy(os.path.join(fast_only, name), snapshot)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE",
                      str(hub_cache))
  monkeypatch.setattr(clip_score, "host_reachable",
                      lambda *a, **k: pytest.fail("asked the network"))
  scorer = clip_score.load_clip_scorer("someone/tiny-clip")
  assert isinstance(scorer.tokenizer, transformers.CLIPTokenizerFast)
  want = _torch_cosines(torch_clip, clip_images, CLIP_PROMPTS,
                        scorer.tokenizer)
  np.testing.assert_allclose(
      scorer.cosine_similarities(clip_images, CLIP_PROMPTS, 4), want,
      atol=TOL)


def test_clip_folder_refusals(torch_clip, tmp_path):
  folder = tmp_path / "clip"
  torch_clip.save_pretrained(str(folder))
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(folder / "config.json", empty)
  from jaxsd import hub  # pylint: disable=g-import-not-at-top
  with pytest.raises(hub.WeightsUnavailableError, match="model.safetensors "
                     "or pytorch_model.bin"):
    clip_score.load_clip_scorer(str(empty), TOKENIZER_DIR)
  # A text encoder is not a CLIP score model.
  text_only = tmp_path / "text_only"
  transformers.CLIPTextModel(torch_clip.config.text_config).save_pretrained(
      str(text_only))
  cfg = json.loads((text_only / "config.json").read_text())
  assert cfg["model_type"] == "clip_text_model"
  with pytest.raises(ValueError, match="model_type='clip_text_model'"):
    clip_score.load_clip_scorer(str(text_only), TOKENIZER_DIR)
  # The tokenizer defaults to the model's folder, which has none here.
  with pytest.raises(errors.TokenizerError, match="holds config.json, "
                     "model.safetensors; expected tokenizer.json"):
    clip_score.load_clip_scorer(str(folder))
