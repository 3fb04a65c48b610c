"""diffusers Stable Diffusion pipeline folders, in (model.pretrained_pipeline)
and out (jaxsd-export).

A pipeline folder (what `StableDiffusionPipeline.save_pretrained` writes):

    model_index.json    the pipeline class and its parts
    unet/               UNet2DConditionModel: config.json + PyTorch weights
    vae/                AutoencoderKL
    text_encoder/       transformers CLIPTextModel
    tokenizer/          CLIPTokenizer
    scheduler/          scheduler_config.json

Both generations of PyTorch's stack are read: diffusers <= 0.39 with
transformers 4 (tokenizer/ holds vocab.json + merges.txt; text encoder keys
`text_model.*`) and diffusers 0.42 with transformers 5 (tokenizer/ holds
tokenizer.json + tokenizer_config.json only; keys without the `text_model.`
prefix). See jaxsd/text/encoder.py and jaxsd/models/clip_convert.py.

`resolve(config)` points a run at such a folder: model.pretrained (the UNet,
converted by name, jaxsd/models/unet_convert.py), model.autoencoder (the
VAE), text.pretrained and text.tokenizer, the architecture fields that the
saved config records, and the schedule and DDIM settings of the scheduler
(jaxsd/diffusion/scheduler_config.py), so that jaxsd samples as diffusers'
pipeline does. Weights are read from `.safetensors` first; a `.bin` only
through the weights-only unpickler: nothing in a downloaded folder runs.

`write(out, ...)` writes a jaxsd run back as such a folder (safetensors),
which PyTorch's `StableDiffusionPipeline.from_pretrained(out)` loads; its
tokenizer/ holds both layouts, so either generation of the stack reads it.
"""
import json
import os
import shutil
from typing import Any, Dict

