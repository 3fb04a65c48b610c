"""The first sampling step of an epsilon model: its x0 estimate multiplies
the model's error by sqrt((1 - ab) / ab), 2e4 at the cosine schedule's
noisiest step. jaxsd warns where nothing bounds it (latent runs unclipped),
and a numeric sampling.clip_x0 bounds latents too."""
from unittest import mock

import numpy as np
import pytest

from configs import emoji
from configs import mnist
from jaxsd.diffusion import checks
from jaxsd.diffusion import samplers


def _cosine_alphas_cumprod(n=1000, s=0.008):
  # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999 (independent of
  # jaxsd.diffusion.schedules).
  f = lambda t: np.cos((t / n + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(n, dtype=np.float64)
  betas = np.minimum(1 - f(t + 1) / f(t), 0.999)
  return np.cumprod(1 - betas)


def _epsilon_latent(tiny_config):
  config = tiny_config()
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction_type = "epsilon"
  config.sampling.timestep_spacing = "trailing"
  config.sampling.steps_offset = 0
  config.sampling.clip_x0 = True
  return config


def test_gain_is_the_closed_form(tiny_config):
  config = _epsilon_latent(tiny_config)
  ab = _cosine_alphas_cumprod()
  want = np.sqrt((1 - ab[-1]) / ab[-1])  # trailing: the first step is T - 1
  assert checks.first_step_gain(config) == pytest.approx(want, rel=1e-3)
  assert want > 1e4
  config.sampling.timestep_spacing = "leading"
  config.sampling.steps_offset = 1
  first = samplers.timesteps_for(config.sampling.num_steps, 1000, "leading",
                                 1)[0]
  assert checks.first_step_gain(config) == pytest.approx(
      np.sqrt((1 - ab[first]) / ab[first]), rel=1e-3)
  assert checks.first_step_gain(config) < checks.MAX_FIRST_STEP_GAIN


def _warned(config, latent):
  with mock.patch.object(checks.logging, "warning") as warning:
    checks.warn_unbounded_first_step(config, latent)
  return " ".join(str(a) for call in warning.call_args_list
                  for a in call.args)


def test_warns_only_where_nothing_bounds_the_first_step(tiny_config):
  config = _epsilon_latent(tiny_config)
  message = _warned(config, latent=True)
  assert "v_prediction" in message and "clip_x0" in message
  assert _warned(config, latent=False) == ""  # images clip to [-1, 1]
  config.sampling.clip_x0 = False
  assert "clip_x0 is off" in _warned(config, latent=False)
  with config.ignore_type():
    config.sampling.clip_x0 = 3.0  # a numeric bound holds in latents too
  assert _warned(config, latent=True) == ""
  with config.ignore_type():
    config.sampling.clip_x0 = True
  config.diffusion.prediction_type = "v_prediction"
  assert _warned(config, latent=True) == ""
  config.diffusion.prediction_type = "epsilon"
  config.diffusion.schedule = "scaled_linear"  # SD's: gain 15
  assert _warned(config, latent=True) == ""


def test_shipped_recipes_do_not_warn():
  for config in (emoji.get_config(), mnist.get_config()):
    assert _warned(config, latent=bool(config.model.autoencoder)) == ""
