"""The diffusion.* and sampling.* sections of a run's config: valid ranges
of the schedule, the loss and the samplers; and the sampler flags of
jaxsd.commands.sample / jaxsd.commands.evaluate that override sampling.*.
"""
import inspect
import math

from absl import logging

from jaxsd.checks import (check_choice, check_float, check_int,
                          check_interval, wrapped)
from jaxsd.diffusion import losses
from jaxsd.diffusion import samplers
from jaxsd.diffusion import schedules
from jaxsd.diffusion import step as train_step
from jaxsd.errors import ConfigError
from jaxsd.models import checks as model_checks


def check_diffusion(config):
  """diffusion.*: the noise schedule, the prediction target and the
  training loss's weighting and timestep sampling."""
  d = config.diffusion
  if d.schedule not in schedules.schedule_names():
    raise ConfigError(f"diffusion.schedule={d.schedule!r}; "
                      f"choose one of {schedules.schedule_names()}.")
  check_int("diffusion.num_timesteps", d.num_timesteps, 2)
  for key in ("beta_start", "beta_end"):
    check_float(f"diffusion.{key}", d[key], 0.0, 1.0, high_open=True,
                hint="0 = the schedule's default")
  defaults = {"linear": schedules.linear_betas,
              "scaled_linear": schedules.scaled_linear_betas}
  if d.schedule in defaults:  # the cosine schedule ignores them
    # 0 = the schedule function's own default: read it from there, so the
    # check cannot drift from what the schedule builds.
    params = inspect.signature(defaults[d.schedule]).parameters
    start = d.beta_start or params["beta_start"].default
    end = d.beta_end or params["beta_end"].default
    if not start < end:
      raise ConfigError(
          f"diffusion.beta_start={d.beta_start} and diffusion.beta_end="
          f"{d.beta_end} give betas from {start} to {end} for the "
          f"{d.schedule!r} schedule; need 0 < beta_start < beta_end < 1 "
          "(0 = the schedule's default).")
  if d.prediction_type not in losses.PREDICTION_TYPES:
    raise ConfigError(
        f"diffusion.prediction_type={d.prediction_type!r}; "
        f"choose one of {losses.PREDICTION_TYPES}.")
  if d.get("rescale_zero_snr", False) and d.prediction_type != "v_prediction":
    raise ConfigError(
        "diffusion.rescale_zero_snr=True makes the last timestep pure noise, "
        "where an epsilon (or x0 from epsilon) prediction is undefined; set "
        "diffusion.prediction_type='v_prediction'.")
  check_float("diffusion.min_snr_gamma", d.min_snr_gamma, 0.0,
              hint="0 = off, > 0 = min-SNR-gamma weighting (5 is usual)")
  check_float("diffusion.cfg_dropout", d.cfg_dropout, 0.0, 1.0,
              high_open=True, hint="the probability of the empty prompt")
  if d.timestep_sampling not in train_step.TIMESTEP_SAMPLINGS:
    raise ConfigError(
        f"diffusion.timestep_sampling={d.timestep_sampling!r}; "
        f"choose one of {train_step.TIMESTEP_SAMPLINGS}.")
  check_float("diffusion.logit_mean", d.logit_mean)
  check_float("diffusion.logit_std", d.logit_std, 0.0, low_open=True)
  check_noise_and_loss_options(d)


def check_noise_and_loss_options(d):
  """diffusion.* noise options (offset, pyramid, input perturbation) and
  the loss type; a config without them (saved before they existed) has
  them off."""
  opts = {**train_step.NOISE_OPTIONS, **train_step.LOSS_OPTIONS,
          **{k: d[k] for k in (*train_step.NOISE_OPTIONS,
                               *train_step.LOSS_OPTIONS) if k in d}}
  check_float("diffusion.noise_offset", opts["noise_offset"], 0.0,
              hint="0 = off; diffusers suggests 0.1 (offset noise)")
  check_float("diffusion.input_perturbation", opts["input_perturbation"],
              0.0, hint="0 = off; 0.1 is usual (Ning et al. 2023)")
  check_int("diffusion.multires_noise_iterations",
            opts["multires_noise_iterations"], 0,
            hint="0 = off; kohya suggests 6 to 10 (pyramid noise)")
  check_float("diffusion.multires_noise_discount",
              opts["multires_noise_discount"], 0.0, 1.0, low_open=True,
              hint="each coarser level's weight is discount**level")
  check_choice("diffusion.loss_type", opts["loss_type"], losses.LOSS_TYPES)
  check_choice("diffusion.huber_schedule", opts["huber_schedule"],
               losses.HUBER_SCHEDULES)
  if opts["huber_schedule"] == "snr":
    check_float("diffusion.huber_c", opts["huber_c"], 0.0, 1.0,
                low_open=True, hint=(
                    "the 'snr' schedule moves c from 1 at clean timesteps "
                    "to huber_c at noisy ones"))
  else:
    check_float("diffusion.huber_c", opts["huber_c"], 0.0, low_open=True)


def check_sampler_name(key: str, name):
  """`name` is a registered sampler; key is "sampling.sampler" or a flag
  ("--sampler")."""
  names = samplers.sampler_names()
  if name not in names:
    if key.startswith("--"):
      raise ConfigError(f"{key}={name!r}: Unknown sampler; choose one of "
                        f"{names}.")
    raise ConfigError(f"{key}={name!r} is not a known sampler; choose one "
                      f"of {names}.")


