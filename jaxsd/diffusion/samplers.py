"""Reverse-diffusion samplers: DDPM, DDIM and DPM-Solver++ (2M).

Every sampler is one reverse step ``x_t -> x_s`` (``s < t``) written in terms
of the model's ``(x0, eps)`` prediction at ``x_t`` and the two noise levels
``ab_t = alphas_cumprod[t]``, ``ab_s = alphas_cumprod[s]``. `sample` owns the
rest: timestep spacing, classifier-free guidance, the prediction-type
conversion, x0 clipping and the jitted `lax.scan` over steps.

Timesteps are "trailing" spaced by default (`timesteps_for`): the first step
is always the noisiest training step ``T - 1``, and the last step jumps from
the final timestep straight to the data (``ab = 1``), which every sampler
does by returning its x0 prediction there. That jump is first order, so few
steps smooth out detail finer than the noise level of the last timestep
(sigma ~0.1 for 20 of 1000 cosine steps).

diffusers' other spacings and final step are there too, to sample a model as
its scheduler_config.json says (`jaxsd.diffusion.scheduler_config`):
"leading" (``arange(n) * (T // n) + steps_offset``, SD 1.x/2.x) and
"linspace" timesteps, and ``final_alpha="first"`` (diffusers'
set_alpha_to_one=False): the last step is a real step to ``ab[0]``, not to
the data. Each step goes to the next sampled timestep. diffusers'
DDIMScheduler steps to ``t - T // n`` instead, the same timestep for
"leading" spacing and for "trailing" when n divides T, but not for
"linspace" (nor "trailing" otherwise), where it steps to a noise level other
than the one its next model call assumes.
"""
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import registry
from jaxsd.diffusion.schedules import NoiseSchedule

# denoise_fn(x_t [B, ...], t [B] int32, context [B, L, D]) -> output [B, ...].
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
# Where the last step goes: "one" = ab 1, the data (the x0 prediction);
# "first" = ab[0], the least noisy training step (diffusers'
# set_alpha_to_one=False).
FINAL_ALPHAS = ("one", "first")

_SAMPLERS = registry.Registry("sampler", "sampling.sampler")


register_sampler = _SAMPLERS.register  # class decorator
sampler_names = _SAMPLERS.names


def get_sampler(name: str) -> "Sampler":
  """Returns an instance of the sampler registered as `name`."""
  return _SAMPLERS.get(name)()


class Sampler:
  """One reverse step ``x_t -> x_s`` given the model's prediction at ``x_t``.

  `step` is pure and jittable. ``ab_t`` and ``ab_s`` are scalars with
  ``ab_t < ab_s <= 1``; ``ab_s == 1`` means "step to the data". ``state`` is a
  pytree carried across steps (history for multistep solvers), created by
  `init_state`.
  """

  def init_state(self, x: jnp.ndarray) -> Any:
    del x
    return ()

  def step(self, x_t, x0, eps, ab_t, ab_s, state, rng,
           eta=0.0) -> Tuple[jnp.ndarray, Any]:
    """Returns (x_s, new_state); x_t, x0, eps and x_s are [B, ...]."""
    raise NotImplementedError


def ddpm_posterior(x_t, x0, ab_t, ab_s):
  """Mean and variance of q(x_s | x_t, x0) (Ho et al. 2020, eq. 7).

  For a strided step ``t -> s`` the one-step ``beta`` is ``1 - ab_t / ab_s``;
  with ``s = t - 1`` this is the paper's beta-tilde posterior exactly.
  """
  alpha_ts = ab_t / ab_s
  beta_ts = 1.0 - alpha_ts
  mean = (jnp.sqrt(ab_s) * beta_ts / (1.0 - ab_t) * x0
          + jnp.sqrt(alpha_ts) * (1.0 - ab_s) / (1.0 - ab_t) * x_t)
  var = (1.0 - ab_s) / (1.0 - ab_t) * beta_ts
  return mean, var