from absl import logging
import numpy as np

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_INDEX = "model_index.json"
# What an exported model_index.json names (no safety checker: jaxsd trains
# none, and diffusers accepts its absence when told so).
PIPELINE_CLASS = "StableDiffusionPipeline"
_MODEL_INDEX = {
    "_class_name": PIPELINE_CLASS,
    "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def check_folder(path: str) -> Dict[str, Any]:
  """The folder's model_index.json, after checking every part is there."""
  index_path = os.path.join(path, MODEL_INDEX)
  if not os.path.isfile(index_path):
    raise FileNotFoundError(
        f"model.pretrained_pipeline={path!r} is not a diffusers pipeline "
        f"folder: {MODEL_INDEX} is missing. Give a folder written by "
        "StableDiffusionPipeline.save_pretrained (or downloaded with "
        "`huggingface-cli download ID --local-dir DIR`).")
  with open(index_path) as f:
    index = json.load(f)
  missing = [p for p in PARTS if not os.path.isdir(os.path.join(path, p))]
  if missing:
    raise FileNotFoundError(
        f"The pipeline folder {path} lacks {', '.join(f'{m}/' for m in missing)}"
        f": jaxsd needs {', '.join(f'{p}/' for p in PARTS)}.")
  name = index.get("_class_name", "")
  if name not in (PIPELINE_CLASS, "StableDiffusionImg2ImgPipeline",
                  "StableDiffusionInpaintPipeline"):
    logging.warning("%s: pipeline class %r; reading it as a %s.", index_path,
                    name, PIPELINE_CLASS)
  return index


def _set(section, key: str, value, changed: Dict[str, Any], prefix: str):
  """section[key] = value, also where the value's type differs from the
  default's (per-block head lists where the default is an int)."""
  old = section.get(key)
  if isinstance(value, list):
    value = tuple(value)
  if old == value:
    return
  changed[f"{prefix}.{key}"] = value
  with section.unlocked():
    if key in section and old is not None and type(old) is not type(value):
      del section[key]
    section[key] = value


def resolve(config):
  """Fills config from model.pretrained_pipeline, in place; returns it
  (a no-op without one; idempotent). Logs what it changed."""
  path = config.model.get("pretrained_pipeline", "")
  if not path:
    return config
  from jaxsd.diffusion import scheduler_config  # pylint: disable=g-import-not-at-top
  from jaxsd.models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  from jaxsd.models import clip_convert  # pylint: disable=g-import-not-at-top
  from jaxsd.models import unet_convert  # pylint: disable=g-import-not-at-top
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  check_folder(path)
  # A tokenizer folder neither layout reads fails here, before any weights
  # are read (TokenizerError naming the files expected).
  text_lib.tokenizer_class(os.path.join(path, "tokenizer"))
  changed: Dict[str, Any] = {}
  m, t = config.model, config.text

  unet_dir, unet_cfg = unet_convert.load_config(path)
  source = os.path.join(unet_dir, "config.json")
  module = unet_convert.unet_from_config(unet_cfg, source=source)
  # The pipeline's UNet is the architecture: jaxsd's own UNet, without
  # jaxsd-only features it lacks.
  _set(m, "implementation", "jaxsd", changed, "model")
  _set(m, "pooled_text_embedding", "", changed, "model")
  _set(m, "pretrained", unet_dir, changed, "model")
  for key in ("in_channels", "out_channels", "block_out_channels",
              "down_block_types", "up_block_types", "layers_per_block",
              "attention_head_dim", "only_cross_attention", "norm_num_groups",
              "use_linear_projection"):
    _set(m, key, getattr(module, key), changed, "model")
  _set(m, "autoencoder", ae_lib.vae_folder(path) or path, changed, "model")

  text_dir = clip_convert.text_encoder_folder(path)
  if text_dir is None:
    raise FileNotFoundError(f"{path}/text_encoder has no config.json.")
  with open(os.path.join(text_dir, "config.json")) as f:
    text_cfg = clip_convert.config_from_dict(
        json.load(f), os.path.join(text_dir, "config.json"))
  if text_cfg.hidden_size != module.cross_attention_dim:
    raise ValueError(
        f"{path}: the text encoder's hidden_size {text_cfg.hidden_size} is "
        f"not the UNet's cross_attention_dim {module.cross_attention_dim}.")
  _set(t, "pretrained", text_dir, changed, "text")
  _set(t, "tokenizer", os.path.join(path, "tokenizer"), changed, "text")
  for key, value in (("hidden_size", text_cfg.hidden_size),
                     ("num_layers", text_cfg.num_hidden_layers),
                     ("num_heads", text_cfg.num_attention_heads),
                     ("intermediate_size", text_cfg.intermediate_size)):
    _set(t, key, value, changed, "text")
  _set(t, "max_length", _tokenizer_length(path, text_cfg), changed, "text")

  vae_cfg = ae_lib.load_config(ae_lib.vae_folder(path))
  _set(config.data, "num_channels", vae_cfg.in_channels, changed, "data")

  with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
    settings = scheduler_config.from_diffusers(
        json.load(f), os.path.join(path, "scheduler", "scheduler_config.json"))
  for dotted, value in settings.items():
    section, key = dotted.split(".")
    if key == "clip_x0" and not isinstance(value, bool):
      if value != 1.0:
        raise ValueError(
            f"{path}/scheduler: clip_sample_range={value}: jaxsd clips x0 to "
            "[-1, 1] only.")
      value = True
    _set(config[section], key, value, changed, section)
  # diffusers' pipelines guide at every step.
  _set(config.sampling, "guidance_interval", (0.0, 1.0), changed, "sampling")
  if changed:
    logging.info("model.pretrained_pipeline=%s sets %s", path,
                 json.dumps(changed, default=str))
  return config


def _tokenizer_length(path: str, text_cfg) -> int:
  """The tokenizer's model_max_length (77 in SD), within the encoder's
  positions."""
  cfg_path = os.path.join(path, "tokenizer", "tokenizer_config.json")
  length = text_cfg.max_position_embeddings
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      value = json.load(f).get("model_max_length")
    if isinstance(value, int) and 0 < value < length:
      length = value
  return length


# --- Export --------------------------------------------------------------


def check_exportable(config, components):
  """A run diffusers' StableDiffusionPipeline can represent, or a
  ValueError naming what it cannot."""
  if components.autoencoder is None:
    raise ValueError(
        "This is a pixel-space run (model.autoencoder is empty): diffusers' "
        "StableDiffusionPipeline is latent diffusion and needs a VAE, so it "
        "cannot represent it. Train with model.autoencoder set to export.")
  if config.model.pooled_text_embedding:
    raise ValueError(
        f"model.pooled_text_embedding={config.model.pooled_text_embedding!r}"
        " is a jaxsd-only UNet feature with no diffusers equivalent; runs "
        "that use it cannot be exported as a StableDiffusionPipeline.")
  if config.sampling.sampler != "ddim":
    logging.warning("sampling.sampler=%r: the exported pipeline's scheduler "
                    "is DDIM with this run's schedule.",
                    config.sampling.sampler)


def write(out: str, config, components, params, overwrite: bool = False):
  """Writes the run's pipeline to `out` (see the module docstring), through
  a temporary folder renamed at the end: `out` is complete or absent."""
  from jaxsd import models  # pylint: disable=g-import-not-at-top
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import scheduler_config  # pylint: disable=g-import-not-at-top
  from jaxsd.models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  from jaxsd.models import unet_convert  # pylint: disable=g-import-not-at-top
  check_exportable(config, components)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; choose another "
                          "--out or pass --overwrite.")
  tmp = out.rstrip("/") + f".tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  params = host_arrays(params)
  unet = components.unet
  module = (unet.module if isinstance(unet, models.JaxsdUNet) else
            models.JaxsdUNet(config.model,
                             components.text_encoder.hidden_size).module)
  latent = components.image_shape[0]
  unet_convert.save_diffusers(module, params["unet"],
                              os.path.join(tmp, "unet"), sample_size=latent)
  ae = components.autoencoder
  ae_lib.save_diffusers(ae.config, host_arrays(ae.params),
                        os.path.join(tmp, "vae"),
                        sample_size=config.data.image_size)
  text_lib.save_text_encoder(components.text_encoder.config, params["text"],
                             os.path.join(tmp, "text_encoder"))
  text_lib.save_tokenizer(components.tokenizer, os.path.join(tmp, "tokenizer"))
  os.makedirs(os.path.join(tmp, "scheduler"))
  with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler_config.to_diffusers(
        scheduler_config.settings_from_config(config)), f, indent=2)
  with open(os.path.join(tmp, MODEL_INDEX), "w") as f:
    json.dump(_MODEL_INDEX, f, indent=2)
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  return out


def host_arrays(tree):
  """A pytree of device arrays as host numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
