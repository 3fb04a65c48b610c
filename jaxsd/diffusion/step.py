"""The jitted training step: a pure function of (state, batch, rng)."""
import functools
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from jaxsd.models import lora as lora_lib
from jaxsd.training import state as ts
from jaxsd.diffusion import losses
from jaxsd.diffusion import noise as noise_lib
from jaxsd.diffusion.schedules import NoiseSchedule


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
# fold_in tag of the step key's LoRA-dropout stream (apart from the noise
# inputs, so a run's noise does not depend on whether it uses LoRA).
_DROPOUT_STREAM = 0x4C6F5241
# fold_in tags of the noise options' streams, folded into the noise's key:
# the default path draws exactly what it drew before the options existed.
_OFFSET_STREAM = 0x4F465354
_PYRAMID_STREAM = 0x50595244
_PERTURBATION_STREAM = 0x50525442


def sample_timesteps(rng, b: int, num_timesteps: int,
                     distribution: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0):
  """Training timesteps, int32 [b] in [0, num_timesteps).

  "uniform", or "logit_normal": t / T = sigmoid(N(mean, std)), which spends
  fewer examples on the nearly clean and nearly pure-noise ends (SD3,
  Esser et al. 2024).
  """
  if distribution == "uniform":
    return jax.random.randint(rng, (b,), 0, num_timesteps)
  if distribution == "logit_normal":
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (b,)))
    return jnp.clip(jnp.floor(u * num_timesteps), 0,
                    num_timesteps - 1).astype(jnp.int32)
  raise ValueError(f"diffusion.timestep_sampling={distribution!r}; choose "
                   f"one of {TIMESTEP_SAMPLINGS}.")


def posterior_draw(batch, rng, latent_scale: float = 1.0,
                   latent_shift: float = 0.0):
  """A latent batch (latent_mean, latent_logvar [B, h, w, c]) -> one with
  "image": the draw mean + std * N(0, 1) in the diffusion space
  (z - shift) * scale."""
  batch = dict(batch)
  mean, logvar = batch.pop("latent_mean"), batch.pop("latent_logvar")
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape,
                                                       mean.dtype)
  batch["image"] = (z - latent_shift) * latent_scale
  return batch


def add_noise_inputs(batch, rng, *, num_timesteps: int, cfg_dropout: float,
                     timestep_sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0,
                     latent_scale: float = 1.0, latent_shift: float = 0.0,
                     noise_offset: float = 0.0,
                     multires_noise_iterations: int = 0,
                     multires_noise_discount: float = 0.3,
                     input_perturbation: float = 0.0):
  """Draws the step's randomness for the whole global batch.

  Adds noise [B, H, W, C] (the target's), t int32 [B] and drop bool [B]
  (train on the empty prompt). Drawn before any micro-batching, so gradient
  accumulation and the device count do not change which noise an example
  gets.

  The noise options (jaxsd/diffusion/noise.py), in kohya's order: offset
  noise (noise_offset > 0), then pyramid noise (multires_noise_iterations >
  0); input_perturbation > 0 adds input_noise, the perturbed noise x_t is
  built from (the target keeps `noise`).

  A latent batch (latent_mean, latent_logvar: the autoencoder's posterior,
  encoded on the fly or read from a latent cache) becomes "image" here: a
  posterior draw mean + std * N(0, 1), to the diffusion space
  (z - shift) * scale, as Stable Diffusion trains.
  """
  if "latent_mean" in batch:  # (pixel runs keep their keys as they were)
    rng, rng_posterior = jax.random.split(rng)
    batch = posterior_draw(batch, rng_posterior, latent_scale, latent_shift)
  x0 = batch["image"]
  b = x0.shape[0]
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  extra = {}
  if noise_offset > 0:
    noise = noise + noise_lib.offset_noise(
        jax.random.fold_in(rng_noise, _OFFSET_STREAM), x0.shape,
        noise_offset, x0.dtype)
  if multires_noise_iterations > 0:
    noise = noise_lib.pyramid_noise(
        jax.random.fold_in(rng_noise, _PYRAMID_STREAM), noise,
        multires_noise_iterations, multires_noise_discount)
  if input_perturbation > 0:
    extra["input_noise"] = noise_lib.perturbed(
        jax.random.fold_in(rng_noise, _PERTURBATION_STREAM), noise,
        input_perturbation)
  return {**batch,
          "t": sample_timesteps(rng_t, b, num_timesteps, timestep_sampling,
                                logit_mean, logit_std),
          "noise": noise,
          "drop": jax.random.bernoulli(rng_drop, cfg_dropout, (b,)),
          **extra}


