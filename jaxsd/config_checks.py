"""Config validation: bad values fail at start-up with the key and the fix.

`validate(config)` checks a diffusion run's whole tree before anything is
built or written (training, `jaxsd.commands.cache`); `validate_autoencoder(config)`
the sections an autoencoder run (`jaxsd.commands.train_autoencoder`) reads. Every
error is a `jaxsd.errors.ConfigError` naming the key, the bad value and the
valid range, e.g. "optim.learning_rate=-1.0 must be > 0 (a finite number)".

Each section is checked beside the code that owns it, with the shared
helpers of `jaxsd.checks` (check_int, check_float, ...):
  training.*, optim.*       jaxsd/training/checks.py
  data.*                    jaxsd/data/checks.py
  text.*                    jaxsd/text/checks.py
  model.*                   jaxsd/models/checks.py
  autoencoder.*             jaxsd/autoencoder/checks.py
  diffusion.*, sampling.*   jaxsd/diffusion/checks.py
  eval.*                    jaxsd/evaluation/checks.py
  parallel.*                jaxsd/parallel.py (check_parallel)
This module only runs them in order, so it may import them all; they import
nothing above them.

Two checks need more than the config: `check_latent_size(config, factor)`
(latent runs; the autoencoder's downsampling factor is known once it is
loaded) and the command-line flags of jaxsd.commands.sample / jaxsd.commands.evaluate
(`check_sampling_flags`, then `check_flags_against_run` once the run's
config is read; --height / --width of a latent run once its autoencoder is
loaded).
"""
from jaxsd import checks
from jaxsd import parallel
from jaxsd.autoencoder import checks as autoencoder_checks
from jaxsd.data import checks as data_checks
from jaxsd.diffusion import checks as diffusion_checks
from jaxsd.diffusion import samplers as diffusion_samplers
from jaxsd.evaluation import checks as eval_checks
from jaxsd.models import checks as model_checks
from jaxsd.text import checks as text_checks
from jaxsd.training import checks as training_checks

# Where callers have always found them: the helpers (the commands check
# their own flags with them) and the model section's size checks.
check_choice = checks.check_choice
check_float = checks.check_float
check_int = checks.check_int
check_interval = checks.check_interval
check_latent_size = model_checks.check_latent_size
unet_levels = model_checks.unet_levels

# Kept for callers that list the integer fields >= 1.
REQUIRED_POSITIVE = ("training.num_steps", "training.batch_size",
                     "training.log_every", "training.eval_every",
                     "training.checkpoint_every", "training.steps_per_call",
                     "optim.grad_accum_steps", "text.max_length",
                     "diffusion.num_timesteps", "data.image_size")


def validate(config):
  """Raises ConfigError on the first value of a diffusion run's config that
  is out of its range; reads no data and builds nothing (well under a
  second). Latent runs: also `check_latent_size` once the autoencoder is
  loaded."""
  training_checks.check_training(config)
  training_checks.check_optim(config)
  data_checks.check_data(config)
  text_checks.check_text(config)
  model_checks.check_model(config)
  autoencoder_checks.check_autoencoder(config)
  diffusion_checks.check_diffusion(config)
  diffusion_checks.check_sampling(config)
  eval_checks.check_eval(config)
  parallel.check_parallel(config)


def validate_autoencoder(config):
  """The sections an autoencoder run (jaxsd-train-autoencoder)
  reads: training, optim, data, autoencoder and parallel; and
  data.image_size against the autoencoder's downsampling."""
  training_checks.check_training(config)
  training_checks.check_optim(config)
  data_checks.check_data(config)
  data_checks.check_no_buckets(
      config, "the autoencoder trains on square crops (buckets are for "
      "diffusion runs)")
  autoencoder_checks.check_autoencoder(config)
  parallel.check_parallel(config)
  autoencoder_checks.check_image_size(config)


# --- Command-line flags of jaxsd.commands.sample and jaxsd.commands.evaluate -----------------------


def check_sampling_flags(*, num_samples=None, sampler=None, steps=None,
                         guidance_scale=None, eta=None, guidance_interval=None,
                         chunk_size=None, lora_scale=None, step=None,
                         seed=None, metrics=None, height=None, width=None,
                         clip_x0=None, timestep_spacing=None):
  """Checks the flags jaxsd.commands.sample / jaxsd.commands.evaluate were given (None = not
  given: the run's own setting) before any workdir is read; each error names
  the flag (--guidance_scale=-3.0: ...)."""
  if num_samples is not None:
    check_int("--num_samples", num_samples, 1)
  if sampler is not None:
    diffusion_checks.check_sampler_name("--sampler", sampler)
  if steps is not None:
    check_int("--steps", steps, 1, hint="sampler steps, at most the run's "
              "diffusion.num_timesteps")
  if guidance_scale is not None:
    diffusion_checks.check_guidance_scale("--guidance_scale", guidance_scale)
  if eta is not None:
    diffusion_checks.check_eta("--eta", eta)
  if guidance_interval is not None:
    check_interval("--guidance_interval", guidance_interval)
  if chunk_size is not None:
    check_int("--chunk_size", chunk_size, 1,
              hint="images per jitted sampling call")
  if lora_scale is not None:
    check_float("--lora_scale", lora_scale,
                hint="the adapters' weight, 0 = the base alone")
  if step is not None:
    check_int("--step", step, 0, hint="a checkpoint step")
  if seed is not None:
    check_int("--seed", seed, *checks.INT64)
  if metrics is not None:
    eval_checks.check_metrics_flag(metrics)
  if clip_x0 is not None:
    check_float("--clip_x0", clip_x0, 0.0, hint="a bound c > 0, 0 = off")
  if timestep_spacing is not None:
    check_choice("--timestep_spacing", timestep_spacing,
                 diffusion_samplers.TIMESTEP_SPACINGS)
  for key, side in (("--height", height), ("--width", width)):
    if side is not None:  # its multiple: check_flags_against_run
      check_int(key, side, 1, hint="pixels")


def check_flags_against_run(config, *, steps=None, height=None, width=None,
                            autoencoder_factor: int = 1):
  """The flags that depend on the run (its saved config): --steps within
  its diffusion.num_timesteps and timestep spacing; --height and --width
  multiples of its UNet's downsampling (latent runs: times the
  autoencoder's, `autoencoder_factor`, known once it is loaded)."""
  if steps is not None:
    diffusion_checks.check_steps_flag(config, steps)
  for key, side in (("--height", height), ("--width", width)):
    if side is not None:
      model_checks.check_sample_side(config, key, side, autoencoder_factor)