@register_sampler("ddpm")
class DDPMSampler(Sampler):
  """Ancestral sampling with the posterior variance beta-tilde; ignores eta."""

  def step(self, x_t, x0, eps, ab_t, ab_s, state, rng, eta=0.0):
    del eps, eta
    mean, var = ddpm_posterior(x_t, x0, ab_t, ab_s)
    noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
    return mean + jnp.sqrt(jnp.maximum(var, 0.0)) * noise, state


@register_sampler("ddim")
class DDIMSampler(Sampler):
  """DDIM (Song et al. 2021); eta=0 is deterministic, eta=1 equals DDPM."""

  def step(self, x_t, x0, eps, ab_t, ab_s, state, rng, eta=0.0):
    del x_t
    var = eta**2 * (1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s)
    # Clamped: rounding can make it slightly negative when ab_s == 1.
    dir_scale = jnp.sqrt(jnp.maximum(1.0 - ab_s - var, 0.0))
    noise = jax.random.normal(rng, x0.shape, x0.dtype)
    x_s = jnp.sqrt(ab_s) * x0 + dir_scale * eps + jnp.sqrt(var) * noise
    return x_s, state


def _log_snr_half(ab):
  """lambda = log(alpha / sigma) = 0.5 log(ab / (1 - ab))."""
  return 0.5 * (jnp.log(ab) - jnp.log1p(-ab))


@register_sampler("dpmpp_2m")
class DPMSolverPPSampler(Sampler):
  """DPM-Solver++(2M), data-prediction multistep form (Lu et al. 2022, alg. 2).

  Second order with the "midpoint" update of diffusers; the first step has no
  history and is first order (which is DDIM). The step to the data (ab_s == 1)
  is also first order: it returns x0, as diffusers does with
  final_sigmas_type="zero".
  """

  def init_state(self, x):
    # (previous x0 prediction, its lambda, whether it exists).
    return (jnp.zeros_like(x), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.bool_))

  def step(self, x_t, x0, eps, ab_t, ab_s, state, rng, eta=0.0):
    del eps, rng, eta
    x0_prev, lam_prev, has_prev = state
    # Written with ratios rather than lambdas so that ab_s == 1 (sigma_s = 0,
    # lambda_s = inf) stays finite.
    sigma_t, sigma_s = jnp.sqrt(1.0 - ab_t), jnp.sqrt(1.0 - ab_s)
    alpha_t, alpha_s = jnp.sqrt(ab_t), jnp.sqrt(ab_s)
    exp_neg_h = (sigma_s * alpha_t) / (alpha_s * sigma_t)  # e^{-h} in [0, 1)
    lam_t, lam_s = _log_snr_half(ab_t), _log_snr_half(ab_s)
    h = lam_s - lam_t
    r = (lam_t - lam_prev) / h
    second_order = has_prev & (ab_s < 1.0)
    r = jnp.where(second_order, r, 1.0)
    d = jnp.where(second_order, x0 + 0.5 / r * (x0 - x0_prev), x0)
    x_s = (sigma_s / sigma_t) * x_t + alpha_s * (1.0 - exp_neg_h) * d
    return x_s, (x0, lam_t, jnp.ones((), jnp.bool_))


