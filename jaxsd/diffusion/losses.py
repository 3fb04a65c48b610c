"""Denoising loss: noise prediction or velocity, with optional min-SNR weighting."""
import jax.numpy as jnp

from jaxsd.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction")


def min_snr_weight(snr, gamma: float, prediction_type: str):
  """Per-example loss weight of min-SNR-gamma (Hang et al. 2023).

  The target's MSE is rescaled so that the implied x0-loss weight is
  min(SNR, gamma): min(SNR, gamma) / SNR for epsilon targets and
  min(SNR, gamma) / (SNR + 1) for v targets. gamma <= 0 turns weighting off.
  """
  if gamma <= 0:
    return jnp.ones_like(snr)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return clipped / snr
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  raise ValueError(f"Unknown prediction_type {prediction_type!r}; "
                   f"choose one of {PREDICTION_TYPES}.")


def prediction_target(schedule: NoiseSchedule, x0, noise, t,
                      prediction_type: str):
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedule.velocity(x0, noise, t)
  raise ValueError(f"Unknown prediction_type {prediction_type!r}; "
                   f"choose one of {PREDICTION_TYPES}.")


def denoising_loss(model_output, x0, noise, t, schedule: NoiseSchedule,
                   prediction_type: str, min_snr_gamma: float = 0.0):
  """Weighted MSE, mean over pixels then batch. Shapes [B, H, W, C]; t [B]."""
  target = prediction_target(schedule, x0, noise, t, prediction_type)
  mse = jnp.mean(jnp.square(model_output.astype(jnp.float32) - target),
                 axis=tuple(range(1, x0.ndim)))
  weight = min_snr_weight(schedule.snr(t), min_snr_gamma, prediction_type)
  return jnp.mean(weight * mse)