def _adapted(apply: Callable, base, adapters, lora: lora_lib.LoraConfig,
             rng):
  """apply(base, *args), with LoRA adapters if there are any."""
  if not adapters:
    return functools.partial(apply, base)
  return functools.partial(lora_lib.apply_with_adapters, apply, base,
                           adapters, alpha=lora.alpha, dropout=lora.dropout,
                           rng=rng)


def loss_fn(params, batch, rng=None, frozen=None, *, unet_apply: Callable,
            text_apply: Callable, schedule: NoiseSchedule, uncond_ids,
            prediction_type: str, min_snr_gamma: float, text_trainable: bool,
            lora: Optional[lora_lib.LoraConfig] = None,
            loss_type: str = "l2", huber_c: float = 0.1,
            huber_schedule: str = "snr", per_example: bool = False):
  """Denoising loss of one (micro-)batch (per_example: float32 [B], the
  loss of each example; the validation loss masks padding with it).

  params: {"unet", "text"}; in LoRA runs (lora set) the adapters, with the
  frozen base weights in `frozen` ({"unet", "text"}) and rng the key of
  the adapters' dropout.

  batch: image float32 [B, H, W, C] in [-1, 1], input_ids int32 [B, L], and
  the noise inputs of `add_noise_inputs` (x_t is built from input_noise
  where input perturbation adds it, the target from noise); optionally
  context float32 [B, L, D], the captions' embeddings by the frozen text
  encoder (a latent cache's), used instead of encoding input_ids.
  """
  x0, noise, t = batch["image"], batch["noise"], batch["t"]
  if lora is None:
    text_params = params["text"]
    if not text_trainable:
      text_params = jax.lax.stop_gradient(text_params)
    encode = functools.partial(text_apply, text_params)
    denoise = functools.partial(unet_apply, params["unet"])
  else:  # gradients reach the adapters alone; the base is an input
    rng_text, rng_unet = jax.random.split(rng)
    encode = _adapted(text_apply, frozen["text"], params["text"], lora,
                      rng_text)
    denoise = _adapted(unet_apply, frozen["unet"], params["unet"], lora,
                       rng_unet)
  # Classifier-free guidance: train on the empty prompt with probability p.
  drop = batch["drop"]
  if "context" in batch:  # stored embeddings: encode the empty prompt only
    uncond = encode(uncond_ids).astype(batch["context"].dtype)
    context = jnp.where(drop[:, None, None], uncond, batch["context"])
  else:
    ids = jnp.where(drop[:, None], uncond_ids, batch["input_ids"])
    context = encode(ids)
  x_t = schedule.add_noise(x0, batch.get("input_noise", noise), t)
  out = denoise(x_t, t, context)
  return losses.denoising_loss(out, x0, noise, t, schedule, prediction_type,
                               min_snr_gamma, loss_type, huber_c,
                               huber_schedule, per_example)


def train_step(state: ts.TrainState, batch: Dict[str, jnp.ndarray], rng,
               frozen=None, *, loss: Callable, noise_inputs: Callable,
               tx: optax.GradientTransformation, ema_decay: float,
               grad_accum_steps: int = 1):
  """One optimiser update on a global batch; returns (state, metrics).

  rng is the run's base key; the step's key is fold_in(rng, step), so the
  randomness of step s is the same however steps are grouped or resumed.
  frozen: weights the step uses but does not train (a LoRA run's base),
  passed in, never closed over.
  """
  step_key = jax.random.fold_in(rng, state.step)
  batch = noise_inputs(batch, step_key)
  dropout_key = jax.random.fold_in(step_key, _DROPOUT_STREAM)
  grad_fn = jax.value_and_grad(loss)
  if grad_accum_steps == 1:
    loss_value, grads = grad_fn(state.params, batch, dropout_key, frozen)
  else:
    # [B, ...] -> [k, B/k, ...] with strided micro-batches, so each stays
    # spread over all devices of the batch-sharded axis.
    def split(x):
      x = x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps)
                    + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)
    micro = (jax.tree_util.tree_map(split, batch),
             jnp.arange(grad_accum_steps))
    def body(carry, micro_batch):
      mb, i = micro_batch
      l, g = grad_fn(state.params, mb, jax.random.fold_in(dropout_key, i),
                     frozen)
      acc_l, acc_g = carry
      return (acc_l + l, jax.tree_util.tree_map(jnp.add, acc_g, g)), None
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss_value, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), micro,
        unroll=_loop_unroll())
    loss_value = loss_value / grad_accum_steps
    grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grads)
  grad_norm = optax.tree.norm(grads)
  new_state = ts.apply_gradients(state, grads, tx, ema_decay)
  metrics = {"loss": loss_value, "grad_norm": grad_norm}
  return new_state, metrics


