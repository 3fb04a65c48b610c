"""diffusers scheduler configs -> jaxsd settings, against diffusers' PyTorch
DDIMScheduler as the oracle: the same alphas_cumprod, the same 10-step DDIM
trajectory from the same noise under a closed-form denoiser (SD 1.x, SD 2.x
v-prediction, zero terminal SNR, clipped x0, jaxsd's own export), the
settings DDIMScheduler.from_config picks for other classes' configs, the
export round trip, and errors naming the field jaxsd cannot honour."""
import inspect
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsd.diffusion import samplers
from jaxsd.diffusion import scheduler_config as sc
from jaxsd.diffusion import schedules

# diffusers' own numpy-2 deprecation warnings.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The scheduler_config.json files of SD 1.5 (PNDM, as shipped) and SD 2.1
# (DDIM, v-prediction), as their pipelines write them.
SD15_PNDM = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False}
SD15_DDIM = dict(SD15_PNDM, _class_name="DDIMScheduler")
SD21_V = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# Lin et al.'s fixed schedule: zero terminal SNR, trailing, v-prediction.
ZERO_SNR = dict(SD21_V, rescale_betas_zero_snr=True,
                timestep_spacing="trailing", set_alpha_to_one=True)
# A pixel-space DDPM (google/ddpm-cifar10 style) sampled with DDIM, clipped.
PIXEL_CLIPPED = {"_class_name": "DDPMScheduler", "beta_schedule": "linear",
                 "beta_start": 0.0001, "beta_end": 0.02,
                 "num_train_timesteps": 1000, "clip_sample": True,
                 "clip_sample_range": 1.5, "variance_type": "fixed_small"}
# Cosine: ab[T-1] ~ 1e-9, where an unclipped epsilon model's x0 = (x_t -
# eps) / sqrt(ab) turns float32 rounding of ab into 1e-2 errors. So: v, or
# clipped as jaxsd's configs sample (sampling.clip_x0=True).
COSINE = {"_class_name": "DDIMScheduler",
          "beta_schedule": "squaredcos_cap_v2", "clip_sample": False,
          "prediction_type": "v_prediction",
          "timestep_spacing": "trailing", "num_train_timesteps": 1000}
# jaxsd's defaults, exported.
JAXSD_DEFAULTS = sc.to_diffusers({"diffusion.schedule": "cosine",
                                  "diffusion.num_timesteps": 1000,
                                  "diffusion.prediction_type": "epsilon",
                                  "sampling.clip_x0": True})

TRAJECTORY_CASES = {"sd15_pndm": SD15_PNDM, "sd15_ddim": SD15_DDIM,
                    "sd21_v": SD21_V, "zero_snr_trailing": ZERO_SNR,
                    "pixel_clipped": PIXEL_CLIPPED, "cosine_trailing": COSINE,
                    "jaxsd_defaults": JAXSD_DEFAULTS}


def ddim_from_config(cfg):
  return diffusers.DDIMScheduler.from_config(cfg)


# A fixed nonlinear model output f(x_t, t), read as eps or v: the same
# function in numpy (for diffusers) and jax (for jaxsd), float32.
def model_np(x, t):
  s = np.float32(t / 1000.0)
  return (np.float32(0.8) * np.sqrt(s) * x
          + np.float32(0.3) * np.tanh(np.float32(1.5) * x - s)).astype(
              np.float32)


def model_jax(x, t, context):
  del context
  s = (t / 1000.0).astype(jnp.float32)[:, None]
  return 0.8 * jnp.sqrt(s) * x + 0.3 * jnp.tanh(1.5 * x - s)


def diffusers_ddim(cfg, x_T, num_steps):
  """diffusers' DDIM from_config(cfg) loop, float32; the final prev_sample."""
  scheduler = ddim_from_config(cfg)
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(x_T.copy())
  for t in scheduler.timesteps:
    out = torch.from_numpy(model_np(x.numpy(), int(t)))
    # use_clipped_model_output: jaxsd recomputes eps from a clipped x0.
    x = scheduler.step(out, t, x, use_clipped_model_output=True).prev_sample
  return x.numpy()


@pytest.mark.parametrize("case", sorted(TRAJECTORY_CASES))
def test_ddim_trajectory_matches_diffusers(case):
  cfg = TRAJECTORY_CASES[case]
  settings = sc.from_diffusers(cfg)
  x_T = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
  theirs = diffusers_ddim(cfg, x_T, 10)
  ours = samplers.sample(model_jax, sc.make_schedule(settings), jax.random.key(0),
                         jnp.asarray(x_T), jnp.zeros((4, 1, 1)),
                         num_steps=10, **sc.sample_kwargs(settings))
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
  # Not vacuous: moved far from the noise, and the settings matter.
  assert np.abs(theirs - x_T).max() > 0.5


