"""diffusers' scheduler_config.json <-> jaxsd's schedule and sampling settings.

`from_diffusers(cfg)` reads a pipeline's `scheduler/scheduler_config.json`
(DDIM, PNDM, DDPM, Euler, DPM-Solver, ... as SD 1.x/2.x write them) into
jaxsd settings, a flat dict of dotted config names:

  diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start,
  diffusion.beta_end, diffusion.rescale_zero_snr, diffusion.prediction_type:
    the noise schedule and parameterisation the model was trained with
    (`schedules.make_schedule`, the loss);
  sampling.sampler ("ddim"), sampling.timestep_spacing, sampling.steps_offset,
  sampling.final_alpha, sampling.clip_x0:
    the `samplers.sample` arguments with which jaxsd samples as
    `diffusers.DDIMScheduler.from_config(cfg)` does (SD's usual scheduler
    swap), whatever class wrote the config. Fields such a DDIMScheduler does
    not read (PNDM's skip_prk_steps, Euler's interpolation_type, DPM-Solver's
    solver_order, ...) are sampler details that do not change the model and
    are ignored; fields it reads but leaves out take its defaults (e.g.
    clip_sample=True), as from_config does.

What jaxsd cannot honour is refused with the field's name: trained_betas,
thresholding, prediction_type="sample", beta schedules other than linear /
scaled_linear / squaredcos_cap_v2, continuous or flow-matching timesteps,
zero terminal SNR with epsilon prediction, and scheduler classes outside
diffusers' DDPM family.

Two differences from diffusers' DDIM remain (samplers.py): jaxsd always steps
to the next sampled timestep, where DDIMScheduler steps to t - T // n (equal
for "leading" spacing, and for "trailing" when n divides T); and a clipped
x0 (clip_sample) recomputes eps from it, which is diffusers'
use_clipped_model_output=True (its pipelines pass False).

`to_diffusers(settings)` is the inverse: a DDIMScheduler config for export.
"""
import inspect
import math
from typing import Any, Dict, Mapping

from absl import logging

from jaxsd.diffusion import samplers
from jaxsd.diffusion import schedules

# diffusers' beta_schedule -> jaxsd's diffusion.schedule.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}
_TO_DIFFUSERS_SCHEDULE = {v: k for k, v in BETA_SCHEDULES.items()}

# Discrete-time, DDPM-parameterised schedulers: DDIMScheduler's _compatibles
# in diffusers 0.39 without EDMEulerScheduler (EDM's sigma parameterisation),
# plus the DDPM-schedule distillation samplers.
SCHEDULER_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
    "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "LCMScheduler",
    "TCDScheduler")

# diffusers 0.39 DDIMScheduler.__init__'s defaults: what from_config uses
# for the fields a config leaves out.
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "clip_sample": True,
    "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
}
_DIFFUSERS_VERSION = "0.39.0"  # whose DDIMScheduler these semantics follow

# Settings `to_diffusers` reads, with the defaults of `samplers.sample` (and
# of make_schedule) for the optional ones.
# beta_start / beta_end: None (or 0, as jaxsd's config writes it) = the
# schedule's own default.
SETTINGS_DEFAULTS = {
    "diffusion.beta_start": None, "diffusion.beta_end": None,
    "diffusion.rescale_zero_snr": False, "sampling.sampler": "ddim",
    "sampling.timestep_spacing": "trailing", "sampling.steps_offset": 0,
    "sampling.final_alpha": "one", "sampling.clip_x0": False,
}
SETTINGS_REQUIRED = ("diffusion.schedule", "diffusion.num_timesteps",
                     "diffusion.prediction_type")


def _error(source, field, value, why):
  return ValueError(f"{source}: {field}={value!r} {why}")


def _number(source, field, value, positive=True) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      not math.isfinite(value)) or (positive and value <= 0):
    raise _error(source, field, value, "must be a " +
                 ("positive " if positive else "") + "number.")
  return float(value)


def _integer(source, field, value, minimum) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise _error(source, field, value, f"must be an integer >= {minimum}.")
  return value


