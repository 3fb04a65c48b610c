"""The noise and loss options of diffusion.* against independent maths.

Offset noise and input perturbation against diffusers' train_text_to_image
(statistics and the x_t / target they build), pyramid noise against kohya's
`pyramid_noise_like` run in PyTorch on the same draws, l1 and Huber against
numpy formulas (kohya's `conditional_loss`), and the defaults against the
step as it was before the options existed.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from jaxsd.diffusion import checks as diffusion_checks
from jaxsd.diffusion import losses
from jaxsd.diffusion import noise as noise_lib
from jaxsd.diffusion import schedules
from jaxsd.diffusion import step as step_lib
from jaxsd.errors import ConfigError

T = 100


def _noise_inputs(batch, rng, **options):
  return jax.jit(functools.partial(
      step_lib.add_noise_inputs, num_timesteps=T, cfg_dropout=0.2,
      **options))(batch, rng)


def _old_noise_inputs(batch, rng):
  """add_noise_inputs as it was before the options (pixel batches)."""
  x0 = batch["image"]
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  return {**batch, "t": jax.random.randint(rng_t, (x0.shape[0],), 0, T),
          "noise": jax.random.normal(rng_noise, x0.shape, x0.dtype),
          "drop": jax.random.bernoulli(rng_drop, 0.2, (x0.shape[0],))}


def _images(b=4, h=8, w=8, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (b, h, w, c)).astype(np.float32)}


# --- The defaults ---------------------------------------------------------------


def test_default_noise_inputs_are_the_old_draws_exactly():
  batch, rng = _images(), jax.random.key(3)
  old = _old_noise_inputs(batch, rng)
  for options in ({}, dict(noise_offset=0.0, multires_noise_iterations=0,
                           input_perturbation=0.0)):
    new = _noise_inputs(batch, rng, **options)
    assert set(new) == set(old)
    for key in ("t", "noise", "drop"):
      np.testing.assert_array_equal(np.asarray(new[key]),
                                    np.asarray(old[key]))


def test_default_loss_is_the_mean_squared_error():
  rng = np.random.default_rng(0)
  out, x0, noise = (rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
                    for _ in range(3))
  t = np.array([1, 20, 50, 99], np.int32)
  schedule = schedules.make_schedule("linear", T)
  got = losses.denoising_loss(out, x0, noise, t, schedule, "epsilon")
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(jnp.mean(jnp.mean(
          jnp.square(out - noise), axis=(1, 2, 3)))))
  np.testing.assert_allclose(float(got), np.mean((out - noise) ** 2),
                             rtol=1e-6)


# --- Offset noise -----------------------------------------------------------------


def test_offset_noise_adds_one_constant_per_sample_and_channel():
  offset = 0.5
  batch, rng = _images(b=512, h=8, w=8, c=4), jax.random.key(1)
  base = np.asarray(_noise_inputs(batch, rng)["noise"])
  shifted_inputs = _noise_inputs(batch, rng, noise_offset=offset)
  shifted = np.asarray(shifted_inputs["noise"])
  shift = shifted - base
  # constant over H and W: [B, 1, 1, C] broadcast, as diffusers'
  # randn((B, C, 1, 1)) in NCHW
  np.testing.assert_allclose(shift, np.broadcast_to(
      shift[:, :1, :1, :], shift.shape), atol=1e-6)
  per_sample_channel = shift[:, 0, 0, :]
  # offset * N(0, 1) over 2048 (sample, channel) pairs
  assert abs(per_sample_channel.mean()) < 0.05
  assert per_sample_channel.std() == pytest.approx(offset, rel=0.05)
  # the spatial mean of each channel now has variance offset^2 + 1/(H W)
  assert shifted.mean(axis=(1, 2)).var() == pytest.approx(
      offset**2 + 1 / 64, rel=0.1)
  # the timesteps and prompt dropout are drawn as without the option
  default = _noise_inputs(batch, rng)
  for key in ("t", "drop"):
    np.testing.assert_array_equal(np.asarray(shifted_inputs[key]),
                                  np.asarray(default[key]))


# --- Input perturbation -------------------------------------------------------------


def test_input_perturbation_perturbs_the_input_not_the_target():
  gamma = 0.3
  batch, rng = _images(b=64, h=8, w=8, c=4), jax.random.key(2)
  plain = _noise_inputs(batch, rng)
  perturbed = _noise_inputs(batch, rng, input_perturbation=gamma)
  # The same draw (another would differ by O(1)); to round-off, not bits:
  # the two programs fuse the normal draw differently, and XLA:CPU's
  # emitters the tests use (tests/conftest.py) round it 1 ulp apart.
  np.testing.assert_allclose(np.asarray(perturbed["noise"]),
                             np.asarray(plain["noise"]), atol=1e-6, rtol=0)
  extra = np.asarray(perturbed["input_noise"]) - np.asarray(plain["noise"])
  assert extra.std() == pytest.approx(gamma, rel=0.05)
  assert abs(np.corrcoef(extra.ravel(),
                         np.asarray(plain["noise"]).ravel())[0, 1]) < 0.05


def test_loss_builds_x_t_from_the_perturbed_noise_and_targets_the_noise():
  """diffusers: noisy_latents = add_noise(latents, new_noise, t), target =
  noise. A denoiser that returns x_t makes the loss a closed form."""
  schedule = schedules.make_schedule("linear", T)
  rng = np.random.default_rng(0)
  x0, noise, input_noise = (rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
                            for _ in range(3))
  t = np.array([5, 40, 90], np.int32)
  batch = {"image": x0, "noise": noise, "input_noise": input_noise, "t": t,
           "drop": np.zeros(3, bool),
           "input_ids": np.zeros((3, 2), np.int32)}
  loss = functools.partial(
      step_lib.loss_fn, unet_apply=lambda p, x, t, c: x,
      text_apply=lambda p, ids: jnp.zeros(ids.shape + (2,)),
      schedule=schedule, uncond_ids=jnp.zeros((1, 2), jnp.int32),
      prediction_type="epsilon", min_snr_gamma=0.0, text_trainable=False)
  ab = np.asarray(schedule.alphas_cumprod)[t][:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * input_noise
  got = loss({"unet": {}, "text": {}}, batch)
  np.testing.assert_allclose(float(got), np.mean((x_t - noise) ** 2),
                             rtol=1e-5)
  del batch["input_noise"]  # without it, x_t comes from the noise
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  np.testing.assert_allclose(float(loss({"unet": {}, "text": {}}, batch)),
                             np.mean((x_t - noise) ** 2), rtol=1e-5)


# --- Pyramid noise --------------------------------------------------------------------


def _kohya_pyramid_noise_like(noise, ratios, levels, discount):
  """kohya's library/custom_train_functions.py pyramid_noise_like, NCHW in
  PyTorch, with random.random() * 2 + 2 and torch.randn replaced by the
  given draws (ratios, and level i's first wn x hn of levels[i] NHWC)."""
  import torch  # pylint: disable=g-import-not-at-top
  noise = torch.from_numpy(np.transpose(noise, (0, 3, 1, 2)).copy())
  b, c, w, h = noise.shape
  u = torch.nn.Upsample(size=(w, h), mode="bilinear")
  for i in range(len(levels)):
    r = float(ratios[i])
    wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
    draw = np.transpose(levels[i][:, :wn, :hn, :], (0, 3, 1, 2)).copy()
    noise += u(torch.from_numpy(draw)) * discount**i
    if wn == 1 or hn == 1:
      break
  noise = noise / noise.std()
  return np.transpose(noise.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("shape,iterations,discount,seed", [
    ((2, 16, 16, 4), 6, 0.3, 0),
    ((3, 32, 24, 3), 8, 0.4, 1),   # not square; reaches a side of 1
    ((2, 8, 40, 1), 4, 0.8, 2),
    ((1, 64, 64, 4), 3, 0.3, 3),
])
def test_pyramid_noise_is_kohyas_on_the_same_draws(shape, iterations,
                                                   discount, seed):
  pytest.importorskip("torch")
  rng_noise, rng_pyramid = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(rng_noise, shape)
  ratios, levels = noise_lib.pyramid_draws(rng_pyramid, shape, iterations)
  got = jax.jit(noise_lib.pyramid_noise, static_argnums=(2, 3))(
      rng_pyramid, noise, iterations, discount)
  want = _kohya_pyramid_noise_like(
      np.asarray(noise), np.asarray(ratios, np.float64),
      [np.asarray(level) for level in levels], discount)
  assert got.shape == shape
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_pyramid_noise_has_unit_std_and_coarse_correlation():
  shape = (16, 32, 32, 4)
  rng_noise, rng_pyramid = jax.random.split(jax.random.key(0))
  noise = jax.random.normal(rng_noise, shape)
  got = np.asarray(noise_lib.pyramid_noise(rng_pyramid, noise, 6, 0.8))
  assert got.std(ddof=1) == pytest.approx(1.0, abs=1e-5)
  # the coarse levels correlate neighbouring pixels; white noise does not
  def neighbour_corr(x):
    return np.corrcoef(x[:, :, :-1].ravel(), x[:, :, 1:].ravel())[0, 1]
  assert abs(neighbour_corr(np.asarray(noise))) < 0.02
  assert neighbour_corr(got) > 0.1


def test_bilinear_upsampling_matches_the_closed_form():
  """2 -> 4 with half-pixel centres: out = [a, .75a + .25b, .25a + .75b, b]
  (the edges clamp); 1 -> n is constant."""
  m = np.asarray(noise_lib._bilinear_matrix(4, jnp.int32(2), 3))
  np.testing.assert_allclose(m, [[1, 0, 0], [.75, .25, 0], [.25, .75, 0],
                                 [0, 1, 0]], atol=1e-6)
  m = np.asarray(noise_lib._bilinear_matrix(5, jnp.int32(1), 4))
  np.testing.assert_allclose(m, np.eye(4)[[0] * 5], atol=1e-6)


# --- The loss types ---------------------------------------------------------------------


def _loss_case(seed=0):
  rng = np.random.default_rng(seed)
  out, x0, noise = (rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
                    for _ in range(3))
  out[0] *= 20  # some errors far beyond c
  t = np.array([0, 10, 30, 60, 99], np.int32)
  return out, x0, noise, t, schedules.make_schedule("scaled_linear", T)


def test_l1_loss():
  out, x0, noise, t, schedule = _loss_case()
  got = losses.denoising_loss(out, x0, noise, t, schedule, "epsilon",
                              loss_type="l1")
  np.testing.assert_allclose(float(got), np.mean(np.abs(out - noise)),
                             rtol=1e-6)


@pytest.mark.parametrize("huber_schedule", ["constant", "snr"])
@pytest.mark.parametrize("min_snr_gamma", [0.0, 5.0])
def test_huber_loss_is_kohyas(huber_schedule, min_snr_gamma):
  """kohya's conditional_loss: 2c (sqrt((pred - target)^2 + c^2) - c), mean
  per example, weighted, mean; c per get_huber_threshold_if_needed."""
  out, x0, noise, t, schedule = _loss_case()
  c0 = 0.1
  ab = np.asarray(schedule.alphas_cumprod, np.float64)[t]
  if huber_schedule == "snr":
    sigmas = ((1.0 - ab) / ab) ** 0.5
    c = (1 - c0) / (1 + sigmas) ** 2 + c0
  else:
    c = np.full(len(t), c0)
  c = c[:, None, None, None]
  per_example = np.mean(2 * c * (np.sqrt((out - noise) ** 2 + c**2) - c),
                        axis=(1, 2, 3))
  snr = ab / (1 - ab)
  weight = (np.minimum(snr, min_snr_gamma) / snr if min_snr_gamma
            else np.ones_like(snr))
  got = losses.denoising_loss(out, x0, noise, t, schedule, "epsilon",
                              min_snr_gamma, loss_type="huber", huber_c=c0,
                              huber_schedule=huber_schedule)
  np.testing.assert_allclose(float(got), np.mean(weight * per_example),
                             rtol=1e-5)


def test_huber_is_l2_near_zero_and_linear_far_out():
  c = jnp.full((1,), 0.5)
  small = jnp.full((1, 3), 1e-2)
  np.testing.assert_allclose(losses.elementwise_loss(small, "huber", c),
                             small**2, rtol=1e-3)
  big = jnp.full((1, 3), 1e3)
  np.testing.assert_allclose(losses.elementwise_loss(big, "huber", c),
                             2 * 0.5 * (1e3 - 0.5), rtol=1e-5)


def test_per_example_loss_averages_to_the_loss():
  out, x0, noise, t, schedule = _loss_case()
  for loss_type in losses.LOSS_TYPES:
    each = losses.denoising_loss(out, x0, noise, t, schedule, "v_prediction",
                                 5.0, loss_type=loss_type, per_example=True)
    assert each.shape == (5,)
    np.testing.assert_allclose(
        float(jnp.mean(each)),
        float(losses.denoising_loss(out, x0, noise, t, schedule,
                                    "v_prediction", 5.0,
                                    loss_type=loss_type)), rtol=1e-6)


# --- The step and the config --------------------------------------------------------------


def test_a_step_with_every_option_trains():
  """make_step_fn reads the options: a step with all of them on gives
  another (finite) loss than the default step on the same batch."""
  from jaxsd.training import state as ts  # pylint: disable=g-import-not-at-top
  def config(**diffusion):
    return ml_collections.ConfigDict({
        "diffusion": {"prediction_type": "epsilon", "min_snr_gamma": 0.0,
                      "cfg_dropout": 0.0, "timestep_sampling": "uniform",
                      "logit_mean": 0.0, "logit_std": 1.0, **diffusion},
        "text": {"trainable": False},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 1,
                  "end_learning_rate_factor": 0.0, "b1": 0.9, "b2": 0.999,
                  "eps": 1e-8, "weight_decay": 0.0, "grad_clip_norm": 0.0,
                  "ema_decay": 0.0, "grad_accum_steps": 1}})
  def step_loss(cfg):
    params = {"unet": {"w": jnp.full((3,), 0.5)}, "text": {}}
    tx = ts.make_optimizer(cfg.optim, 10, False)
    fn = step_lib.make_step_fn(
        unet_apply=lambda p, x, t, c: x * p["w"],
        text_apply=lambda p, ids: jnp.zeros(ids.shape + (2,)),
        schedule=schedules.make_schedule("linear", T),
        uncond_ids=np.zeros((1, 2), np.int32), config=cfg, tx=tx)
    batch = {**_images(b=4, h=16, w=16, c=3),
             "input_ids": np.ones((4, 2), np.int32)}
    _, metrics = jax.jit(fn)(ts.create(params, tx), batch, jax.random.key(0))
    return float(metrics["loss"])
  default = step_loss(config())
  assert default == step_loss(config(loss_type="l2", noise_offset=0.0))
  options = step_loss(config(
      noise_offset=0.1, multires_noise_iterations=4,
      multires_noise_discount=0.3, input_perturbation=0.1,
      loss_type="huber", huber_c=0.1, huber_schedule="snr"))
  assert np.isfinite(options) and options != default


def test_default_config_has_the_options_off_and_passes():
  config = default_config.get_config()
  d = config.diffusion
  assert (d.noise_offset, d.multires_noise_iterations, d.input_perturbation,
          d.loss_type) == (0.0, 0, 0.0, "l2")
  diffusion_checks.check_diffusion(config)


@pytest.mark.parametrize("key,value,fragment", [
    ("noise_offset", -0.1, ">= 0"),
    ("input_perturbation", float("nan"), ">= 0"),
    ("multires_noise_iterations", -1, ">= 0 (an integer)"),
    ("multires_noise_discount", 0.0, "in (0, 1]"),
    ("loss_type", "l3", "one of ['l2', 'l1', 'huber']"),
    ("huber_schedule", "exponential", "one of ['snr', 'constant']"),
    ("huber_c", 0.0, "in (0, 1]"),
    ("huber_c", 2.0, "in (0, 1]"),
])
def test_bad_options_are_refused_naming_the_key(key, value, fragment):
  config = default_config.get_config()
  config.diffusion[key] = value
  with pytest.raises(ConfigError) as e:
    diffusion_checks.check_diffusion(config)
  assert f"diffusion.{key}={value!r}" in str(e.value)
  assert fragment in str(e.value)


def test_a_constant_huber_c_may_exceed_one():
  config = default_config.get_config()
  config.diffusion.update(loss_type="huber", huber_schedule="constant",
                          huber_c=2.0)
  diffusion_checks.check_diffusion(config)


def test_a_config_saved_before_the_options_passes():
  config = default_config.get_config()
  with config.unlocked():
    for key in (*step_lib.NOISE_OPTIONS, *step_lib.LOSS_OPTIONS):
      del config.diffusion[key]
  diffusion_checks.check_diffusion(config)
