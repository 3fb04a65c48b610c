"""Config validation: bad values fail at start-up with the key and the fix.

`validate(config)` checks a diffusion run's whole tree before anything is
built or written (training, `jaxsd.commands.cache`); `validate_autoencoder(config)`
the sections an autoencoder run (`jaxsd.commands.train_autoencoder`) reads. Every
error is a `jaxsd.errors.ConfigError` naming the key, the bad value and the
valid range, e.g. "optim.learning_rate=-1.0 must be > 0 (a finite number)".

Two checks need more than the config: `check_latent_size(config, factor)`
(latent runs; the autoencoder's downsampling factor is known once it is
loaded) and the command-line flags of jaxsd.commands.sample / jaxsd.commands.evaluate
(`check_sampling_flags`, then `check_flags_against_run` once the run's
config is read).
"""
import math
import numbers
from typing import Optional, Sequence

from jaxsd.models import lora
from jaxsd import models
from jaxsd.data import sources
from jaxsd.data import transforms
from jaxsd.diffusion import step as train_step
from jaxsd.diffusion import losses
from jaxsd.diffusion import samplers
from jaxsd.diffusion import schedules
from jaxsd.errors import ConfigError
from jaxsd.models import unet

# Kept for callers that list the integer fields >= 1.
REQUIRED_POSITIVE = ("training.num_steps", "training.batch_size",
                     "training.log_every", "training.eval_every",
                     "training.checkpoint_every", "training.steps_per_call",
                     "optim.grad_accum_steps", "text.max_length",
                     "diffusion.num_timesteps", "data.image_size")

_INT64 = (-2**63, 2**63 - 1)


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


# --- Checking one value ----------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(key: str, value, rule: str, hint: str = ""):
  """A ConfigError: "key=value must be rule; hint." A command-line flag
  (key "--name") reads "--name=value: name must be rule; hint."."""
  hint = f"; {hint}" if hint else ""
  if key.startswith("--"):
    return ConfigError(f"{key}={value!r}: {key[2:]} must be {rule}{hint}.")
  return ConfigError(f"{key}={value!r} must be {rule}{hint}.")


def _num(value) -> str:
  """0.0 -> "0", 1e-08 -> "1e-08", 2**63 - 1 -> "9223372036854775807"."""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
  low = None if low is None else _num(low)
  high = None if high is None else _num(high)
  if low is not None and high is not None:
    return (f"in {'(' if low_open else '['}{low}, {high}"
            f"{')' if high_open else ']'}")
  if low is not None:
    return f"{'>' if low_open else '>='} {low}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high}"
  return ""


def check_int(key: str, value, low: Optional[int] = 1,
              high: Optional[int] = None, hint: str = "") -> int:
  """value is an integer in [low, high] (None: unbounded); returns it."""
  ok = _is_int(value) and (low is None or value >= low) and (
      high is None or value <= high)
  if not ok:
    bounds = _range_text(low, high, False, False)
    rule = f"{bounds} (an integer)" if bounds else "an integer"
    raise _fail(key, value, rule, hint)
  return value