def from_diffusers(scheduler_config: Mapping[str, Any],
                   source: str = "scheduler_config.json") -> Dict[str, Any]:
  """jaxsd settings (flat, dotted names; see the module doc) of a diffusers
  scheduler config dict.

  Raises:
    ValueError: naming the field jaxsd cannot honour.
  """
  cfg = dict(scheduler_config)
  name = cfg.get("_class_name", "DDIMScheduler")
  if name not in SCHEDULER_CLASSES:
    raise _error(source, "_class_name", name,
                 "is not a discrete-time DDPM-family scheduler jaxsd reads "
                 f"(one of {list(SCHEDULER_CLASSES)}).")
  # Model-defining fields of other classes, which DDIM would silently drop.
  if cfg.get("timestep_type", "discrete") != "discrete":
    raise _error(source, "timestep_type", cfg["timestep_type"],
                 "is not supported: jaxsd's models take the integer "
                 "training timestep ('discrete').")
  for field in ("use_flow_sigmas", "use_dynamic_shifting"):
    if cfg.get(field):
      raise _error(source, field, cfg[field],
                   "is not supported: a flow-matching / shifted schedule, not "
                   "the DDPM noise schedule jaxsd trains and samples with.")
  ignored = sorted(k for k in cfg if k not in DDIM_DEFAULTS
                   and not k.startswith("_"))
  if ignored:
    logging.info("%s: %s fields %s are %s sampler details a DDIMScheduler "
                 "does not read; ignored.", source, name, ignored, name)
  c = dict(DDIM_DEFAULTS)
  c.update({k: v for k, v in cfg.items() if k in DDIM_DEFAULTS})

  if c["trained_betas"] is not None:
    raise _error(source, "trained_betas", "[...]",
                 "is not supported: jaxsd builds its betas from a named "
                 f"beta_schedule ({sorted(BETA_SCHEDULES)}).")
  if c["beta_schedule"] not in BETA_SCHEDULES:
    raise _error(source, "beta_schedule", c["beta_schedule"],
                 f"is not supported; jaxsd has {sorted(BETA_SCHEDULES)}.")
  schedule = BETA_SCHEDULES[c["beta_schedule"]]
  prediction_type = c["prediction_type"]
  if prediction_type not in samplers.PREDICTION_TYPES:
    raise _error(source, "prediction_type", prediction_type,
                 "is not supported: jaxsd's models predict "
                 f"{' or '.join(samplers.PREDICTION_TYPES)}.")
  if c["thresholding"]:
    raise _error(source, "thresholding", c["thresholding"],
                 "(dynamic thresholding of x0) is not supported; jaxsd clips "
                 "x0 to a fixed range (clip_sample).")
  if not isinstance(c["rescale_betas_zero_snr"], bool):
    raise _error(source, "rescale_betas_zero_snr", c["rescale_betas_zero_snr"],
                 "must be true or false.")
  if c["rescale_betas_zero_snr"] and prediction_type == "epsilon":
    raise _error(source, "rescale_betas_zero_snr", True,
                 "with prediction_type='epsilon' is not supported: at the "
                 "last timestep (zero SNR) an epsilon prediction determines "
                 "no x0; use v_prediction.")
  num_timesteps = _integer(source, "num_train_timesteps",
                           c["num_train_timesteps"], 2)
  beta_start = beta_end = None
  if schedule != "cosine":  # squaredcos_cap_v2 ignores them, as jaxsd's cosine
    beta_start = _number(source, "beta_start", c["beta_start"])
    beta_end = _number(source, "beta_end", c["beta_end"])
    if not beta_start < beta_end < 1:
      raise _error(source, "beta_end", beta_end,
                   f"must lie in (beta_start={beta_start}, 1).")
  spacing = c["timestep_spacing"]
  if spacing not in samplers.TIMESTEP_SPACINGS:
    raise _error(source, "timestep_spacing", spacing,
                 f"is not supported; choose one of "
                 f"{list(samplers.TIMESTEP_SPACINGS)}.")
  steps_offset = _integer(source, "steps_offset", c["steps_offset"], 0)
  if spacing != "leading":
    steps_offset = 0  # diffusers adds it to "leading" timesteps only
  if not isinstance(c["set_alpha_to_one"], bool):
    raise _error(source, "set_alpha_to_one", c["set_alpha_to_one"],
                 "must be true or false.")
  clip_x0: Any = False
  if c["clip_sample"]:
    bound = _number(source, "clip_sample_range", c["clip_sample_range"])
    clip_x0 = True if bound == 1.0 else bound
  return {
      "diffusion.schedule": schedule,
      "diffusion.num_timesteps": num_timesteps,
      "diffusion.beta_start": beta_start,
      "diffusion.beta_end": beta_end,
      "diffusion.rescale_zero_snr": c["rescale_betas_zero_snr"],
      "diffusion.prediction_type": prediction_type,
      "sampling.sampler": "ddim",
      "sampling.timestep_spacing": spacing,
      "sampling.steps_offset": steps_offset,
      "sampling.final_alpha": "one" if c["set_alpha_to_one"] else "first",
      "sampling.clip_x0": clip_x0,
  }


def _schedule_default(schedule: str, field: str) -> float:
  fn = schedules._BETA_SCHEDULES[schedule]  # pylint: disable=protected-access
  return float(inspect.signature(fn).parameters[field].default)


