"""Builds a run's components from its config: tokenizer, text encoder, UNet,
noise schedule. Shared by training, sampling and evaluation."""
import dataclasses
from typing import Any

import jax
import numpy as np

from jaxsd import models
from jaxsd import text as text_lib
from jaxsd.diffusion import schedules


@dataclasses.dataclass
class Components:
  config: Any
  tokenizer: Any
  text_encoder: text_lib.TextEncoder
  unet: Any
  schedule: schedules.NoiseSchedule
  uncond_ids: np.ndarray  # [1, L] token ids of the empty prompt

  @property
  def image_shape(self):
    c = self.config
    return (c.data.image_size, c.data.image_size, c.model.in_channels)

  def init_params(self, rng):
    """{"unet": ..., "text": ...}, freshly initialised or pretrained."""
    rng_text, rng_unet = jax.random.split(rng)
    context_shape = (self.text_encoder.max_length,
                     self.text_encoder.hidden_size)
    return {"unet": self.unet.init(rng_unet, self.image_shape, context_shape),
            "text": self.text_encoder.init(rng_text)}

  def denoise_fn(self, params):
    """(x_t [B,H,W,C], t [B], context [B,L,D]) -> model output, for samplers."""
    def fn(x_t, t, context):
      return self.unet.apply(params["unet"], x_t, t, context)
    return fn

  def encode(self, params, input_ids):
    return self.text_encoder(params["text"], input_ids)


def build_components(config) -> Components:
  tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
  encoder = text_lib.TextEncoder(config.text, text_lib.vocab_size(tokenizer))
  unet = models.build_unet(config.model, encoder.hidden_size)
  schedule = schedules.make_schedule(config.diffusion.schedule,
                                     config.diffusion.num_timesteps)
  uncond = text_lib.empty_prompt_ids(tokenizer, config.text.max_length)
  return Components(config=config, tokenizer=tokenizer, text_encoder=encoder,
                    unet=unet, schedule=schedule, uncond_ids=uncond)


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def load_run_config(workdir: str):
  """The config a run in `workdir` was trained with (WORKDIR/config.json)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not a jaxsd training workdir (train "
        "with `python -m jaxsd.main --config=... --workdir=...` first).")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = config.text.tokenizer
  if not os.path.isdir(tokenizer) and os.environ.get("JAXSD_CLIP_TOKENIZER"):
    # A run trained elsewhere: use this machine's tokenizer folder.
    config.text.tokenizer = os.environ["JAXSD_CLIP_TOKENIZER"]
  return config


def restore_for_inference(workdir: str, mesh, step=None, use_ema=True):
  """(config, components, params, step) from a run's saved config and
  checkpoint; params are replicated over the mesh, no optimiser state."""
  from jaxsd import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxsd import parallel  # pylint: disable=g-import-not-at-top
  config = load_run_config(workdir)
  comps = build_components(config)
  replicated = parallel.replicated(mesh)
  abstract = jax.eval_shape(comps.init_params, jax.random.key(0))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      abstract)
  params, step = checkpoint.restore_params(workdir, abstract, step=step,
                                           use_ema=use_ema)
  return config, comps, params, step
