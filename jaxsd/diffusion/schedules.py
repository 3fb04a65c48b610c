"""Discrete-time noise schedules.

A schedule is the array ``alphas_cumprod[t]`` (written alpha-bar_t) for
``t = 0 .. T-1``: a noisy sample is ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps``.
Everything else (SNR, noising, prediction targets) derives from it.
"""
import math
from typing import Callable, Dict

import flax
import jax.numpy as jnp
import numpy as np

_BETA_SCHEDULES: Dict[str, Callable[..., np.ndarray]] = {}


def register_beta_schedule(name: str):
  def wrap(fn):
    _BETA_SCHEDULES[name] = fn
    return fn
  return wrap


@register_beta_schedule("linear")
def linear_betas(num_timesteps, beta_start=1e-4, beta_end=2e-2):
  """DDPM (Ho et al. 2020): betas linear in t."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@register_beta_schedule("scaled_linear")
def scaled_linear_betas(num_timesteps, beta_start=8.5e-4, beta_end=1.2e-2):
  """Stable Diffusion: sqrt(beta) linear in t."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps,
                     dtype=np.float64)**2


@register_beta_schedule("cosine")
def cosine_betas(num_timesteps, s=0.008, max_beta=0.999, **unused):
  """Improved DDPM (Nichol & Dhariwal 2021): ab(t) = cos^2((t/T + s)/(1 + s) pi/2).

  diffusers' "squaredcos_cap_v2" (betas_for_alpha_bar: the same s, the same
  cap); like it, ignores beta_start / beta_end.
  """
  del unused
  def f(t):
    return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2)**2
  betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)]
  return np.asarray(betas, dtype=np.float64)


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
  """ab with zero SNR at t = T-1 (Lin et al. 2024, "Common diffusion noise
  schedules and sample steps are flawed", algorithm 1; diffusers'
  rescale_betas_zero_snr).

  sqrt(ab) is shifted so that its last value is 0 and scaled so that its
  first is unchanged. ab[T-1] = 0 makes x_{T-1} pure noise, which an epsilon
  model cannot invert (x0 = (x_t - eps) / 0): use it with v_prediction.
  """
  root = np.sqrt(np.asarray(alphas_cumprod, np.float64))
  first, last = root[0], root[-1]
  root = (root - last) * first / (first - last)
  return root**2


def schedule_names():
  return sorted(_BETA_SCHEDULES)


@flax.struct.dataclass
class NoiseSchedule:
  """Precomputed schedule, a pytree so it can be passed into jitted code."""
  alphas_cumprod: jnp.ndarray  # [T] float32, decreasing in t

  @property
  def num_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]

  def _ab(self, t, ndim):
    ab = self.alphas_cumprod[t]
    return ab.reshape(ab.shape + (1,) * (ndim - ab.ndim))

  def add_noise(self, x0, noise, t):
    """x_t for integer timesteps t [B]; x0, noise [B, ...]."""
    ab = self._ab(t, x0.ndim)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise

  def snr(self, t):
    """Signal-to-noise ratio ab / (1 - ab) at timesteps t."""
    ab = self.alphas_cumprod[t]
    return ab / (1.0 - ab)

  def velocity(self, x0, noise, t):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
    ab = self._ab(t, x0.ndim)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0

  def to_x0_eps(self, model_output, x_t, t, prediction_type: str):
    """Converts a model output into (x0, eps) predictions."""
    ab = self._ab(t, x_t.ndim)
    sa, so = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    if prediction_type == "epsilon":
      eps = model_output
      x0 = (x_t - so * eps) / sa
    elif prediction_type == "v_prediction":
      x0 = sa * x_t - so * model_output
      eps = so * x_t + sa * model_output
    else:
      raise ValueError(f"Unknown prediction_type {prediction_type!r}; "
                       "use 'epsilon' or 'v_prediction'.")
    return x0, eps


def from_config(diffusion_config) -> "NoiseSchedule":
  """The schedule a config's `diffusion` section names (schedule,
  num_timesteps, beta_start / beta_end with 0 = the default,
  rescale_zero_snr)."""
  d = diffusion_config
  return make_schedule(d.schedule, d.num_timesteps,
                       beta_start=d.beta_start or None,
                       beta_end=d.beta_end or None,
                       rescale_zero_snr=d.get("rescale_zero_snr", False))


def make_schedule(name: str, num_timesteps: int = 1000, beta_start=None,
                  beta_end=None, rescale_zero_snr: bool = False
                  ) -> NoiseSchedule:
  """Builds a named schedule ('linear', 'scaled_linear', 'cosine').

  beta_start / beta_end: the first and last beta of the (scaled) linear
  schedules; None = their defaults (DDPM's 1e-4 / 2e-2, SD's 8.5e-4 /
  1.2e-2). rescale_zero_snr: `rescale_zero_terminal_snr` afterwards.
  """
  if name not in _BETA_SCHEDULES:
    raise ValueError(f"Unknown noise schedule {name!r}; choose one of "
                     f"{schedule_names()} (config diffusion.schedule).")
  if num_timesteps < 2:
    raise ValueError(f"diffusion.num_timesteps must be >= 2, got {num_timesteps}.")
  kwargs = {}
  if beta_start is not None:
    kwargs["beta_start"] = beta_start
  if beta_end is not None:
    kwargs["beta_end"] = beta_end
  betas = _BETA_SCHEDULES[name](num_timesteps, **kwargs)
  alphas_cumprod = np.cumprod(1.0 - betas)
  if rescale_zero_snr:
    alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
  return NoiseSchedule(alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))