def to_diffusers(settings: Mapping[str, Any]) -> Dict[str, Any]:
  """A diffusers DDIMScheduler config (scheduler_config.json) for jaxsd
  settings: `from_diffusers`'s keys; SETTINGS_REQUIRED must be there, the
  others default to SETTINGS_DEFAULTS. from_diffusers of the result gives the
  settings back (beta_start / beta_end explicit)."""
  unknown = set(settings) - set(SETTINGS_DEFAULTS) - set(SETTINGS_REQUIRED)
  if unknown:
    raise ValueError(f"Unknown settings {sorted(unknown)}; to_diffusers reads "
                     f"{sorted(SETTINGS_REQUIRED + tuple(SETTINGS_DEFAULTS))}.")
  missing = [k for k in SETTINGS_REQUIRED if k not in settings]
  if missing:
    raise ValueError(f"to_diffusers needs the settings {missing}.")
  s = dict(SETTINGS_DEFAULTS)
  s.update(settings)
  schedule = s["diffusion.schedule"]
  if schedule not in _TO_DIFFUSERS_SCHEDULE:
    raise ValueError(f"diffusion.schedule={schedule!r} has no diffusers "
                     f"beta_schedule; jaxsd's {sorted(_TO_DIFFUSERS_SCHEDULE)} "
                     "do.")
  if schedule == "cosine":  # diffusers ignores them; its defaults
    beta_start, beta_end = (DDIM_DEFAULTS["beta_start"],
                            DDIM_DEFAULTS["beta_end"])
  else:  # explicit: jaxsd's defaults are not DDIMScheduler's
    # None or 0 (jaxsd's config default): the schedule's own default.
    beta_start = (s["diffusion.beta_start"] or
                  _schedule_default(schedule, "beta_start"))
    beta_end = (s["diffusion.beta_end"] or
                _schedule_default(schedule, "beta_end"))
  if s["diffusion.prediction_type"] not in samplers.PREDICTION_TYPES:
    raise ValueError(f"diffusion.prediction_type="
                     f"{s['diffusion.prediction_type']!r}; choose one of "
                     f"{list(samplers.PREDICTION_TYPES)}.")
  spacing = s["sampling.timestep_spacing"]
  if spacing not in samplers.TIMESTEP_SPACINGS:
    raise ValueError(f"sampling.timestep_spacing={spacing!r}; choose one of "
                     f"{list(samplers.TIMESTEP_SPACINGS)}.")
  if s["sampling.final_alpha"] not in samplers.FINAL_ALPHAS:
    raise ValueError(f"sampling.final_alpha={s['sampling.final_alpha']!r}; "
                     f"choose one of {list(samplers.FINAL_ALPHAS)}.")
  clip = samplers._clip_bound(s["sampling.clip_x0"])  # pylint: disable=protected-access
  return {
      "_class_name": "DDIMScheduler",
      "_diffusers_version": _DIFFUSERS_VERSION,
      "num_train_timesteps": int(s["diffusion.num_timesteps"]),
      "beta_start": float(beta_start),
      "beta_end": float(beta_end),
      "beta_schedule": _TO_DIFFUSERS_SCHEDULE[schedule],
      "trained_betas": None,
      "clip_sample": clip is not None,
      "clip_sample_range": 1.0 if clip is None else clip,
      "set_alpha_to_one": s["sampling.final_alpha"] == "one",
      "steps_offset": int(s["sampling.steps_offset"]),
      "prediction_type": s["diffusion.prediction_type"],
      "thresholding": False,
      "dynamic_thresholding_ratio": DDIM_DEFAULTS["dynamic_thresholding_ratio"],
      "sample_max_value": DDIM_DEFAULTS["sample_max_value"],
      "timestep_spacing": spacing,
      "rescale_betas_zero_snr": bool(s["diffusion.rescale_zero_snr"]),
  }


def settings_from_config(config) -> Dict[str, Any]:
  """The settings of a jaxsd config (its diffusion and sampling sections),
  for `to_diffusers`; fields the config lacks take SETTINGS_DEFAULTS."""
  out = {}
  for key in SETTINGS_REQUIRED + tuple(SETTINGS_DEFAULTS):
    section, field = key.split(".")
    value = config[section].get(field, SETTINGS_DEFAULTS.get(key))
    out[key] = value
  return out


def make_schedule(settings: Mapping[str, Any]) -> schedules.NoiseSchedule:
  """The NoiseSchedule of `from_diffusers` settings."""
  return schedules.make_schedule(
      settings["diffusion.schedule"], settings["diffusion.num_timesteps"],
      settings.get("diffusion.beta_start") or None,
      settings.get("diffusion.beta_end") or None,
      settings.get("diffusion.rescale_zero_snr", False))


def sample_kwargs(settings: Mapping[str, Any]) -> Dict[str, Any]:
  """The `samplers.sample` keyword arguments of `from_diffusers` settings."""
  return {"sampler": settings["sampling.sampler"],
          "prediction_type": settings["diffusion.prediction_type"],
          "timestep_spacing": settings["sampling.timestep_spacing"],
          "steps_offset": settings["sampling.steps_offset"],
          "final_alpha": settings["sampling.final_alpha"],
          "clip_x0": settings["sampling.clip_x0"]}