def check_float(key: str, value, low: Optional[float] = None,
                high: Optional[float] = None, *, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> float:
  """value is a finite number (an int will do) in the range; returns it."""
  ok = _is_number(value) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    bounds = _range_text(low, high, low_open, high_open)
    rule = f"{bounds} (a finite number)" if bounds else "a finite number"
    raise _fail(key, value, rule, hint)
  return float(value)


def check_choice(key: str, value, choices: Sequence, hint: str = ""):
  if value not in choices:
    raise _fail(key, value, f"one of {list(choices)}", hint)
  return value


def _wrapped(key_hint: str, fn, *args, **kwargs):
  """fn(*args), its ValueError re-raised as a ConfigError (naming key_hint
  when its message does not)."""
  try:
    return fn(*args, **kwargs)
  except ConfigError:
    raise
  except ValueError as e:
    message = str(e)
    if key_hint not in message:
      message = f"{key_hint}: {message}"
    raise ConfigError(message) from e


def check_interval(key: str, value):
  """(lo, hi) with 0 <= lo < hi <= 1 (fractions of the diffusion time);
  returns it as floats. Flags give strings."""
  rule = ("two numbers lo,hi with 0 <= lo < hi <= 1 (fractions of the "
          "diffusion time, 1 = pure noise; 0,1 = every step)")
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise _fail(key, value, rule) from None
  if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
    raise _fail(key, value, rule)
  return lo, hi


def unet_levels(config) -> int:
  """Resolution levels of the UNet (len(model.block_out_channels)): it halves
  the size at each but the last."""
  return len(config.model.block_out_channels)


def _unet_divisor(config) -> int:
  return 2 ** (unet_levels(config) - 1)


def check_latent_size(config, factor: int) -> int:
  """A latent run's image size against its autoencoder: data.image_size
  must divide by the autoencoder's downsampling `factor`, and the latent size
  image_size / factor by the UNet's 2**(levels - 1). Call once the
  autoencoder is loaded (its factor is then known); returns the latent size.
  """
  size = config.data.image_size
  check_int("data.image_size", size, 1)
  if factor < 1 or size % factor:
    raise ConfigError(
        f"data.image_size={size} does not divide by the autoencoder's "
        f"downsampling factor {factor} (model.autoencoder="
        f"{config.model.autoencoder!r}); choose a multiple of {factor}.")
  latent_size = size // factor
  divisor = _unet_divisor(config)
  if latent_size % divisor:
    multiple = factor * divisor
    raise ConfigError(
        f"data.image_size={size} gives {latent_size}x{latent_size} latents "
        f"(the autoencoder downsamples {factor}x), which the UNet's "
        f"{unet_levels(config)} levels (model.block_out_channels="
        f"{tuple(config.model.block_out_channels)}) cannot halve "
        f"{unet_levels(config) - 1} times; data.image_size must be a multiple "
        f"of {multiple} (e.g. {max(multiple, round(size / multiple) * multiple)}"
        ").")
  return latent_size


# --- The sections --------------------------------------------------------------


def _check_training(config):
  t = config.training
  for key in ("num_steps", "batch_size", "log_every", "eval_every",
              "checkpoint_every", "steps_per_call"):
    check_int(f"training.{key}", t[key], 1)
  keep = t.get("keep_checkpoints", None)
  if keep is not None:
    check_int("training.keep_checkpoints", keep, 1,
              hint="or None to keep every checkpoint")
  check_int("training.seed", t.seed, *_INT64, hint="it seeds jax.random.key")
  if t.num_steps % t.steps_per_call:
    raise ConfigError(
        f"training.num_steps={t.num_steps} must be a multiple "
        f"of training.steps_per_call={t.steps_per_call}.")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if t[key] % t.steps_per_call:
      raise ConfigError(
          f"training.{key}={t[key]} must be a multiple of "
          f"training.steps_per_call={t.steps_per_call}.")


def _check_optim(config):
  o = config.optim
  check_float("optim.learning_rate", o.learning_rate, 0.0, low_open=True,
              hint="a rate <= 0 does not descend the loss")
  check_int("optim.warmup_steps", o.warmup_steps, 0)
  check_float("optim.end_learning_rate_factor", o.end_learning_rate_factor,
              0.0, 1.0, hint="the cosine decays to learning_rate * this")
  check_float("optim.b1", o.b1, 0.0, 1.0, high_open=True)
  check_float("optim.b2", o.b2, 0.0, 1.0, high_open=True)
  check_float("optim.eps", o.eps, 0.0, low_open=True)
  check_float("optim.weight_decay", o.weight_decay, 0.0)
  check_float("optim.grad_clip_norm", o.grad_clip_norm, 0.0,
              hint="0 disables clipping")
  check_float("optim.ema_decay", o.ema_decay, 0.0, 1.0, high_open=True,
              hint="0 = no averaging")
  check_int("optim.grad_accum_steps", o.grad_accum_steps, 1)
  if config.training.batch_size % o.grad_accum_steps:
    raise ConfigError(
        f"training.batch_size={config.training.batch_size} must be a multiple "
        f"of optim.grad_accum_steps={o.grad_accum_steps} (the micro-batches "
        "split the global batch).")


def _check_data(config):
  d = config.data
  _wrapped("data.source", sources.source_class, d.source)  # names choices
  check_int("data.image_size", d.image_size, 1)
  check_choice("data.num_channels", d.num_channels, (1, 3),
               hint="1 = grey, 3 = RGB")
  if d.crop not in transforms.CROPS:
    raise ConfigError(f"data.crop={d.crop!r}; choose one of "
                      f"{transforms.CROPS}.")
  check_int("data.workers", d.workers, 0,
            hint="0 decodes in the training process")
  check_int("data.shuffle_buffer", d.shuffle_buffer, 1)
  check_int("data.cycle_length", d.cycle_length, 1)
  check_float("data.max_skipped_fraction", d.max_skipped_fraction, 0.0, 1.0)


def _check_text(config):
  t = config.text
  check_int("text.max_length", t.max_length, 1)
  for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
    check_int(f"text.{key}", t[key], 1)
  if not t.pretrained and t.hidden_size % t.num_heads:
    raise ConfigError(
        f"text.hidden_size={t.hidden_size} must be a multiple of "
        f"text.num_heads={t.num_heads} (each head gets hidden_size / "
        "num_heads dimensions).")


def _check_channels(key: str, value):
  if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
      or not value or not all(_is_int(v) and v >= 1 for v in value)):
    raise _fail(key, value, "a non-empty sequence of integers >= 1")
  return tuple(value)