def timesteps_for(num_steps: int, num_timesteps: int,
                  spacing: str = "trailing", steps_offset: int = 0
                  ) -> np.ndarray:
  """Sampling timesteps, decreasing, int32 [num_steps].

  "trailing" (the default): ``round(T - i T / n) - 1`` for i = 0 .. n-1 (Lin
  et al. 2024, "Common diffusion noise schedules and sample steps are
  flawed"): the first step is always T - 1, where x_T ~ N(0, I) matches the
  forward process best. With the cosine schedule "leading" spacing would
  start e.g. at t = 950 for n = 20, where ab is still ~6e-3, and pure noise is
  the wrong start. With n == T the steps are T-1, ..., 0.

  "leading": ``i * (T // n) + steps_offset`` for i = n-1 .. 0 (diffusers'
  default, SD 1.x/2.x with steps_offset=1: 981, 961, ..., 1 for n = 50).
  "linspace": ``linspace(0, T - 1, n)`` rounded half to even (numpy's
  round, as diffusers), reversed. steps_offset applies to "leading" only
  (diffusers ignores it otherwise; here it must then be 0).
  """
  _check_num_steps(num_steps, num_timesteps)
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"Unknown timestep spacing {spacing!r} "
                     f"(sampling.timestep_spacing); choose one of "
                     f"{list(TIMESTEP_SPACINGS)}.")
  if isinstance(steps_offset, bool) or not isinstance(steps_offset,
                                                      (int, np.integer)):
    raise ValueError(f"sampling.steps_offset must be an int, got "
                     f"{steps_offset!r}.")
  if steps_offset and spacing != "leading":
    raise ValueError(
        f"sampling.steps_offset={steps_offset} applies to "
        f"timestep_spacing='leading' only; set it to 0 for {spacing!r} "
        "(diffusers ignores it there).")
  if spacing == "trailing":
    # floor(x + 0.5), not np.round: banker's rounding could merge two steps.
    stride = num_timesteps / num_steps
    ts = np.floor(num_timesteps - np.arange(num_steps) * stride + 0.5) - 1
  elif spacing == "leading":
    ts = np.arange(num_steps)[::-1] * (num_timesteps // num_steps)
    ts = ts + steps_offset
    if steps_offset < 0 or ts[0] > num_timesteps - 1:
      raise ValueError(
          f"sampling.steps_offset={steps_offset} puts the leading timesteps "
          f"outside [0, {num_timesteps - 1}] for {num_steps} steps (the first "
          f"would be {ts[0]}).")
  else:
    # Spacing (T-1)/(n-1) >= 1 between values: rounding keeps them distinct.
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps))[::-1]
  return np.ascontiguousarray(ts).astype(np.int32)


def _check_num_steps(num_steps, num_timesteps):
  if isinstance(num_steps, bool) or not isinstance(num_steps,
                                                   (int, np.integer)):
    raise ValueError(f"sampling.num_steps must be a Python int, got "
                     f"{num_steps!r} ({type(num_steps).__name__}).")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"sampling.num_steps must be in [1, {num_timesteps}] (the "
                     f"schedule's num_timesteps), got {num_steps}.")


def _is_static_one(guidance_scale) -> bool:
  return isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0


def _clip_bound(clip_x0) -> Optional[float]:
  """False/None/0 -> no clipping, True -> 1.0, number c > 0 -> c."""
  if clip_x0 is None or clip_x0 is False or (
      isinstance(clip_x0, (int, float)) and clip_x0 == 0):
    return None
  if clip_x0 is True:
    return 1.0
  if isinstance(clip_x0, (int, float)) and clip_x0 > 0:
    return float(clip_x0)
  raise ValueError(
      f"clip_x0 must be a bool or a positive number, got {clip_x0!r}.")


def run_clip_bound(clip_x0, latent: bool) -> Optional[float]:
  """The bound sampling.clip_x0 puts on a run's x0 estimates (None: none).
  True is the images' range [-1, 1], so it clips pixel runs only (latents
  have no such range); a number c > 0 bounds either to [-c, c]."""
  if latent and isinstance(clip_x0, bool):
    return None
  return _clip_bound(clip_x0)


