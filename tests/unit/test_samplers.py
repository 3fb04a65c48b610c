"""Tests for jaxsd.diffusion.samplers on a Gaussian toy problem.

Data x0 ~ N(mu + c, sd^2) per dimension (c is read from the context), for
which the optimal denoiser E[x0 | x_t] and hence the exact eps / v prediction
is closed-form; a correct sampler driven by it must reproduce the data.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion import samplers
from jaxsd.diffusion import schedules

import helpers

MU = np.linspace(-1.0, 1.0, 8).astype(np.float32)
SD = np.linspace(0.5, 1.5, 8).astype(np.float32)
T = 1000


def gaussian_denoiser(schedule, prediction_type, mu=MU, sd=SD):
  """Exact model output for x0 ~ N(mu + context[:, 0, 0], sd^2); x [B, D]."""
  def denoise_fn(x, t, context):
    mean = mu + context[:, 0, :1]  # [B, D]
    ab = schedule.alphas_cumprod[t][:, None]
    a, b = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    var_t = a**2 * sd**2 + b**2  # Var[x_t]
    x0 = mean + a * sd**2 / var_t * (x - a * mean)
    eps = b / var_t * (x - a * mean)
    return eps if prediction_type == "epsilon" else a * eps - b * x0
  return denoise_fn


@functools.lru_cache(maxsize=None)
def toy(schedule_name="cosine", prediction_type="epsilon", mu_shift=0.0):
  """(schedule, exact denoiser), cached so `jit_sample` reuses compilations."""
  schedule = schedules.make_schedule(schedule_name, T)
  return schedule, gaussian_denoiser(schedule, prediction_type, MU + mu_shift)


# Compiled once per denoise_fn and static options, for x_T given as a shape
# (jit_sample) or as an array (jit_sample_from). guidance_scale, when passed,
# is traced, so it never takes the static "== 1" shortcut.
_STATIC = ("denoise_fn", "sampler", "num_steps", "prediction_type", "clip_x0")
jit_sample = jax.jit(samplers.sample,
                     static_argnames=_STATIC + ("x_T_shape_or_noise",))
jit_sample_from = jax.jit(samplers.sample, static_argnames=_STATIC)


def zeros_context(batch, value=0.0):
  return jnp.full((batch, 1, 1), value, jnp.float32)


def exact_moments(denoise_fn, schedule, **kwargs):
  """Output mean and std [D] of a deterministic sampler for x_T ~ N(0, I).

  With the Gaussian denoiser every step is affine per dimension, so running it
  on x_T = 0 and x_T = 1 gives the map x_T -> c + A x_T exactly, free of
  sampling error.
  """
  x_T = jnp.stack([jnp.zeros(len(MU)), jnp.ones(len(MU))])
  out = samplers.sample(denoise_fn, schedule, jax.random.key(0), x_T,
                        zeros_context(2), **kwargs)
  return np.asarray(out[0]), np.abs(np.asarray(out[1] - out[0]))


# --- Registry and timesteps -------------------------------------------------


def test_registry():
  assert samplers.sampler_names() == ["ddim", "ddpm", "dpmpp_2m"]
  assert isinstance(samplers.get_sampler("ddim"), samplers.DDIMSampler)
  with pytest.raises(ValueError, match=r"Unknown sampler 'euler'.*'ddim'"):
    samplers.get_sampler("euler")


@pytest.mark.parametrize("num_steps", [1, 2, 7, 20, 333, 999, 1000])
def test_timesteps_trailing(num_steps):
  ts = samplers.timesteps_for(num_steps, T)
  assert ts.dtype == np.int32 and ts.shape == (num_steps,)
  assert ts[0] == T - 1 and ts[-1] >= 0
  assert np.all(np.diff(ts) < 0)
  if num_steps == T:
    np.testing.assert_array_equal(ts, np.arange(T - 1, -1, -1))
  if T % num_steps == 0:
    stride = T // num_steps
    np.testing.assert_array_equal(ts, T - 1 - stride * np.arange(num_steps))


@pytest.mark.parametrize("num_steps", [0, -1, T + 1])
def test_bad_num_steps(num_steps):
  cosine, fn = toy()
  with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
    samplers.sample(fn, cosine, jax.random.key(0), (2, 8), zeros_context(2),
                    num_steps=num_steps)


def test_bad_arguments():
  cosine, fn = toy()
  args = (fn, cosine, jax.random.key(0), (2, 8), zeros_context(2))
  with pytest.raises(ValueError, match="Unknown sampler 'nope'"):
    samplers.sample(*args, sampler="nope")
  with pytest.raises(ValueError, match="num_steps must be a Python int"):
    samplers.sample(*args, num_steps=10.0)
  with pytest.raises(ValueError, match="prediction_type 'x0'"):
    samplers.sample(*args, prediction_type="x0")
  with pytest.raises(ValueError, match="needs an uncond_context"):
    samplers.sample(*args, guidance_scale=2.0)
  with pytest.raises(ValueError, match="clip_x0"):
    samplers.sample(*args, clip_x0=-1.0)
  with pytest.raises(ValueError, match="batch 3"):
    samplers.sample(fn, cosine, jax.random.key(0), (2, 8), zeros_context(3))


# --- Samplers reproduce the data distribution -------------------------------


@pytest.mark.parametrize("schedule_name", ["cosine", "linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,num_steps", [("ddpm", 1000), ("ddim", 100),
                                               ("dpmpp_2m", 50)])
def test_samples_match_data(schedule_name, prediction_type, sampler, num_steps):
  # DPM-Solver++ gets 50 steps: with 20, the linear schedule's last jump
  # (t = 49, sigma = 0.17, straight to the data) shrinks the std of the
  # sd = 0.5 dimension by ~4%. test_dpmsolver_20_steps_is_accurate covers 20.
  schedule, fn = toy(schedule_name, prediction_type)
  n = 8000
  with helpers.xla_optimised():  # up to 1000 steps over [8000, 2]: 5x faster
    x = samplers.sample(fn, schedule, jax.random.key(1), (n, len(MU)),
                        zeros_context(n), sampler=sampler,
                        num_steps=num_steps, prediction_type=prediction_type)
  z = (np.asarray(x) - MU) / SD
  # ~5 standard errors of 8000 samples (1/sqrt(n) = 0.011, sqrt(2/n) = 0.016).
  np.testing.assert_allclose(z.mean(0), 0.0, atol=0.05)
  np.testing.assert_allclose(z.var(0), 1.0, atol=0.08)


def test_dpmsolver_20_steps_is_accurate():
  """Second order: 20 steps already give the data's moments, DDIM's do not."""
  cosine, fn = toy()
  mean, std = exact_moments(fn, cosine, sampler="dpmpp_2m", num_steps=20)
  np.testing.assert_allclose(mean, MU, atol=1e-3)
  np.testing.assert_allclose(std / SD, 1.0, atol=0.02)
  _, ddim_std = exact_moments(fn, cosine, sampler="ddim", num_steps=20)
  dpm_err = np.abs(std / SD - 1).max()
  ddim_err = np.abs(ddim_std / SD - 1).max()
  assert ddim_err > 0.04 and dpm_err < 0.25 * ddim_err, (dpm_err, ddim_err)


def test_dpmsolver_many_steps_matches_ddim():
  cosine, fn = toy(prediction_type="v_prediction")
  x_T = jax.random.normal(jax.random.key(2), (512, len(MU)))
  kwargs = dict(prediction_type="v_prediction", num_steps=200)
  dpm = samplers.sample(fn, cosine, jax.random.key(3), x_T, zeros_context(512),
                        sampler="dpmpp_2m", **kwargs)
  ddim = samplers.sample(fn, cosine, jax.random.key(4), x_T, zeros_context(512),
                         sampler="ddim", eta=0.0, **kwargs)
  # Same ODE; what is left is DDIM's first-order error (~0.5% of the scale).
  diff = np.asarray(dpm - ddim) / SD
  assert np.sqrt(np.mean(diff**2)) < 0.01
  assert np.abs(diff).max() < 0.05


def test_num_steps_one_returns_x0_prediction():
  cosine, fn = toy()
  x_T = jax.random.normal(jax.random.key(0), (4, len(MU)))
  for sampler in samplers.sampler_names():
    x = samplers.sample(fn, cosine, jax.random.key(0), x_T, zeros_context(4),
                        sampler=sampler, num_steps=1)
    t = jnp.full((4,), T - 1, jnp.int32)
    x0, _ = cosine.to_x0_eps(fn(x_T, t, zeros_context(4)), x_T, t, "epsilon")
    np.testing.assert_allclose(x, x0, rtol=1e-6)


# --- DDIM(eta=1) is DDPM ----------------------------------------------------


@pytest.mark.parametrize("t", [0, 1, 500, T - 1])
def test_ddim_eta1_step_is_ddpm_posterior(t):
  betas = schedules.cosine_betas(T)
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = ab[t - 1] if t > 0 else 1.0
  # Ho et al. 2020, eqs. 6-7.
  x_t = np.array([-1.5, 0.0, 0.3, 2.0])
  x0 = np.array([0.5, -0.2, 0.9, 1.0])
  post_mean = (np.sqrt(ab_prev) * betas[t] / (1 - ab[t]) * x0
               + np.sqrt(alphas[t]) * (1 - ab_prev) / (1 - ab[t]) * x_t)
  post_std = np.sqrt((1 - ab_prev) / (1 - ab[t]) * betas[t])

  abf = toy()[0].alphas_cumprod
  ab_t, ab_s = abf[t], (abf[t - 1] if t > 0 else jnp.float32(1.0))
  n = 20000
  x_t_b = jnp.broadcast_to(jnp.asarray(x_t, jnp.float32), (n, 4))
  x0_b = jnp.broadcast_to(jnp.asarray(x0, jnp.float32), (n, 4))
  eps_b = (x_t_b - jnp.sqrt(ab_t) * x0_b) / jnp.sqrt(1 - ab_t)
  rng = jax.random.key(5)
  ddim, _ = samplers.get_sampler("ddim").step(
      x_t_b, x0_b, eps_b, ab_t, ab_s, (), rng, eta=1.0)
  ddpm, _ = samplers.get_sampler("ddpm").step(
      x_t_b, x0_b, eps_b, ab_t, ab_s, (), rng)
  np.testing.assert_allclose(ddim, ddpm, atol=2e-4)
  for x in (ddim, ddpm):
    x = np.asarray(x, np.float64)  # float32 sums over 20000 rows drift ~1e-4
    # ~5 standard errors of 20000 samples, plus float32 rounding of 1 - ab
    # (~1e-3 relative near t = 0).
    tol = 0.04 * post_std + 1e-3
    np.testing.assert_allclose(x.mean(0), post_mean, atol=tol)
    np.testing.assert_allclose(x.std(0), post_std, atol=tol)


def test_ddim_eta1_all_steps_equals_ddpm():
  schedule = schedules.make_schedule("linear", 100)
  fn = gaussian_denoiser(schedule, "epsilon")
  kwargs = dict(num_steps=100)
  ddim = samplers.sample(fn, schedule, jax.random.key(6), (64, 8),
                         zeros_context(64), sampler="ddim", eta=1.0, **kwargs)
  ddpm = samplers.sample(fn, schedule, jax.random.key(6), (64, 8),
                         zeros_context(64), sampler="ddpm", **kwargs)
  # float32 rounding differs (DDIM goes through eps, DDPM through x_t).
  np.testing.assert_allclose(ddim, ddpm, atol=5e-4)


# --- Randomness, guidance, clipping, jit ------------------------------------


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5),
                                         ("dpmpp_2m", 0.0)])
def test_determinism(sampler, eta):
  cosine, fn = toy()
  run = lambda seed: jit_sample(
      fn, cosine, jax.random.key(seed), (16, 8), zeros_context(16),
      sampler=sampler, num_steps=10, eta=eta)
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).min() > 0


def test_ddpm_noise_comes_from_rng():
  """Same x_T: DDPM still differs across rngs, DDIM(eta=0) does not."""
  cosine, fn = toy()
  x_T = jax.random.normal(jax.random.key(0), (16, 8))
  run = lambda sampler, seed: jit_sample_from(
      fn, cosine, jax.random.key(seed), x_T, zeros_context(16),
      sampler=sampler, num_steps=10)
  assert np.abs(np.asarray(run("ddpm", 1) - run("ddpm", 2))).min() > 0
  np.testing.assert_array_equal(run("ddim", 1), run("ddim", 2))


def test_guidance_one_skips_uncond_branch():
  batches = []
  cosine, exact = toy()
  def fn(x, t, context):
    batches.append(x.shape[0])  # at trace time
    return exact(x, t, context)
  common = (fn, cosine, jax.random.key(0), (4, 8), zeros_context(4, 1.0))
  kwargs = dict(sampler="ddim", num_steps=25)
  cond_only = samplers.sample(*common, **kwargs)
  assert batches and set(batches) == {4}
  # No Python loop over steps: a handful of traces, not one per step.
  assert len(batches) <= 3
  batches.clear()
  with_uncond = samplers.sample(*common, zeros_context(1), guidance_scale=1.0,
                                **kwargs)
  assert set(batches) == {4}
  np.testing.assert_array_equal(cond_only, with_uncond)
  batches.clear()
  same_context = samplers.sample(*common, zeros_context(1, 1.0),
                                 guidance_scale=4.0, **kwargs)
  assert set(batches) == {8}  # cond and uncond in one call
  np.testing.assert_allclose(same_context, cond_only, atol=1e-5)


def test_guidance_direction():
  cosine, fn = toy(prediction_type="v_prediction")
  x_T = jax.random.normal(jax.random.key(0), (256, 8))
  def mean_shift(scale):
    x = jit_sample_from(fn, cosine, jax.random.key(0), x_T,
                        zeros_context(256, 1.0), zeros_context(1, 0.0),
                        sampler="dpmpp_2m", num_steps=20,
                        guidance_scale=jnp.float32(scale),
                        prediction_type="v_prediction")
    return float(np.mean(np.asarray(x) - MU))
  # cond shifts the data mean by +1 relative to uncond.
  shifts = [mean_shift(s) for s in (0.0, 1.0, 2.0, 4.0)]
  assert abs(shifts[0]) < 0.1 and abs(shifts[1] - 1.0) < 0.1
  assert shifts[1] + 0.5 < shifts[2] < shifts[3] - 0.5, shifts


def test_jit_with_traced_guidance():
  cosine, fn = toy()
  args = (fn, cosine, jax.random.key(0), (8, 8), zeros_context(8, 1.0),
          zeros_context(1))
  kwargs = dict(sampler="ddim", num_steps=10, eta=0.3)
  eager = samplers.sample(*args, guidance_scale=3.0, **kwargs)
  traced = jit_sample(*args, guidance_scale=jnp.float32(3.0), **kwargs)
  np.testing.assert_allclose(traced, eager, atol=1e-5)


@pytest.mark.parametrize("sampler,clip,bound", [
    ("ddpm", True, 1.0), ("ddim", True, 1.0), ("dpmpp_2m", True, 1.0),
    ("ddim", 0.5, 0.5), ("ddim", False, None)])
def test_clip_x0(sampler, clip, bound):
  cosine, fn = toy(mu_shift=3.0)  # data far outside [-1, 1]
  x = np.asarray(jit_sample(fn, cosine, jax.random.key(0), (64, 8),
                            zeros_context(64), sampler=sampler, num_steps=20,
                            clip_x0=clip))
  if bound is None:
    assert x.mean() > 2.0
  else:
    assert np.abs(x).max() <= bound and x.mean() > 0.5 * bound


# --- Independent reference ----------------------------------------------------


# diffusers' own numpy-2 deprecation warning.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("sampler,num_steps", [("ddim", 20),
                                               ("dpmpp_2m", 7),
                                               ("dpmpp_2m", 20)])
def test_matches_diffusers(sampler, num_steps):
  """Same trajectory as diffusers' schedulers with trailing spacing."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cosine, fn = toy()
  ab = np.asarray(cosine.alphas_cumprod, np.float64)
  common = dict(num_train_timesteps=T, timestep_spacing="trailing",
                trained_betas=1 - ab / np.concatenate([[1.0], ab[:-1]]))
  if sampler == "ddim":
    scheduler = diffusers.DDIMScheduler(**common, set_alpha_to_one=True,
                                        clip_sample=False)
  else:
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++", solver_order=2,
        final_sigmas_type="zero")
  scheduler.set_timesteps(num_steps)
  x_T = jax.random.normal(jax.random.key(0), (16, 8))
  x = torch.tensor(np.asarray(x_T), dtype=torch.float64)
  for t in scheduler.timesteps:
    out = fn(jnp.asarray(x.numpy(), jnp.float32), jnp.full((16,), int(t)),
             zeros_context(16))
    x = scheduler.step(torch.tensor(np.asarray(out), dtype=torch.float64),
                       t, x).prev_sample
  ours = samplers.sample(fn, cosine, jax.random.key(0), x_T, zeros_context(16),
                         sampler=sampler, num_steps=num_steps)
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-4)