def _loop_unroll():
  """`unroll` for scans whose body takes gradients of convolutions.

  XLA:CPU runs a convolution's weight gradient inside a while loop many
  times slower than outside one (benchmarks/README.md); a fully unrolled scan is
  straight-line code and runs at full speed, at the cost of compile time
  growing with the trip count. Accelerators keep the rolled loop.
  """
  return True if jax.default_backend() == "cpu" else 1


def multi_step(state, batches, rng, frozen=None, *, step_fn: Callable):
  """Runs steps_per_call train steps in one call; batches have a leading axis.

  Returns the final state and per-step metrics stacked [steps_per_call].
  """
  def body(state, batch):
    return step_fn(state, batch, rng, frozen)
  return jax.lax.scan(body, state, batches, unroll=_loop_unroll())


# The loss and noise options of diffusion.*, as a config without them (one
# saved before they existed) means them: off, and kohya's Huber defaults.
LOSS_OPTIONS = {"loss_type": "l2", "huber_c": 0.1, "huber_schedule": "snr"}
NOISE_OPTIONS = {"noise_offset": 0.0, "multires_noise_iterations": 0,
                 "multires_noise_discount": 0.3, "input_perturbation": 0.0}


def _options(diffusion_config, defaults):
  return {k: diffusion_config.get(k, v) for k, v in defaults.items()}


def make_loss_fn(*, unet_apply, text_apply, schedule, uncond_ids, config,
                 lora: Optional[lora_lib.LoraConfig] = None,
                 per_example: bool = False):
  """The training loss of config (`loss_fn` with its settings): a function
  of (params, batch, rng=None, frozen=None). The validation loss
  (jaxsd/evaluation/metrics/val_loss.py) evaluates this same function."""
  return functools.partial(
      loss_fn, unet_apply=unet_apply, text_apply=text_apply, schedule=schedule,
      uncond_ids=jnp.asarray(uncond_ids),
      prediction_type=config.diffusion.prediction_type,
      min_snr_gamma=config.diffusion.min_snr_gamma,
      text_trainable=config.text.trainable, lora=lora,
      per_example=per_example,
      **_options(config.diffusion, LOSS_OPTIONS))


def make_step_fn(*, unet_apply, text_apply, schedule, uncond_ids, config, tx,
                 steps_per_call: int = 1, latent_scale: float = 1.0,
                 latent_shift: float = 0.0,
                 lora: Optional[lora_lib.LoraConfig] = None):
  """The step as a function of (state, batch, rng[, frozen]), ready for
  jax.jit."""
  loss = make_loss_fn(unet_apply=unet_apply, text_apply=text_apply,
                      schedule=schedule, uncond_ids=uncond_ids,
                      config=config, lora=lora)
  noise_inputs = functools.partial(
      add_noise_inputs, num_timesteps=schedule.num_timesteps,
      cfg_dropout=config.diffusion.cfg_dropout,
      timestep_sampling=config.diffusion.timestep_sampling,
      logit_mean=config.diffusion.logit_mean,
      logit_std=config.diffusion.logit_std, latent_scale=latent_scale,
      latent_shift=latent_shift,
      **_options(config.diffusion, NOISE_OPTIONS))
  step = functools.partial(train_step, loss=loss, noise_inputs=noise_inputs,
                           tx=tx,
                           ema_decay=config.optim.ema_decay,
                           grad_accum_steps=config.optim.grad_accum_steps)
  if steps_per_call == 1:
    return step
  return functools.partial(multi_step, step_fn=step)