def _check_model(config):
  m = config.model
  _wrapped("model.implementation", models.unet_class, m.implementation)
  _wrapped("model.dtype", models.compute_dtype, m.dtype)
  # Latent runs (an autoencoder, or a pipeline that brings one): the UNet
  # sees latents, checked by check_latent_size once the autoencoder loads.
  latent = bool(m.autoencoder or m.get("pretrained_pipeline", ""))
  check_int("model.in_channels", m.in_channels, 1)
  check_int("model.out_channels", m.out_channels, 1)
  channels = _check_channels("model.block_out_channels", m.block_out_channels)
  check_int("model.layers_per_block", m.layers_per_block, 1)
  heads = m.attention_head_dim
  if _is_int(heads):
    check_int("model.attention_head_dim", heads, 1,
              hint="heads per block (diffusers' naming)")
  else:
    _check_channels("model.attention_head_dim", heads)
  check_int("model.norm_num_groups", m.norm_num_groups, 1)
  if m.implementation == "jaxsd":
    bad = [c for c in channels if c % m.norm_num_groups]
    if bad:
      raise ConfigError(
          f"model.norm_num_groups={m.norm_num_groups} must divide every entry "
          f"of model.block_out_channels={channels} ({bad} do not split into "
          "that many groups).")
  n_blocks = len(channels)
  for key in ("down_block_types", "up_block_types"):
    if len(m[key]) != n_blocks:
      raise ConfigError(
          f"model.{key} has {len(m[key])} entries but "
          f"model.block_out_channels has {n_blocks}; give one per level.")
  if not latent and config.data.num_channels != m.in_channels:
    raise ConfigError(
        f"data.num_channels={config.data.num_channels} but "
        f"model.in_channels={m.in_channels}: a pixel-space UNet "
        "denoises the images themselves; set both to 1 (grey) or 3 (RGB).")
  if not latent:
    divisor = _unet_divisor(config)
    size = config.data.image_size
    if size % divisor:
      fits = max(divisor, round(size / divisor) * divisor)
      raise ConfigError(
          f"data.image_size={size} must be a multiple of {divisor} (the UNet "
          f"halves it at each of its {n_blocks} levels but the last: "
          f"model.block_out_channels={channels}); e.g. data.image_size="
          f"{fits}, or use fewer levels.")
  pooling = m.pooled_text_embedding
  if pooling and pooling not in unet.TEXT_POOLINGS:
    raise ConfigError(f"model.pooled_text_embedding={pooling!r}; choose '' "
                      f"(off) or one of {unet.TEXT_POOLINGS}.")
  lora_config = m.get("lora")
  if lora_config is not None:
    check_int("model.lora.rank", lora_config.rank, 0,
              hint="0 = no LoRA, full training")
    check_float("model.lora.alpha", lora_config.alpha, 0.0,
                hint="the update is scaled by alpha / rank; 0 = rank")
    check_float("model.lora.dropout", lora_config.dropout, 0.0, 1.0,
                high_open=True)
    check_choice("model.lora.base_dtype",
                 lora_config.get("base_dtype", "float32"),
                 sorted(lora.BASE_DTYPES))
  _wrapped("model.lora", lora.from_config, lora_config)  # targets, base_dtype
  remat = _wrapped("model.remat", unet.remat_policy, m.get("remat", "none"))
  if remat != "none" and m.implementation != "jaxsd":
    raise ConfigError(f"model.remat={remat!r} is a jaxsd UNet feature; set "
                      "model.implementation='jaxsd' or model.remat='none'.")