def test_guidance_interval_timesteps():
  assert samplers.guidance_timesteps_for(None, 1000) is None
  assert samplers.guidance_timesteps_for((0.0, 1.0), 1000) is None
  assert samplers.guidance_timesteps_for((0.2, 0.8), 1000) == (200, 799)
  for bad in ((0.8, 0.2), (-0.1, 0.5), (0.5, 1.5)):
    with pytest.raises(ValueError, match="guidance interval"):
      samplers.guidance_timesteps_for(bad, 1000)


def test_guidance_applies_only_inside_the_interval():
  def denoise(x, t, context):  # output = context value: cond 1, uncond 0
    del t
    return x + context.mean((1, 2))[:, None]
  x = jnp.zeros((2, 3))
  cond, uncond = jnp.ones((2, 1, 1)), jnp.zeros((1, 1, 1))
  fn = samplers.guided_denoise_fn(denoise, cond, uncond, 4.0, (200, 799))
  out = fn(x, jnp.asarray([500, 900]))
  # Inside: uncond + 4 (cond - uncond) = 4; outside: the conditional output, 1.
  np.testing.assert_allclose(out, [[4.0] * 3, [1.0] * 3])
  everywhere = samplers.guided_denoise_fn(denoise, cond, uncond, 4.0)
  np.testing.assert_allclose(everywhere(x, jnp.asarray([500, 900])), 4.0)