def guided_denoise_fn(denoise_fn: DenoiseFn, cond_context, uncond_context,
                      guidance_scale,
                      guidance_timesteps: Optional[Tuple[int, int]] = None
                      ) -> Callable:
  """Wraps denoise_fn with classifier-free guidance: (x_t, t) -> output.

  Both branches go through one denoise_fn call on the doubled batch
  (conditional first); ``out = uncond + s (cond - uncond)``. A static
  guidance_scale == 1 calls only the conditional branch. uncond_context may
  have batch size 1 and is broadcast; contexts may also be pytrees of arrays.
  With guidance_timesteps=(lo, hi) the scale applies only where
  lo <= t <= hi, and the conditional output is used elsewhere.
  """
  if _is_static_one(guidance_scale):
    return lambda x, t: denoise_fn(x, t, cond_context)
  if uncond_context is None:
    raise ValueError("guidance_scale != 1 needs an uncond_context.")

  def fn(x, t):
    batch = x.shape[0]
    uncond = jax.tree.map(
        lambda u: jnp.broadcast_to(u, (batch,) + u.shape[1:]), uncond_context)
    context = jax.tree.map(lambda c, u: jnp.concatenate([c, u.astype(c.dtype)]),
                           cond_context, uncond)
    out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), context)
    out_cond, out_uncond = jnp.split(out, 2)
    scale = guidance_scale
    if guidance_timesteps is not None:
      inside = (t >= guidance_timesteps[0]) & (t <= guidance_timesteps[1])
      scale = jnp.where(inside, guidance_scale, 1.0)
      scale = scale.reshape((-1,) + (1,) * (out_cond.ndim - 1))
    return out_uncond + scale * (out_cond - out_uncond)
  return fn


def guidance_timesteps_for(interval, num_timesteps: int
                           ) -> Optional[Tuple[int, int]]:
  """(lo, hi) timesteps of a guidance interval given as fractions of T.

  Guidance limited to an interval of noise levels (Kynkaanniemi et al.,
  2024) keeps most of its effect on the prompt while costing less diversity;
  None or (0, 1) = everywhere.
  """
  if interval is None:
    return None
  lo, hi = (float(v) for v in interval)
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f"guidance interval {interval!r}: need 0 <= lo < hi <= 1 "
                     "(fractions of the diffusion time, 1 = pure noise).")
  if lo == 0.0 and hi == 1.0:
    return None
  return (int(np.ceil(lo * (num_timesteps - 1))),
          int(np.floor(hi * (num_timesteps - 1))))


