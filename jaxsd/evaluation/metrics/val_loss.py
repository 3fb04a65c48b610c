"""val_loss: the training loss on held-out examples, at fixed timesteps with
fixed noise (as the SD3 paper and MLPerf's Stable Diffusion benchmark track
progress).

The first eval.val_loss_examples examples of the held-out split
(eval.reference_split), with their captions (no prompt dropout), are
noised at eval.val_loss_timesteps timesteps, the centres of equal bins
across the schedule (5 of 1000: t = 100, 300, 500, 700, 900), with noise
drawn once from a fixed key, independent of training.seed. Every example is
scored at every bin with the training loss itself (`step.make_loss_fn`:
prediction type, loss type, min-SNR weighting), on standard Gaussian noise
(no offset, pyramid noise or input perturbation: those shape training, not
the measure). A latent run encodes the images with its frozen autoencoder
and draws the posterior with the fixed key too.

Logs val_loss (the mean over bins) and val_loss/t_<t> per bin. The same
parameters give the same numbers at every evaluation and in every run on
the same data; no pretrained network is needed.
"""
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd import parallel
from jaxsd.diffusion import setup as build
from jaxsd.diffusion import step as step_lib
from jaxsd.errors import ConfigError
from jaxsd.evaluation.metrics import registry
from jaxsd.text import encoder as text_lib

# The fixed noise's key: the same in every run, whatever its seed.
VAL_LOSS_SEED = 0x56414C
_NOISE_STREAM, _POSTERIOR_STREAM = 0, 1
DEFAULT_EXAMPLES = 64
DEFAULT_TIMESTEPS = 5


def bin_timesteps(num_timesteps: int, bins: int) -> np.ndarray:
  """int32 [bins]: the centres of `bins` equal bins of [0, num_timesteps)."""
  return np.floor((np.arange(bins) + 0.5) * num_timesteps / bins
                  ).astype(np.int32)


def bin_name(t: int, num_timesteps: int) -> str:
  """"val_loss/t_0100" style names, zero-padded to sort in order."""
  return f"val_loss/t_{t:0{len(str(num_timesteps - 1))}d}"


@registry.register_metric("val_loss")
class ValidationLoss(registry.Metric):
  needs_samples = False

  def __init__(self):
    self._examples = None  # (images [n, S, S, C], captions)
    self._inputs_of = None  # the (components, mesh) `_inputs` were made for
    self._inputs = None
    self._losses_fn = None

  def prepare(self, ctx):
    """Reads the held-out examples (host arrays)."""
    if self._examples is not None:
      return
    ev = ctx.eval_config
    count = ev.get("val_loss_examples", DEFAULT_EXAMPLES)
    split = ev.reference_split or ctx.config.data.split
    try:
      images, captions = ctx.held_out_examples(count)
    except (ValueError, KeyError, OSError) as e:
      raise ConfigError(
          f"eval.metrics has val_loss, which scores held-out examples, but "
          f"the split eval.reference_split={split!r} of data.source="
          f"{ctx.config.data.source!r} cannot be read ({e}); set "
          "eval.reference_split to a held-out split, or remove val_loss "
          "from eval.metrics.") from e
    self._examples = images, list(captions)

  def _fixed_inputs(self, model, ctx):
    """The batch every evaluation scores, host numpy: image (in the
    diffusion space), noise, input_ids; built once per components."""
    if (self._inputs_of is not None and self._inputs_of[0] is model.components
        and self._inputs_of[1] is model.mesh):
      return self._inputs
    self.prepare(ctx)
    comps, config = model.components, ctx.config
    images, captions = self._examples
    key = jax.random.key(VAL_LOSS_SEED)
    x0 = images
    if comps.autoencoder is not None:
      encode = jax.jit(build.encode_images(comps.autoencoder))
      size = _chunk_size(len(images), config.eval.chunk_size)
      parts = [encode(comps.autoencoder_params,
                      {"image": images[i:i + size]})
               for i in range(0, len(images), size)]
      latents = {k: np.concatenate([np.asarray(p[k]) for p in parts])
                 for k in ("latent_mean", "latent_logvar")}
      ae = comps.autoencoder.config
      x0 = np.asarray(step_lib.posterior_draw(
          latents, jax.random.fold_in(key, _POSTERIOR_STREAM),
          ae.scaling_factor, ae.shift_factor)["image"])
    noise = np.asarray(jax.random.normal(
        jax.random.fold_in(key, _NOISE_STREAM), x0.shape, jnp.float32))
    ids = text_lib.tokenize(comps.tokenizer, captions,
                            config.text.max_length)
    self._inputs = {"image": np.asarray(x0, np.float32), "noise": noise,
                    "input_ids": ids}
    self._inputs_of = (model.components, model.mesh)
    self._losses_fn = _per_bin_losses_fn(comps, config, model.mesh)
    return self._inputs

  def score_model(self, model, ctx) -> Dict[str, float]:
    inputs = self._fixed_inputs(model, ctx)
    num_timesteps = model.components.schedule.num_timesteps
    ts = bin_timesteps(num_timesteps,
                       ctx.eval_config.get("val_loss_timesteps",
                                           DEFAULT_TIMESTEPS))
    per_bin = per_bin_losses(self._losses_fn, model, inputs, ts,
                             ctx.eval_config.chunk_size)
    out = {"val_loss": float(np.mean(per_bin))}
    out.update({bin_name(int(t), num_timesteps): float(v)
                for t, v in zip(ts, per_bin)})
    return out


