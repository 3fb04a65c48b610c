"""Config validation: bad values fail at start-up with the key and the fix."""
from jaxsd import lora
from jaxsd import models
from jaxsd.data import sources
from jaxsd.data import transforms
from jaxsd import train_step
from jaxsd.diffusion import losses
from jaxsd.diffusion import samplers
from jaxsd.diffusion import schedules
from jaxsd.models import unet

REQUIRED_POSITIVE = ("training.num_steps", "training.batch_size",
                     "training.log_every", "training.eval_every",
                     "training.checkpoint_every", "training.steps_per_call",
                     "optim.grad_accum_steps", "text.max_length",
                     "diffusion.num_timesteps", "data.image_size")


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config):
  for key in REQUIRED_POSITIVE:
    value = _get(config, key)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{key}={value!r} must be a positive integer.")
  sources.source_class(config.data.source)  # unknown: names the choices
  if config.data.crop not in transforms.CROPS:
    raise ValueError(f"data.crop={config.data.crop!r}; choose one of "
                     f"{transforms.CROPS}.")
  if (not config.model.autoencoder
      and config.data.num_channels != config.model.in_channels):
    raise ValueError(
        f"data.num_channels={config.data.num_channels} but "
        f"model.in_channels={config.model.in_channels}: a pixel-space UNet "
        "denoises the images themselves; set both to 1 (grey) or 3 (RGB).")
  if config.diffusion.schedule not in schedules.schedule_names():
    raise ValueError(f"diffusion.schedule={config.diffusion.schedule!r}; "
                     f"choose one of {schedules.schedule_names()}.")
  if config.diffusion.prediction_type not in losses.PREDICTION_TYPES:
    raise ValueError(
        f"diffusion.prediction_type={config.diffusion.prediction_type!r}; "
        f"choose one of {losses.PREDICTION_TYPES}.")
  if config.diffusion.timestep_sampling not in train_step.TIMESTEP_SAMPLINGS:
    raise ValueError(
        f"diffusion.timestep_sampling={config.diffusion.timestep_sampling!r}; "
        f"choose one of {train_step.TIMESTEP_SAMPLINGS}.")
  pooling = config.model.pooled_text_embedding
  if pooling and pooling not in unet.TEXT_POOLINGS:
    raise ValueError(f"model.pooled_text_embedding={pooling!r}; choose '' "
                     f"(off) or one of {unet.TEXT_POOLINGS}.")
  if not 0.0 <= config.diffusion.cfg_dropout < 1.0:
    raise ValueError(f"diffusion.cfg_dropout={config.diffusion.cfg_dropout} "
                     "must be in [0, 1).")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f"optim.ema_decay={config.optim.ema_decay} must be in "
                     "[0, 1).")
  s = config.sampling
  if s.get("timestep_spacing", "trailing") not in samplers.TIMESTEP_SPACINGS:
    raise ValueError(f"sampling.timestep_spacing={s.timestep_spacing!r}; "
                     f"choose one of {samplers.TIMESTEP_SPACINGS}.")
  if s.get("final_alpha", "one") not in samplers.FINAL_ALPHAS:
    raise ValueError(f"sampling.final_alpha={s.final_alpha!r}; choose one "
                     f"of {samplers.FINAL_ALPHAS}.")
  if (config.diffusion.get("rescale_zero_snr", False)
      and config.diffusion.prediction_type != "v_prediction"):
    raise ValueError(
        "diffusion.rescale_zero_snr=True makes the last timestep pure noise, "
        "where an epsilon (or x0 from epsilon) prediction is undefined; set "
        "diffusion.prediction_type='v_prediction'.")
  lora.from_config(config.model.get("lora"))  # bad rank/alpha/dropout/dtype
  remat = unet.remat_policy(config.model.get("remat", "none"))
  if remat != "none" and config.model.implementation != "jaxsd":
    raise ValueError(f"model.remat={remat!r} is a jaxsd UNet feature; set "
                     "model.implementation='jaxsd' or model.remat='none'.")
  models.unet_class(config.model.implementation)  # unknown: names the choices
  models.compute_dtype(config.model.dtype)
  n_blocks = len(config.model.block_out_channels)
  for key in ("down_block_types", "up_block_types"):
    if len(config.model[key]) != n_blocks:
      raise ValueError(
          f"model.{key} has {len(config.model[key])} entries but "
          f"model.block_out_channels has {n_blocks}; give one per level.")
  if config.training.num_steps % config.training.steps_per_call:
    raise ValueError(
        f"training.num_steps={config.training.num_steps} must be a multiple "
        f"of training.steps_per_call={config.training.steps_per_call}.")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if config.training[key] % config.training.steps_per_call:
      raise ValueError(
          f"training.{key}={config.training[key]} must be a multiple of "
          f"training.steps_per_call={config.training.steps_per_call}.")