def _check_autoencoder(config):
  """The autoencoder.* numbers (jaxsd-train-autoencoder)."""
  from jaxsd.autoencoder import training as autoencoder_training  # pylint: disable=g-import-not-at-top
  a = config.autoencoder
  channels = _check_channels("autoencoder.block_out_channels",
                             a.block_out_channels)
  check_int("autoencoder.layers_per_block", a.layers_per_block, 1)
  check_int("autoencoder.latent_channels", a.latent_channels, 1)
  check_int("autoencoder.norm_num_groups", a.norm_num_groups, 1)
  bad = [c for c in channels if c % a.norm_num_groups]
  if bad:
    raise ConfigError(
        f"autoencoder.norm_num_groups={a.norm_num_groups} must divide every "
        f"entry of autoencoder.block_out_channels={channels} ({bad} do not).")
  check_float("autoencoder.scaling_factor", a.scaling_factor, 0.0,
              hint="0 = measured when checkpointing")
  check_float("autoencoder.shift_factor", a.shift_factor)
  check_choice("autoencoder.reconstruction_loss", a.reconstruction_loss,
               autoencoder_training.RECONSTRUCTION_LOSSES)
  check_float("autoencoder.kl_weight", a.kl_weight, 0.0)
  check_int("autoencoder.disc_start", a.disc_start, None,
            hint="the discriminator's first step; < 0 = never")
  check_float("autoencoder.disc_weight", a.disc_weight, 0.0)
  check_int("autoencoder.disc_channels", a.disc_channels, 1)
  check_int("autoencoder.disc_layers", a.disc_layers, 1)
  check_int("autoencoder.eval_images", a.eval_images, 2,
            hint="eval/rfid needs a covariance of at least 2 images")


def _check_diffusion(config):
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
    import inspect  # pylint: disable=g-import-not-at-top
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


def _check_sampler_name(key: str, name):
  names = samplers.sampler_names()
  if name not in names:
    if key.startswith("--"):
      raise ConfigError(f"{key}={name!r}: Unknown sampler; choose one of "
                        f"{names}.")
    raise ConfigError(f"{key}={name!r} is not a known sampler; choose one "
                      f"of {names}.")


def _check_guidance_scale(key: str, value):
  return check_float(key, value, 0.0, hint=(
      "0 = unconditional, 1 = no guidance, > 1 = guided; a negative scale "
      "steers away from the prompt"))