def _chunk_size(n: int, chunk_size: int) -> int:
  """At most chunk_size (and no more than n needs), a multiple of the
  device count."""
  devices = jax.device_count()
  size = min(chunk_size, n)
  return max(devices, -(-size // devices) * devices)


def _per_bin_losses_fn(comps, config, mesh):
  """jitted (params, batch, ts [K]) -> per-example losses float32 [K, B],
  replicated: the training loss (`step.make_loss_fn`) of the batch at each
  timestep."""
  loss = step_lib.make_loss_fn(
      unet_apply=comps.unet.apply, text_apply=comps.text_encoder,
      schedule=comps.schedule, uncond_ids=comps.uncond_ids, config=config,
      per_example=True)

  def losses(params, batch, ts):
    b = batch["image"].shape[0]
    def at(t):
      return loss(params, {**batch, "t": jnp.full((b,), t, jnp.int32),
                           "drop": jnp.zeros((b,), bool)})
    return jax.lax.map(at, ts)
  return jax.jit(losses, out_shardings=parallel.replicated(mesh))


def per_bin_losses(losses_fn, model, inputs: Dict[str, np.ndarray],
                   ts: np.ndarray, chunk_size: int) -> List[float]:
  """The mean loss over the examples at each timestep of ts, float64 [K].

  Chunks of a fixed size (one compile), sharded over the mesh's devices;
  the last chunk is padded with copies of its first example, left out of
  the means.
  """
  n = inputs["image"].shape[0]
  size = _chunk_size(n, chunk_size)
  sharding = parallel.batch_sharding(model.mesh)
  replicated = parallel.replicated(model.mesh)
  ts_device = parallel.shard_replicated_host_array(ts, replicated)
  totals = np.zeros(len(ts), np.float64)
  for start in range(0, n, size):
    chunk = {k: v[start:start + size] for k, v in inputs.items()}
    real = chunk["image"].shape[0]
    if real < size:
      chunk = {k: np.concatenate([v, np.repeat(v[:1], size - real, 0)])
               for k, v in chunk.items()}
    batch = {k: parallel.shard_replicated_host_array(v, sharding)
             for k, v in chunk.items()}
    each = np.asarray(losses_fn(model.params, batch, ts_device)
                      .addressable_data(0), np.float64)
    totals += each[:, :real].sum(axis=1)
  return list(totals / n)