def test_trajectory_settings_are_what_makes_it_match():
  """SD 1.5's leading/offset/final-alpha settings change the result: with
  jaxsd's defaults instead, the match fails."""
  settings = sc.from_diffusers(SD15_PNDM)
  assert settings["sampling.timestep_spacing"] == "leading"
  assert settings["sampling.steps_offset"] == 1
  assert settings["sampling.final_alpha"] == "first"
  x_T = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
  theirs = diffusers_ddim(SD15_PNDM, x_T, 10)
  kwargs = sc.sample_kwargs(settings)
  for key, default in (("timestep_spacing", "trailing"), ("steps_offset", 0),
                       ("final_alpha", "one")):
    changed = dict(kwargs, **{key: default})
    if key == "timestep_spacing":
      changed["steps_offset"] = 0
    ours = samplers.sample(model_jax, sc.make_schedule(settings), jax.random.key(0),
                           jnp.asarray(x_T), jnp.zeros((4, 1, 1)),
                           num_steps=10, **changed)
    assert np.abs(np.asarray(ours) - theirs).max() > 1e-3, key


@pytest.mark.parametrize("beta_schedule,kwargs", [
    ("linear", {}), ("linear", dict(beta_start=0.0002, beta_end=0.03)),
    ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("squaredcos_cap_v2", {})])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("num_timesteps", [1000, 100])
def test_alphas_cumprod_match_diffusers(beta_schedule, kwargs, rescale,
                                        num_timesteps):
  cfg = dict(beta_schedule=beta_schedule, num_train_timesteps=num_timesteps,
             rescale_betas_zero_snr=rescale, prediction_type="v_prediction",
             **kwargs)
  theirs = diffusers.DDIMScheduler(**cfg).alphas_cumprod.numpy()
  ours = np.asarray(sc.make_schedule(sc.from_diffusers(cfg)).alphas_cumprod)
  np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
  if rescale:
    assert ours[-1] == 0.0 and math.isclose(ours[0], theirs[0], rel_tol=1e-6)


# --- Which settings, for which configs ---------------------------------------


def test_ddim_defaults_are_diffusers():
  """DDIM_DEFAULTS is diffusers' DDIMScheduler.__init__ signature, and the
  classes read are compatible with it."""
  params = inspect.signature(diffusers.DDIMScheduler.__init__).parameters
  assert {k: v.default for k, v in params.items() if k != "self"} == (
      sc.DDIM_DEFAULTS)
  compatible = set(diffusers.DDIMScheduler._compatibles) | {
      "LCMScheduler", "TCDScheduler"}
  assert set(sc.SCHEDULER_CLASSES) <= compatible
  for name in sc.SCHEDULER_CLASSES:
    assert hasattr(diffusers, name), name


SPARSE_CONFIGS = {
    # Fields left out take DDIMScheduler's defaults, as from_config does.
    "bare": {},
    "euler_sdxl": {"_class_name": "EulerDiscreteScheduler",
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012, "interpolation_type": "linear",
                   "num_train_timesteps": 1000, "prediction_type": "epsilon",
                   "sample_max_value": 1.0, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1,
                   "timestep_spacing": "leading", "trained_betas": None,
                   "use_karras_sigmas": False, "clip_sample": False},
    "dpm_trailing": {"_class_name": "DPMSolverMultistepScheduler",
                     "algorithm_type": "dpmsolver++", "solver_order": 2,
                     "timestep_spacing": "trailing", "steps_offset": 1,
                     "beta_schedule": "squaredcos_cap_v2",
                     "num_train_timesteps": 500},
    "ddpm_linspace": {"_class_name": "DDPMScheduler",
                      "timestep_spacing": "linspace",
                      "variance_type": "fixed_small", "clip_sample": True},
    "sd15": SD15_PNDM, "sd21": SD21_V, "zero_snr": ZERO_SNR,
}


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
def test_settings_are_ddim_from_configs(name):
  cfg = SPARSE_CONFIGS[name]
  settings = sc.from_diffusers(cfg)
  d = ddim_from_config(cfg).config
  assert settings["diffusion.num_timesteps"] == d.num_train_timesteps
  assert settings["diffusion.prediction_type"] == d.prediction_type
  assert settings["diffusion.rescale_zero_snr"] == d.rescale_betas_zero_snr
  assert settings["sampling.sampler"] == "ddim"
  assert settings["sampling.timestep_spacing"] == d.timestep_spacing
  # diffusers adds steps_offset to leading timesteps only.
  assert settings["sampling.steps_offset"] == (
      d.steps_offset if d.timestep_spacing == "leading" else 0)
  assert settings["sampling.final_alpha"] == (
      "one" if d.set_alpha_to_one else "first")
  want_clip = (d.clip_sample_range if d.clip_sample_range != 1.0 else True
               ) if d.clip_sample else False
  assert settings["sampling.clip_x0"] == want_clip
  if d.beta_schedule == "squaredcos_cap_v2":
    assert settings["diffusion.beta_start"] is None
  else:
    assert settings["diffusion.beta_start"] == d.beta_start
    assert settings["diffusion.beta_end"] == d.beta_end
  # The sampling timesteps, for a few step counts.
  for n in (1, 7, 10, 50):
    scheduler = ddim_from_config(cfg)
    scheduler.set_timesteps(n)
    np.testing.assert_array_equal(
        samplers.timesteps_for(n, d.num_train_timesteps,
                               settings["sampling.timestep_spacing"],
                               settings["sampling.steps_offset"]),
        scheduler.timesteps.numpy())


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
def test_export_round_trip(name):
  settings = sc.from_diffusers(SPARSE_CONFIGS[name])
  exported = sc.to_diffusers(settings)
  assert exported["_class_name"] == "DDIMScheduler"
  assert sc.from_diffusers(exported) == settings
  # diffusers builds it, with every field one of its own.
  scheduler = diffusers.DDIMScheduler.from_config(exported)
  for key, value in exported.items():
    if not key.startswith("_"):
      assert scheduler.config[key] == value, key


