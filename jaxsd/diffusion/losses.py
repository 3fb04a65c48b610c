"""Denoising loss: noise prediction or velocity; l2, l1 or pseudo-Huber per
element (kohya's sd-scripts `--loss_type`), with optional min-SNR
weighting."""
import jax.numpy as jnp

from jaxsd.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l2", "l1", "huber")
# Huber's constant c: fixed ("constant"), or kohya's default "snr" schedule,
# c(t) = (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - ab) / ab):
# near 1 (l2-like) at clean timesteps, c (l1-like) at noisy ones.
HUBER_SCHEDULES = ("snr", "constant")


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


def huber_constant(schedule: NoiseSchedule, t, huber_c: float,
                   huber_schedule: str = "snr"):
  """Huber's c per example, float32 [B] (kohya's get_huber_threshold)."""
  if huber_schedule == "constant":
    return jnp.full(t.shape, huber_c, jnp.float32)
  if huber_schedule == "snr":
    sigma = jnp.sqrt(1.0 / schedule.snr(t))  # sqrt((1 - ab) / ab)
    return (1.0 - huber_c) / jnp.square(1.0 + sigma) + huber_c
  raise ValueError(f"diffusion.huber_schedule={huber_schedule!r}; choose "
                   f"one of {HUBER_SCHEDULES}.")


def elementwise_loss(error, loss_type: str = "l2", huber_c=None):
  """Loss per element of error = prediction - target [B, ...].

  l2: error^2; l1: |error|; huber (kohya's pseudo-Huber, scaled to match l2
  near 0 and 2c|error| far out): 2c (sqrt(error^2 + c^2) - c), with c
  [B] per example.
  """
  if loss_type == "l2":
    return jnp.square(error)
  if loss_type == "l1":
    return jnp.abs(error)
  if loss_type == "huber":
    c = huber_c.reshape(huber_c.shape + (1,) * (error.ndim - huber_c.ndim))
    return 2.0 * c * (jnp.sqrt(jnp.square(error) + jnp.square(c)) - c)
  raise ValueError(f"diffusion.loss_type={loss_type!r}; choose one of "
                   f"{LOSS_TYPES}.")


def denoising_loss(model_output, x0, noise, t, schedule: NoiseSchedule,
                   prediction_type: str, min_snr_gamma: float = 0.0,
                   loss_type: str = "l2", huber_c: float = 0.1,
                   huber_schedule: str = "snr", per_example: bool = False):
  """Weighted loss, mean over pixels then batch (per_example: float32 [B],
  not averaged over the batch). Shapes [B, H, W, C]; t [B].

  loss_type "l2" (the MSE), "l1" or "huber" (`elementwise_loss`, its c from
  `huber_constant`); min_snr_gamma > 0 weights each example's mean.
  """
  target = prediction_target(schedule, x0, noise, t, prediction_type)
  c = (huber_constant(schedule, t, huber_c, huber_schedule)
       if loss_type == "huber" else None)
  per_pixel = elementwise_loss(model_output.astype(jnp.float32) - target,
                               loss_type, c)
  mean = jnp.mean(per_pixel, axis=tuple(range(1, x0.ndim)))
  weighted = min_snr_weight(schedule.snr(t), min_snr_gamma,
                            prediction_type) * mean
  return weighted if per_example else jnp.mean(weighted)