def sample(denoise_fn: DenoiseFn,
           schedule: NoiseSchedule,
           rng: jnp.ndarray,
           x_T_shape_or_noise: Union[Sequence[int], jnp.ndarray],
           cond_context,
           uncond_context=None,
           *,
           sampler: str = "ddim",
           num_steps: int = 50,
           guidance_scale: Union[float, jnp.ndarray] = 1.0,
           prediction_type: str = "epsilon",
           eta: Union[float, jnp.ndarray] = 0.0,
           clip_x0: Union[bool, float] = False,
           guidance_interval: Optional[Tuple[float, float]] = None,
           timestep_spacing: str = "trailing",
           steps_offset: int = 0,
           final_alpha: str = "one"
           ) -> jnp.ndarray:
  """Draws x0 [B, ...] float32 by running `sampler` from pure noise.

  Args:
    denoise_fn: ``(x_t [B, ...], t [B] int32, context [B, L, D]) -> output
      [B, ...]``, closing over the parameters; its output is read as
      `prediction_type` and computed on in float32.
    schedule: the training noise schedule (T = schedule.num_timesteps).
    rng: PRNG key; split into the initial noise and per-step noise.
    x_T_shape_or_noise: a static shape ``(B, ...)`` to draw x_T ~ N(0, I) from
      `rng`, or x_T itself [B, ...].
    cond_context: [B, L, D] text context (or a pytree of [B, ...] arrays).
    uncond_context: [B or 1, L, D] empty-prompt context; unused (may be None)
      when guidance_scale is the Python number 1.
    sampler: a name in `sampler_names()`.
    num_steps: denoiser evaluations, 1 <= num_steps <= T; at the timesteps
      `timesteps_for(num_steps, T, timestep_spacing, steps_offset)`.
    guidance_scale: classifier-free guidance weight s. A Python 1 skips the
      unconditional branch; anything else (a float or a traced array) batches
      cond and uncond into one denoise_fn call per step.
    prediction_type: 'epsilon' or 'v_prediction'.
    eta: DDIM noise level (0 deterministic, 1 ~ DDPM); other samplers ignore it.
    clip_x0: clip the x0 prediction to [-1, 1] (True) or [-c, c] (c > 0); eps is
      then recomputed from the clipped x0, as diffusers does. False or 0: off.
    guidance_interval: (lo, hi) fractions of the diffusion time (1 = pure
      noise) where guidance applies; elsewhere the conditional output alone.
      None = every step.
    timestep_spacing: "trailing", "leading" or "linspace"; see
      `timesteps_for`.
    steps_offset: added to "leading" timesteps (SD: 1); 0 otherwise.
    final_alpha: "one": the last step goes to the data and returns the x0
      prediction; "first": a sampler step to ab[0] (diffusers'
      set_alpha_to_one=False), returning that x.

  Returns:
    [B, ...] float32: the final step's x0 prediction (clipped if asked), or
    with final_alpha="first" the sample at ab[0] (noise sqrt(1 - ab[0]) left
    in it, 0.029 for SD's schedule).

  Jittable with denoise_fn, x_T_shape_or_noise (when a shape), sampler,
  num_steps, prediction_type, clip_x0, timestep_spacing, steps_offset and
  final_alpha static; schedule, rng, contexts, guidance_scale (unless 1) and
  eta may be traced.
  """
  step_impl = get_sampler(sampler)
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one "
                     f"of {list(PREDICTION_TYPES)}.")
  if final_alpha not in FINAL_ALPHAS:
    raise ValueError(f"Unknown final_alpha {final_alpha!r} "
                     f"(sampling.final_alpha); choose one of "
                     f"{list(FINAL_ALPHAS)}.")
  timesteps = timesteps_for(num_steps, schedule.num_timesteps,
                            timestep_spacing, steps_offset)
  clip_bound = _clip_bound(clip_x0)

  noise_rng, step_rng = jax.random.split(rng)
  if isinstance(x_T_shape_or_noise, (tuple, list)):
    x_T = jax.random.normal(noise_rng, tuple(x_T_shape_or_noise), jnp.float32)
  else:
    x_T = jnp.asarray(x_T_shape_or_noise, jnp.float32)
  batch = x_T.shape[0]
  for leaf in jax.tree.leaves(cond_context):
    if leaf.shape[0] != batch:
      raise ValueError(f"cond_context has batch {leaf.shape[0]} but x_T has "
                       f"batch {batch}.")
  model = guided_denoise_fn(
      denoise_fn, cond_context, uncond_context, guidance_scale,
      guidance_timesteps_for(guidance_interval, schedule.num_timesteps))
  ab = schedule.alphas_cumprod

  def predict(x, t):
    """(x0, eps) [B, ...] at scalar timestep t."""
    t_batch = jnp.full((batch,), t, jnp.int32)
    out = model(x, t_batch).astype(jnp.float32)
    x0, eps = schedule.to_x0_eps(out, x, t_batch, prediction_type)
    if clip_bound is not None:
      x0 = jnp.clip(x0, -clip_bound, clip_bound)
      # Keep (x0, eps) consistent with x_t so DDIM/DDPM agree after clipping.
      eps = (x - jnp.sqrt(ab[t]) * x0) / jnp.sqrt(1.0 - ab[t])
    return x0, eps

  def body(carry, step):
    x, state = carry
    i, t, s = step
    x0, eps = predict(x, t)
    x, state = step_impl.step(x, x0, eps, ab[t], ab[s], state,
                              jax.random.fold_in(step_rng, i), eta)
    return (x, state), None

  if final_alpha == "first":
    # Every step a sampler step, the last one to ab[0].
    targets = np.append(timesteps[1:], 0).astype(np.int32)
    steps = (jnp.arange(num_steps), jnp.asarray(timesteps),
             jnp.asarray(targets))
    (x, _), _ = jax.lax.scan(body, (x_T, step_impl.init_state(x_T)), steps)
    return x
  # Steps between sampled timesteps, then the jump from the last one to the
  # data, where every sampler's update reduces to returning x0.
  steps = (jnp.arange(num_steps - 1), jnp.asarray(timesteps[:-1]),
           jnp.asarray(timesteps[1:]))
  (x, _), _ = jax.lax.scan(body, (x_T, step_impl.init_state(x_T)), steps)
  x0, _ = predict(x, timesteps[-1])
  return x0