# --- diffusers' spacings and final step ----------------------------------


@pytest.mark.parametrize("num_timesteps", [1000, 97])
def test_timesteps_leading_and_linspace_match_diffusers(num_timesteps):
  """"leading" (with and without SD's steps_offset=1) and "linspace" are
  diffusers' DDIMScheduler.set_timesteps, for every step count (T = 97) or
  a spread of them (T = 1000)."""
  diffusers = pytest.importorskip("diffusers")
  counts = (range(1, num_timesteps + 1) if num_timesteps < 100 else
            list(range(1, 40)) + [97, 128, 250, 333, 499, 500, 999, 1000])
  for spacing, offset in (("leading", 0), ("leading", 1), ("linspace", 0)):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=num_timesteps,
                                        timestep_spacing=spacing,
                                        steps_offset=offset)
    for n in counts:
      if spacing == "leading" and (n - 1) * (num_timesteps // n) + offset >= (
          num_timesteps):
        continue  # diffusers would index past T - 1; jaxsd refuses it
      scheduler.set_timesteps(n)
      ts = samplers.timesteps_for(n, num_timesteps, spacing, offset)
      assert ts.dtype == np.int32
      np.testing.assert_array_equal(ts, scheduler.timesteps.numpy(),
                                    err_msg=f"{spacing} {offset} n={n}")
  # SD 1.x's 50 steps.
  np.testing.assert_array_equal(
      samplers.timesteps_for(50, 1000, "leading", 1)[[0, 1, -1]], [981, 961, 1])


