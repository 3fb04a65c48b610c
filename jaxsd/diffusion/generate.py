"""Prompts in, images out: text encoding, guided sampling, sharding, chunks.

Used by training's periodic sample grid, `jaxsd-sample` and evaluation.
"""
import datetime
import functools
import time
from typing import Callable, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxsd import parallel
from jaxsd.models import checks as model_checks
from jaxsd.text import encoder as text_lib
from jaxsd.diffusion.setup import Components
from jaxsd.diffusion import samplers


class ProgressLog:
  """A Generator's `progress` callback: logs (process 0) images done of the
  total, the rate and the ETA at most every `every_s` seconds, and the last
  chunk when an earlier line was logged (a long generation is never
  silent; a short one adds nothing)."""

  def __init__(self, what: str, every_s: float = 10.0,
               clock: Callable[[], float] = time.perf_counter):
    self.what, self.every_s, self._clock = what, every_s, clock
    self._start = self._last = clock()
    self._logged = False

  def __call__(self, done: int, total: int):
    now = self._clock()
    finished = done >= total
    if jax.process_index() != 0 or not (
        now - self._last >= self.every_s or (finished and self._logged)):
      return
    self._last, self._logged = now, True
    elapsed = max(now - self._start, 1e-9)
    rate = done / elapsed
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_s = (str(datetime.timedelta(seconds=int(eta))) if eta < float("inf")
             else "?")
    logging.info("%s: %d/%d images (%.0f%%), %.2f images/s, %s", self.what,
                 done, total, 100.0 * done / max(total, 1), rate,
                 f"done in {elapsed:.0f} s" if finished else f"ETA {eta_s}")


