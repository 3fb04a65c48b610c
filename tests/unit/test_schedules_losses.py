"""Noise schedules against closed forms; loss targets and min-SNR weighting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion import losses
from jaxsd.diffusion import schedules


def test_linear_closed_form():
  s = schedules.make_schedule("linear", 1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas),
                             rtol=1e-5)


def test_scaled_linear_closed_form():
  s = schedules.make_schedule("scaled_linear", 1000)
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000)**2
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas),
                             rtol=1e-5)


def test_cosine_closed_form():
  T = 1000
  s = schedules.make_schedule("cosine", T)
  f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2)**2
  expected = np.array([f(t + 1) / f(0) for t in range(T)])
  # Betas are clipped at 0.999 only at the very end.
  np.testing.assert_allclose(s.alphas_cumprod[:-5], expected[:-5], rtol=1e-4,
                             atol=1e-7)
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_unknown_schedule_names_choices():
  with pytest.raises(ValueError, match="cosine"):
    schedules.make_schedule("sigmoid")


def test_add_noise_velocity_and_inversion():
  s = schedules.make_schedule("cosine", 100)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (4, 8, 8, 1))
  eps = jax.random.normal(k2, (4, 8, 8, 1))
  t = jnp.array([0, 10, 50, 99])
  ab = s.alphas_cumprod[t][:, None, None, None]
  x_t = s.add_noise(x0, eps, t)
  np.testing.assert_allclose(x_t, jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps,
                             rtol=1e-6)
  np.testing.assert_allclose(s.snr(t), ab[:, 0, 0, 0] / (1 - ab[:, 0, 0, 0]),
                             rtol=1e-6)
  for kind, out in (("epsilon", eps), ("v_prediction", s.velocity(x0, eps, t))):
    x0_hat, eps_hat = s.to_x0_eps(out, x_t, t, kind)
    np.testing.assert_allclose(x0_hat[1:], x0[1:], atol=2e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def test_min_snr_weights():
  snr = jnp.array([0.1, 1.0, 5.0, 100.0])
  np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "epsilon"),
                             [1.0, 1.0, 1.0, 0.05], rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "v_prediction"),
                             [0.1 / 1.1, 0.5, 5 / 6, 5 / 101], rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, 0.0, "epsilon"), 1.0)


def test_denoising_loss_targets_and_weighting():
  s = schedules.make_schedule("linear", 100)
  x0 = jnp.ones((2, 4, 4, 1)) * 0.5
  eps = -jnp.ones((2, 4, 4, 1))
  t = jnp.array([5, 90])
  assert losses.denoising_loss(eps, x0, eps, t, s, "epsilon") == 0.0
  v = s.velocity(x0, eps, t)
  assert losses.denoising_loss(v, x0, eps, t, s, "v_prediction") < 1e-12
  # Zero output: per-example MSE of the target, weighted then averaged.
  plain = losses.denoising_loss(jnp.zeros_like(x0), x0, eps, t, s, "epsilon")
  np.testing.assert_allclose(plain, 1.0, rtol=1e-6)
  weighted = losses.denoising_loss(jnp.zeros_like(x0), x0, eps, t, s,
                                   "epsilon", min_snr_gamma=1.0)
  w = losses.min_snr_weight(s.snr(t), 1.0, "epsilon")
  np.testing.assert_allclose(weighted, jnp.mean(w), rtol=1e-6)