def test_bad_spacing_and_offset():
  cosine, fn = toy()
  args = (fn, cosine, jax.random.key(0), (2, 8), zeros_context(2))
  with pytest.raises(ValueError, match=r"Unknown timestep spacing 'karras' "
                     r"\(sampling.timestep_spacing\)"):
    samplers.sample(*args, timestep_spacing="karras")
  with pytest.raises(ValueError, match=r"steps_offset=1 applies to "
                     r"timestep_spacing='leading' only"):
    samplers.sample(*args, steps_offset=1)
  with pytest.raises(ValueError, match=r"steps_offset=1 puts the leading "
                     r"timesteps outside \[0, 999\]"):
    samplers.timesteps_for(1000, T, "leading", 1)
  with pytest.raises(ValueError, match="steps_offset must be an int"):
    samplers.timesteps_for(10, T, "leading", 1.0)
  with pytest.raises(ValueError, match=r"Unknown final_alpha 'zero' "
                     r"\(sampling.final_alpha\)"):
    samplers.sample(*args, final_alpha="zero")


def test_final_alpha_first_one_step_is_a_step_to_ab0():
  """One step with final_alpha="first": x_T -> ab[0] from the prediction at
  T - 1, which for DDIM is sqrt(ab0) x0 + sqrt(1 - ab0) eps."""
  cosine, fn = toy()
  x_T = jax.random.normal(jax.random.key(0), (4, len(MU)))
  t = jnp.full((4,), T - 1, jnp.int32)
  x0, eps = cosine.to_x0_eps(fn(x_T, t, zeros_context(4)), x_T, t, "epsilon")
  ab0 = cosine.alphas_cumprod[0]
  x = samplers.sample(fn, cosine, jax.random.key(0), x_T, zeros_context(4),
                      sampler="ddim", num_steps=1, final_alpha="first")
  np.testing.assert_allclose(x, jnp.sqrt(ab0) * x0 + jnp.sqrt(1 - ab0) * eps,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_final_alpha_first_lands_at_ab0(sampler, spacing):
  """With a schedule whose ab[0] is far from 1, final_alpha="first" returns
  samples of the data noised to ab[0] (moments sqrt(ab0) mu and
  sqrt(ab0 sd^2 + 1 - ab0))."""
  ab = np.cumprod(np.r_[0.6, np.full(T - 1, 0.98)]).astype(np.float32)
  schedule = schedules.NoiseSchedule(alphas_cumprod=jnp.asarray(ab))
  fn = gaussian_denoiser(schedule, "epsilon")
  kwargs = dict(sampler=sampler, num_steps=200, timestep_spacing=spacing)
  mean, std = exact_moments(fn, schedule, final_alpha="first", **kwargs)
  np.testing.assert_allclose(mean, np.sqrt(ab[0]) * MU, atol=2e-3)
  np.testing.assert_allclose(std, np.sqrt(ab[0] * SD**2 + 1 - ab[0]),
                             rtol=0.02)
  # "one" jumps from there to the data in one step: E[x0 | x at ab0] =
  # mu + a sd^2 / var (x - a mu), whose spread is a sd^2 / sqrt(var).
  mean, std = exact_moments(fn, schedule, final_alpha="one", **kwargs)
  np.testing.assert_allclose(mean, MU, atol=2e-3)
  a, var = np.sqrt(ab[0]), ab[0] * SD**2 + 1 - ab[0]
  np.testing.assert_allclose(std, a * SD**2 / np.sqrt(var), rtol=0.02)