def _check_sampling(config):
  s = config.sampling
  num_timesteps = config.diffusion.num_timesteps
  _check_sampler_name("sampling.sampler", s.sampler)
  check_int("sampling.num_steps", s.num_steps, 1, num_timesteps,
            hint=f"at most diffusion.num_timesteps={num_timesteps}")
  _check_guidance_scale("sampling.guidance_scale", s.guidance_scale)
  check_float("sampling.eta", s.eta, 0.0,
              hint="0 = deterministic DDIM, 1 = DDPM's noise")
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
  _wrapped("sampling.steps_offset", samplers.timesteps_for, s.num_steps,
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


def _check_eval(config):
  e = config.eval
  check_int("eval.num_samples", e.num_samples, 1)
  check_int("eval.chunk_size", e.chunk_size, 1,
            hint="images per jitted sampling call")
  check_int("eval.num_clip_samples", e.num_clip_samples, 1)
  check_int("eval.inception_reference_samples", e.inception_reference_samples,
            2, hint="a covariance needs at least 2 images")
  if e.metrics:
    # The metric names, their data sources and eval.num_samples against
    # each metric's minimum: what Evaluator(config) checks.
    from jaxsd.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    evaluator.check_config(config)


def _check_parallel(config):
  p = config.parallel
  check_choice("parallel.distributed", p.distributed, ("auto", "on", "off"))
  check_int("parallel.cpu_devices", p.cpu_devices, 0,
            hint="0 = one CPU device")
  check_int("parallel.model_axis_size", p.model_axis_size, 0,
            hint="0 = all devices")
  check_int("parallel.fsdp_min_size", p.fsdp_min_size, 0)


def validate(config):
  """Raises ConfigError on the first value of a diffusion run's config that
  is out of its range; reads no data and builds nothing (well under a
  second). Latent runs: also `check_latent_size` once the autoencoder is
  loaded."""
  _check_training(config)
  _check_optim(config)
  _check_data(config)
  _check_text(config)
  _check_model(config)
  _check_autoencoder(config)
  _check_diffusion(config)
  _check_sampling(config)
  _check_eval(config)
  _check_parallel(config)


def validate_autoencoder(config):
  """The sections an autoencoder run (jaxsd-train-autoencoder)
  reads: training, optim, data, autoencoder, eval (its reference split) and
  parallel; and data.image_size against the autoencoder's downsampling."""
  _check_training(config)
  _check_optim(config)
  _check_data(config)
  _check_autoencoder(config)
  _check_parallel(config)
  factor = 2 ** (len(config.autoencoder.block_out_channels) - 1)
  size = config.data.image_size
  if size % factor:
    raise ConfigError(
        f"data.image_size={size} must be a multiple of {factor}, the "
        "downsampling of autoencoder.block_out_channels="
        f"{tuple(config.autoencoder.block_out_channels)} (2 per level after "
        "the first).")


# --- Command-line flags of jaxsd.commands.sample and jaxsd.commands.evaluate -----------------------


def check_sampling_flags(*, num_samples=None, sampler=None, steps=None,
                         guidance_scale=None, eta=None, guidance_interval=None,
                         chunk_size=None, lora_scale=None, step=None,
                         seed=None, metrics=None):
  """Checks the flags jaxsd.commands.sample / jaxsd.commands.evaluate were given (None = not
  given: the run's own setting) before any workdir is read; each error names
  the flag (--guidance_scale=-3.0: ...)."""
  if num_samples is not None:
    check_int("--num_samples", num_samples, 1)
  if sampler is not None:
    _check_sampler_name("--sampler", sampler)
  if steps is not None:
    check_int("--steps", steps, 1, hint="sampler steps, at most the run's "
              "diffusion.num_timesteps")
  if guidance_scale is not None:
    _check_guidance_scale("--guidance_scale", guidance_scale)
  if eta is not None:
    check_float("--eta", eta, 0.0,
                hint="0 = deterministic DDIM, 1 = DDPM's noise")
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
    check_int("--seed", seed, *_INT64)
  if metrics is not None:
    from jaxsd.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    names = metrics_lib.metric_names()
    unknown = [m for m in metrics if m not in names]
    if unknown or not metrics:
      raise ConfigError(f"--metrics={','.join(metrics)}: metrics must be "
                        f"one or more of {names}"
                        + (f"; unknown: {unknown}." if unknown else "."))


def check_flags_against_run(config, *, steps=None):
  """The flags that depend on the run (its saved config): --steps within
  its diffusion.num_timesteps and timestep spacing."""
  if steps is None:
    return
  num_timesteps = config.diffusion.num_timesteps
  check_int("--steps", steps, 1, num_timesteps,
            hint=f"the run has diffusion.num_timesteps={num_timesteps}")
  s = config.sampling
  _wrapped("--steps", samplers.timesteps_for, steps, num_timesteps,
           s.get("timestep_spacing", "trailing"), s.get("steps_offset", 0))