def check_guidance_scale(key: str, value) -> float:
  return check_float(key, value, 0.0, hint=(
      "0 = unconditional, 1 = no guidance, > 1 = guided; a negative scale "
      "steers away from the prompt"))


def check_eta(key: str, value) -> float:
  return check_float(key, value, 0.0,
                     hint="0 = deterministic DDIM, 1 = DDPM's noise")


def check_sampling(config):
  """sampling.*: the sampler, its steps (within diffusion.num_timesteps and
  its timestep spacing), guidance, the periodic grid's sizes and the
  sampled images' sides (sampling.height / sampling.width: in latent runs
  against the autoencoder once it loads, `check_latent_size`)."""
  s = config.sampling
  num_timesteps = config.diffusion.num_timesteps
  check_sampler_name("sampling.sampler", s.sampler)
  check_int("sampling.num_steps", s.num_steps, 1, num_timesteps,
            hint=f"at most diffusion.num_timesteps={num_timesteps}")
  check_guidance_scale("sampling.guidance_scale", s.guidance_scale)
  check_eta("sampling.eta", s.eta)
  clip = s.get("clip_x0", True)
  if not isinstance(clip, bool):
    check_float("sampling.clip_x0", clip, 0.0,
                hint="a bool, or a bound c > 0 (0 = off)")
  spacing = s.get("timestep_spacing", "trailing")
  if spacing not in samplers.TIMESTEP_SPACINGS:
    raise ConfigError(f"sampling.timestep_spacing={spacing!r}; "
                      f"choose one of {samplers.TIMESTEP_SPACINGS}.")
  offset = s.get("steps_offset", 0)
  check_int("sampling.steps_offset", offset, 0)
  wrapped("sampling.steps_offset", samplers.timesteps_for, s.num_steps,
          num_timesteps, spacing, offset)
  if s.get("final_alpha", "one") not in samplers.FINAL_ALPHAS:
    raise ConfigError(f"sampling.final_alpha={s.final_alpha!r}; choose one "
                      f"of {samplers.FINAL_ALPHAS}.")
  interval = s.get("guidance_interval", None)
  if interval is not None:
    check_interval("sampling.guidance_interval", interval)
  check_int("sampling.samples_per_prompt", s.samples_per_prompt, 1)
  check_int("sampling.chunk_size", s.chunk_size, 1,
            hint="images per jitted sampling call")
  latent = model_checks.is_latent_run(config)
  warn_unbounded_first_step(config, latent)
  for key in ("height", "width"):
    side = s.get(key, 0)
    if latent:  # the multiple needs the autoencoder's factor
      check_int(f"sampling.{key}", side, 0, hint="pixels; 0 = data.image_size")
    else:
      model_checks.check_sample_side(config, f"sampling.{key}", side,
                                     default_ok=True)


# Above this gain an epsilon model's error in its x0 estimate at the first
# sampler step swamps the image: under the cosine schedule the trailing first
# step T - 1 has ab = 2.4e-9 (gain 2e4); SD's scaled_linear 0.0047 (15).
MAX_FIRST_STEP_GAIN = 1000.0


def first_step_gain(config) -> float:
  """sqrt((1 - ab) / ab) at the first sampling timestep: the factor by which
  an epsilon model's error multiplies into its x0 estimate there
  (x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab))."""
  d, s = config.diffusion, config.sampling
  schedule = schedules.from_config(d)
  first = samplers.timesteps_for(s.num_steps, d.num_timesteps,
                                 s.get("timestep_spacing", "trailing"),
                                 s.get("steps_offset", 0))[0]
  ab = float(schedule.alphas_cumprod[int(first)])
  return math.inf if ab <= 0 else math.sqrt((1.0 - ab) / ab)


def warn_unbounded_first_step(config, latent: bool):
  """Warns when an epsilon model samples from a timestep where nothing
  bounds its x0 estimate: the samples come out as saturated speckle however
  well it trains (configs/emoji.py's first runs, docs/emoji_results.md).
  Images are clipped to [-1, 1] by default (sampling.clip_x0=True); latents
  only by a numeric bound."""
  if config.diffusion.prediction_type != "epsilon":
    return
  if samplers.run_clip_bound(config.sampling.get("clip_x0", True),
                             latent) is not None:
    return
  gain = first_step_gain(config)
  if gain > MAX_FIRST_STEP_GAIN:
    logging.warning(
        "diffusion.prediction_type='epsilon' with schedule %r: the first "
        "sampling timestep has alphas_cumprod %.2g, where the x0 estimate "
        "multiplies the model's error by %.3g and nothing clips it (%s); "
        "samples come out saturated and speckled. Use "
        "diffusion.prediction_type='v_prediction' (configs/mnist.py), a "
        "numeric sampling.clip_x0 bound (e.g. 3 for unit-scaled latents) or "
        "sampling.timestep_spacing='leading'.",
        config.diffusion.schedule, 1.0 / (1.0 + gain * gain), gain,
        "latents" if latent else "sampling.clip_x0 is off")


def check_steps_flag(config, steps: int):
  """--steps against a run's saved config: within its
  diffusion.num_timesteps and sampling's timestep spacing."""
  num_timesteps = config.diffusion.num_timesteps
  check_int("--steps", steps, 1, num_timesteps,
            hint=f"the run has diffusion.num_timesteps={num_timesteps}")
  s = config.sampling
  wrapped("--steps", samplers.timesteps_for, steps, num_timesteps,
          s.get("timestep_spacing", "trailing"), s.get("steps_offset", 0))
