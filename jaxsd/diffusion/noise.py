"""The training noise's options: offset noise, pyramid noise and input
perturbation (each off by default). Pure jitted maths; NHWC throughout.

- Offset noise (diffusers' train_text_to_image `--noise_offset`; Guttenberg,
  crosslabs.org/blog/diffusion-with-offset-noise): a constant per sample and
  channel, N(0, 1) * offset, added to the noise, so the model learns to
  change an image's mean brightness.
- Pyramid (multi-resolution) noise (kohya's sd-scripts
  `--multires_noise_iterations` / `--multires_noise_discount`,
  library/custom_train_functions.py `pyramid_noise_like`): noise at
  ever-coarser random resolutions, bilinearly upsampled, discounted and
  added, then rescaled to unit standard deviation.
- Input perturbation (diffusers' `--input_perturbation`; Ning et al. 2023,
  arxiv.org/abs/2301.11706): the noisy input x_t is built from
  noise + gamma * N(0, 1), while the target stays the unperturbed noise.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

# kohya draws each level's ratio as random.random() * 2 + 2: in [2, 4).
PYRAMID_RATIO_RANGE = (2.0, 4.0)


def offset_noise(rng, shape: Tuple[int, ...], offset: float, dtype=jnp.float32):
  """offset * N(0, 1) of shape [B, 1, 1, C]: one constant per sample and
  channel, broadcast over H and W when added to noise [B, H, W, C]."""
  b, c = shape[0], shape[-1]
  return offset * jax.random.normal(rng, (b,) + (1,) * (len(shape) - 2) + (c,),
                                    dtype)


def pyramid_level_shapes(shape: Tuple[int, int, int, int], iterations: int
                         ) -> Sequence[Tuple[int, int, int, int]]:
  """The largest [B, h_i, w_i, C] each level's noise can have.

  Level i has h_i = max(1, int(H / r**i)) for a ratio r in [2, 4), so at
  most max(1, H // 2**i) (level 0: H itself, as r**0 = 1). A jitted step
  has static shapes, so every level draws at its largest size and uses the
  top-left h_i x w_i of it (independent N(0, 1) draws either way).
  """
  b, h, w, c = shape
  return [(b, h, w, c) if i == 0 else
          (b, max(1, h // 2**i), max(1, w // 2**i), c)
          for i in range(iterations)]


def pyramid_draws(rng, shape: Tuple[int, int, int, int], iterations: int,
                  dtype=jnp.float32):
  """(ratios float32 [iterations] in [2, 4), level noises N(0, 1) in the
  shapes `pyramid_level_shapes` gives): the randomness of pyramid noise."""
  rng_ratios, rng_levels = jax.random.split(rng)
  low, high = PYRAMID_RATIO_RANGE
  ratios = jax.random.uniform(rng_ratios, (iterations,), jnp.float32, low,
                              high)
  levels = [jax.random.normal(jax.random.fold_in(rng_levels, i), s, dtype)
            for i, s in enumerate(pyramid_level_shapes(shape, iterations))]
  return ratios, levels


def _bilinear_matrix(out_size: int, in_size, buffer_size: int):
  """[out_size, buffer_size] weights of a bilinear upsampling from the first
  `in_size` (traced int) entries of an axis to out_size entries: PyTorch's
  `Upsample(mode="bilinear")` (align_corners=False: half-pixel centres,
  source positions clamped at 0, the last index repeated at the far end)."""
  scale = in_size.astype(jnp.float32) / out_size
  src = jnp.maximum(
      (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  frac = src - i0.astype(jnp.float32)
  return ((1.0 - frac)[:, None] * jax.nn.one_hot(i0, buffer_size)
          + frac[:, None] * jax.nn.one_hot(i1, buffer_size))


def pyramid_from_draws(noise, ratios, levels, discount: float):
  """kohya's pyramid_noise_like(noise, iterations, discount) on given draws.

  noise [B, H, W, C]; ratios [iterations]; levels as `pyramid_draws` makes
  them. Level i adds upsample(N(0, 1) at (max(1, int(H / r_i**i)),
  max(1, int(W / r_i**i)))) * discount**i; the loop stops after the first
  level with a side of 1. The sum is divided by its standard deviation over
  the whole (global) batch, unbiased as torch's `Tensor.std()`.
  """
  _, h, w, _ = noise.shape
  total = noise + levels[0]  # r**0 = 1: level 0 is full size, not resized
  active = jnp.asarray(h > 1 and w > 1)
  for i in range(1, len(levels)):
    scale = ratios[i] ** i
    hn = jnp.maximum(1, jnp.floor(h / scale).astype(jnp.int32))
    wn = jnp.maximum(1, jnp.floor(w / scale).astype(jnp.int32))
    level = levels[i]
    rows = _bilinear_matrix(h, hn, level.shape[1])
    cols = _bilinear_matrix(w, wn, level.shape[2])
    up = jnp.einsum("hy,wx,byxc->bhwc", rows, cols, level.astype(jnp.float32))
    total = total + jnp.where(active, discount**i, 0.0) * up.astype(
        total.dtype)
    active = active & (hn > 1) & (wn > 1)
  return total / jnp.std(total, ddof=1)


def pyramid_noise(rng, noise, iterations: int, discount: float):
  """Pyramid noise of `iterations` levels built on noise [B, H, W, C]."""
  ratios, levels = pyramid_draws(rng, noise.shape, iterations, noise.dtype)
  return pyramid_from_draws(noise, ratios, levels, discount)


def perturbed(rng, noise, gamma: float):
  """noise + gamma * N(0, 1): what builds x_t under input perturbation."""
  return noise + gamma * jax.random.normal(rng, noise.shape, noise.dtype)