def test_export_of_jaxsd_config_defaults():
  """Unset beta_start / beta_end export as the schedule's own defaults
  (not DDIMScheduler's), so diffusers builds jaxsd's schedule."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      "diffusion": {"schedule": "scaled_linear", "num_timesteps": 1000,
                    "beta_start": 0.0, "beta_end": 0.0,  # 0 = default
                    "prediction_type": "epsilon"},
      "sampling": {"sampler": "ddim", "clip_x0": True}})
  settings = sc.settings_from_config(config)
  assert settings["sampling.timestep_spacing"] == "trailing"
  exported = sc.to_diffusers(settings)
  assert (exported["beta_start"], exported["beta_end"]) == (0.00085, 0.012)
  assert exported["clip_sample"] is True and exported["set_alpha_to_one"]
  theirs = diffusers.DDIMScheduler.from_config(exported).alphas_cumprod
  ours = schedules.make_schedule("scaled_linear", 1000).alphas_cumprod
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-6)
  with pytest.raises(ValueError, match=r"Unknown settings \['sampling\.eta'"):
    sc.to_diffusers(dict(settings, **{"sampling.eta": 0.0}))
  with pytest.raises(ValueError, match=r"needs the settings "
                     r"\['diffusion\.prediction_type'\]"):
    sc.to_diffusers({"diffusion.schedule": "cosine",
                     "diffusion.num_timesteps": 1000})


# --- Refusals ---------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (dict(trained_betas=[0.1] * 1000), r"trained_betas=.*not supported"),
    (dict(beta_schedule="sigmoid"), r"beta_schedule='sigmoid' is not "
                                    r"supported"),
    (dict(prediction_type="sample"), r"prediction_type='sample' is not "
                                     r"supported"),
    (dict(thresholding=True), r"thresholding=True .*not supported"),
    (dict(rescale_betas_zero_snr=True), r"rescale_betas_zero_snr=True with "
                                        r"prediction_type='epsilon'"),
    (dict(timestep_spacing="karras"), r"timestep_spacing='karras' is not "
                                      r"supported"),
    (dict(steps_offset=-1), r"steps_offset=-1 must be an integer >= 0"),
    (dict(num_train_timesteps="1000"), r"num_train_timesteps='1000' must be "
                                       r"an integer"),
    (dict(beta_end=0.0005), r"beta_end=0.0005 must lie in"),
    (dict(clip_sample=True, clip_sample_range=0),
     r"clip_sample_range=0 must be a positive number"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"),
     r"_class_name='FlowMatchEulerDiscreteScheduler' is not a discrete"),
    (dict(_class_name="EulerDiscreteScheduler", timestep_type="continuous"),
     r"timestep_type='continuous' is not supported"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_flow_sigmas=True),
     r"use_flow_sigmas=True is not supported"),
])
def test_unsupported_fields_refused_by_name(change, message):
  with pytest.raises(ValueError, match=r"^scheduler_config\.json: " + message):
    sc.from_diffusers(dict(SD15_DDIM, **change))