class Generator:
  """Jitted text-to-image sampling over all devices, in fixed-size chunks.

  Each chunk is one compiled call of `chunk_size` images (a multiple of the
  device count); the last chunk is padded, so any number of images works and
  memory stays bounded by the chunk. Images are height x width pixels (None
  or 0: data.image_size), multiples of `components.size_multiple`: the UNet
  is shape-agnostic there, so one set of weights samples any such size.
  """

  def __init__(self, components: Components, mesh, *, sampler: str,
               num_steps: int, guidance_scale: float, eta: float = 0.0,
               chunk_size: int = 64, clip_x0: bool = True,
               guidance_interval: Optional[Tuple[float, float]] = None,
               timestep_spacing: str = "trailing", steps_offset: int = 0,
               final_alpha: str = "one", height: Optional[int] = None,
               width: Optional[int] = None):
    samplers.get_sampler(sampler)  # fails early on an unknown name
    # Callers check their own keys first (sampling.height, --height); this
    # is the last guard before a shape the UNet cannot halve is compiled.
    self.height, self.width = (
        model_checks.check_sample_side(components.config, key, value or 0,
                                       components.autoencoder_factor,
                                       default_ok=True)
        for key, value in (("height", height), ("width", width)))
    self.image_shape = components.image_shape_at(self.height, self.width)
    self.pixel_shape = components.pixel_shape_at(self.height, self.width)
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    self._n_dev = jax.device_count()
    self.chunk_size = max(self._n_dev, (chunk_size // self._n_dev) * self._n_dev)
    self.components = components
    self.mesh = mesh
    self._sharding = parallel.batch_sharding(mesh)
    self._replicated = parallel.replicated(mesh)
    if guidance_interval is not None:  # may come as strings (flags) or a list
      guidance_interval = tuple(float(v) for v in guidance_interval)
      samplers.guidance_timesteps_for(  # fails early on a bad interval
          guidance_interval, components.schedule.num_timesteps)
    spacing = dict(timestep_spacing=timestep_spacing,
                   steps_offset=steps_offset, final_alpha=final_alpha)
    samplers.timesteps_for(num_steps, components.schedule.num_timesteps,
                           timestep_spacing, steps_offset)  # fails early
    self._settings = dict(sampler=sampler, num_steps=num_steps,
                          guidance_scale=guidance_scale, eta=eta,
                          clip_x0=clip_x0, guidance_interval=guidance_interval,
                          height=self.height, width=self.width, **spacing)
    fn = functools.partial(self._generate, sampler=sampler,
                           num_steps=num_steps,
                           guidance_scale=float(guidance_scale), eta=eta,
                           clip_x0=clip_x0,
                           guidance_interval=guidance_interval, **spacing)
    self._jitted = jax.jit(
        fn, in_shardings=(self._replicated, self._sharding, self._replicated,
                          self._replicated, self._sharding),
        out_shardings=self._sharding)
    # Latent runs: the frozen autoencoder's parameters, an argument of the
    # jitted call (placed once), which decodes the sampled latents.
    self._autoencoder_params = (
        None if components.autoencoder is None else
        jax.device_put(components.autoencoder_params, self._replicated))

  def _generate(self, params, input_ids, rng, autoencoder_params, noise, *,
                sampler, num_steps, guidance_scale, eta, clip_x0,
                guidance_interval, timestep_spacing, steps_offset,
                final_alpha):
    c = self.components
    cond = c.encode(params, input_ids)
    uncond = c.encode(params, jnp.asarray(c.uncond_ids))
    start = ((input_ids.shape[0],) + self.image_shape if noise is None
             else noise)
    x = samplers.sample(
        c.denoise_fn(params), c.schedule, rng, start, cond, uncond,
        timestep_spacing=timestep_spacing, steps_offset=steps_offset,
        final_alpha=final_alpha,
        sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
        prediction_type=c.config.diffusion.prediction_type, eta=eta,
        # Clipping the x0 estimate keeps an epsilon model's near-pure-noise
        # steps (ab ~ 1e-9 under cosine) bounded.
        clip_x0=samplers.run_clip_bound(clip_x0, c.autoencoder is not None),
        guidance_interval=guidance_interval)
    return c.decode(autoencoder_params, x)

  @classmethod
  def from_config(cls, components: Components, mesh, sampling_config, *,
                  chunk_size: Optional[int] = None, **overrides
                  ) -> "Generator":
    """A Generator with a config's `sampling` settings; overrides that are
    not None (sampler, num_steps, guidance_scale, eta, height, width, ...)
    replace them."""
    s = sampling_config
    settings = dict(sampler=s.sampler, num_steps=s.num_steps,
                    guidance_scale=s.guidance_scale, eta=s.eta,
                    clip_x0=s.get("clip_x0", True),
                    guidance_interval=s.get("guidance_interval", None),
                    chunk_size=chunk_size or s.chunk_size,
                    timestep_spacing=s.get("timestep_spacing", "trailing"),
                    steps_offset=s.get("steps_offset", 0),
                    final_alpha=s.get("final_alpha", "one"),
                    height=s.get("height", 0), width=s.get("width", 0))
    unknown = set(overrides) - set(settings)
    if unknown:
      raise TypeError(f"unknown sampling settings {sorted(unknown)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return cls(components, mesh, **settings)

  def with_chunk_size(self, chunk_size: int) -> "Generator":
    """The same sampler settings with another chunk size (e.g. evaluation's)."""
    return Generator(self.components, self.mesh, chunk_size=chunk_size,
                     **self._settings)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return text_lib.tokenize(self.components.tokenizer, prompts,
                             self.components.config.text.max_length,
                             warn_truncation=True)

  def __call__(self, params, prompts: Sequence[str], rng,
               input_ids: Optional[np.ndarray] = None,
               noise: Optional[np.ndarray] = None,
               progress: Optional[Callable[[int, int], None]] = None
               ) -> np.ndarray:
    """Images float32 [len(prompts), height, width, C] in [-1, 1] (host
    numpy).

    Chunk i uses the key fold_in(rng, i): the same prompts, rng and chunk
    size give the same images. noise [len(prompts), *self.image_shape]: the
    initial x_T instead of a draw (e.g. the latents another implementation
    starts from). progress(images done, total) is called after each chunk
    (`ProgressLog` logs it).
    """
    ids = self.tokenize(prompts) if input_ids is None else input_ids
    n = len(ids)
    # Fewer images than a chunk: a smaller call (rounded up to the devices).
    size = min(self.chunk_size, -(-n // self._n_dev) * self._n_dev)
    out = []
    for i, lo in enumerate(range(0, n, size)):
      chunk = ids[lo:lo + size]
      pad = size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      chunk = parallel.shard_replicated_host_array(chunk, self._sharding)
      start = None
      if noise is not None:
        start = np.asarray(noise[lo:lo + size], np.float32)
        if pad:
          start = np.concatenate([start, np.repeat(start[-1:], pad, 0)])
        start = parallel.shard_replicated_host_array(start, self._sharding)
      images = self._jitted(params, chunk, jax.random.fold_in(rng, i),
                            self._autoencoder_params, start)
      out.append(np.asarray(multihost_utils.process_allgather(
          images, tiled=True))[:size - pad])
      if progress is not None:
        progress(min(lo + size, n), n)
    return np.concatenate(out, 0) if out else np.zeros((0,) + tuple(
        self.pixel_shape), np.float32)
