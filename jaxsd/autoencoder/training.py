"""Training jaxsd's KL autoencoder: its numerics and its run format.

- `AutoencoderSetup(config)`: the autoencoder, the patch discriminator, their
  optimisers, the mesh, and the jitted, pure `train_step(state, batch, rng)`
  (built by `make_step_fn`).
- `psnr`, `measure_scaling_factor`: what a run reports and stores.
- `is_autoencoder_run(workdir)`, `load_run(workdir, step)`: the seam through
  which a diffusion run (model.autoencoder=WORKDIR) takes a trained
  autoencoder.

Run format: WORKDIR/autoencoder.json ({"run_kind": "autoencoder",
"autoencoder": AutoencoderConfig fields}) marks the run; WORKDIR/config.json
is the full config tree; WORKDIR/checkpoints/<step>/{state,meta} are orbax
checkpoints (jaxsd.checkpointing.checkpoints) whose state is an `AutoencoderTrainState` and
whose meta holds the run kind, the AutoencoderConfig with the scaling factor
used from that step on (measured when autoencoder.scaling_factor = 0), and
the loader's position. The task the trainer runs is jaxsd/autoencoder/task.py.
"""
import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd import parallel
from jaxsd.training import state as ts
from jaxsd.models import autoencoder as ae_lib

RUN_KIND = "autoencoder"
RUN_FILE = "autoencoder.json"  # marks a workdir as an autoencoder run
COMMAND = "jaxsd-train-autoencoder --config=... --workdir=WORKDIR"
RECONSTRUCTION_LOSSES = ("l1", "mse")


# --- Config -------------------------------------------------------------------
# The autoencoder.* ranges are checked in jaxsd/autoencoder/checks.py.


def autoencoder_config(config, scaling_factor: Optional[float] = None
                       ) -> ae_lib.AutoencoderConfig:
  """The AutoencoderConfig of a run's config tree (config.autoencoder, with
  in/out channels = data.num_channels)."""
  a = config.autoencoder
  return ae_lib.AutoencoderConfig(
      in_channels=config.data.num_channels,
      out_channels=config.data.num_channels,
      block_out_channels=tuple(a.block_out_channels),
      layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
      norm_num_groups=a.norm_num_groups,
      mid_block_add_attention=a.mid_block_add_attention,
      use_quant_conv=a.use_quant_conv,
      use_post_quant_conv=a.use_post_quant_conv,
      scaling_factor=float(a.scaling_factor if scaling_factor is None
                           else scaling_factor),
      shift_factor=float(a.shift_factor),
      sample_size=config.data.image_size)


# --- The discriminator --------------------------------------------------------


def _groups(channels: int, most: int = 32) -> int:
  return math.gcd(channels, most)


class PatchDiscriminator(nn.Module):
  """pix2pix's NLayerDiscriminator (as taming-transformers and SD's
  autoencoders use): [B, H, W, C] in [-1, 1] -> real/fake logits per patch
  [B, h, w, 1].

  4x4 convs, stride 2 for the first `num_layers`, then two of stride 1;
  LeakyReLU(0.2); channels double from `channels`, capped at 8x. GroupNorm
  instead of the original BatchNorm: BatchNorm would need running statistics
  in the state, would mix the real and the fake batch in one statistic (the
  discriminator could tell them apart by it), and would differ between one
  device and several; GroupNorm is per example and stateless.
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.02)  # pix2pix's weights_init

    def conv(features, strides, name):
      return nn.Conv(features, (4, 4), strides=(strides, strides),
                     padding=((1, 1), (1, 1)), kernel_init=init, name=name)

    x = nn.leaky_relu(conv(self.channels, 2, "conv_0")(x), 0.2)
    for i in range(1, self.num_layers + 1):
      features = self.channels * min(2 ** i, 8)
      # The last of these keeps the resolution (pix2pix's stride-1 layer).
      x = conv(features, 2 if i < self.num_layers else 1, f"conv_{i}")(x)
      x = nn.GroupNorm(_groups(features), name=f"norm_{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return conv(1, 1, "conv_out")(x).astype(jnp.float32)


# --- Train state and step -----------------------------------------------------


@flax.struct.dataclass
class AutoencoderTrainState:
  step: jnp.ndarray  # int32 scalar: steps done
  params: Any  # {"autoencoder": ..., "discriminator": ...}
  opt_state: Any  # {"autoencoder": ..., "discriminator": ...}


def reconstruction_loss(name: str, images, recon):
  """Mean per pixel (and channel) of |recon - images| (l1) or its square."""
  diff = recon - images
  return jnp.mean(jnp.abs(diff) if name == "l1" else jnp.square(diff))


def hinge_d_loss(logits_real, logits_fake):
  return (jnp.mean(jax.nn.relu(1.0 - logits_real))
          + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def make_step_fn(model: ae_lib.AutoencoderKL,
                 discriminator: PatchDiscriminator, loss_config,
                 tx_autoencoder, tx_discriminator) -> Callable:
  """The pure step `(state, batch {"image": [B, H, W, C] in [-1, 1]}, rng)
  -> (state, metrics)`.

  loss = reconstruction + kl_weight * KL (summed over latent elements,
  batch mean), plus disc_weight * the generator hinge loss -mean D(recon)
  from step disc_start on (loss_config.disc_start >= 0). From then on the
  discriminator also trains on the hinge loss of real images and
  stop-gradient reconstructions. The phase is chosen on the device
  (lax.cond on the step), so switching it on does not recompile.
  """
  rec_name = loss_config.reconstruction_loss
  kl_weight = float(loss_config.kl_weight)
  disc_weight = float(loss_config.disc_weight)
  disc_start = int(loss_config.disc_start)

  def disc_apply(d_params, x):
    return discriminator.apply({"params": d_params}, x)

  def step(state: AutoencoderTrainState, batch, rng):
    images = batch["image"]
    rng = jax.random.fold_in(rng, state.step)
    disc_on = (state.step >= disc_start) if disc_start >= 0 else jnp.bool_(
        False)
    d_params = state.params["discriminator"]

    def ae_loss(ae_params):
      recon, mean, logvar = model.apply({"params": ae_params}, images, rng)
      rec = reconstruction_loss(rec_name, images, recon)
      kl = jnp.mean(ae_lib.kl_divergence(mean, logvar))
      # The discriminator's forward and backward pass run only when on.
      g = jax.lax.cond(disc_on, lambda r: -jnp.mean(disc_apply(d_params, r)),
                       lambda r: jnp.zeros((), jnp.float32), recon)
      loss = rec + kl_weight * kl + disc_weight * g
      return loss, (recon, rec, kl, g)

    (loss, (recon, rec, kl, g)), grads = jax.value_and_grad(
        ae_loss, has_aux=True)(state.params["autoencoder"])
    updates, ae_opt = tx_autoencoder.update(
        grads, state.opt_state["autoencoder"], state.params["autoencoder"])
    ae_params = optax.apply_updates(state.params["autoencoder"], updates)

    fake = jax.lax.stop_gradient(recon)

    def train_disc(operands):
      params, opt_state = operands
      d_loss, d_grads = jax.value_and_grad(
          lambda p: hinge_d_loss(disc_apply(p, images), disc_apply(p, fake)))(
              params)
      d_updates, opt_state = tx_discriminator.update(d_grads, opt_state,
                                                     params)
      return optax.apply_updates(params, d_updates), opt_state, d_loss

    def keep_disc(operands):
      # Before disc_start the discriminator and its Adam state stay as they
      # are.
      params, opt_state = operands
      return params, opt_state, jnp.zeros((), jnp.float32)

    d_params, d_opt, d_loss = jax.lax.cond(
        disc_on, train_disc, keep_disc,
        (d_params, state.opt_state["discriminator"]))
    new_state = state.replace(
        step=state.step + 1,
        params={"autoencoder": ae_params, "discriminator": d_params},
        opt_state={"autoencoder": ae_opt, "discriminator": d_opt})
    metrics = {"loss": loss, "rec_loss": rec, "kl": kl, "g_loss": g,
               "d_loss": d_loss, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return step


class AutoencoderSetup:
  """A config's autoencoder, discriminator, optimisers, mesh and step.

  The state is replicated over the mesh and the batch split over its
  devices (data parallel); the config's optim section drives both
  optimisers (AdamW, warmup-cosine over training.num_steps, the
  discriminator's from disc_start on).
  """

  def __init__(self, config, mesh=None):
    self.config = config
    a = config.autoencoder
    self.ae_config = autoencoder_config(config)
    self.model = ae_lib.AutoencoderKL(self.ae_config)
    self.discriminator = PatchDiscriminator(a.disc_channels, a.disc_layers)
    num_steps = config.training.num_steps
    self.tx_autoencoder = ts.make_optimizer(config.optim, num_steps)
    # The discriminator updates only from disc_start on: its k-th update is
    # global step disc_start + k and gets that step's learning rate.
    self.tx_discriminator = ts.make_optimizer(
        config.optim, num_steps, step_offset=max(a.disc_start, 0))
    self.mesh = mesh or parallel.make_mesh(1)
    self.steps_per_call = 1
    self.replicated = parallel.replicated(self.mesh)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=self.replicated),
        jax.eval_shape(self._init_state, jax.random.key(0)))

  def init_params(self, rng):
    rng_ae, rng_disc = jax.random.split(rng)
    size, c = self.config.data.image_size, self.config.data.num_channels
    x = jnp.zeros((1, size, size, c), jnp.float32)
    return {"autoencoder": self.model.init(rng_ae, x)["params"],
            "discriminator": self.discriminator.init(rng_disc, x)["params"]}

  def _init_state(self, rng) -> AutoencoderTrainState:
    params = self.init_params(rng)
    return AutoencoderTrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state={
            "autoencoder": self.tx_autoencoder.init(params["autoencoder"]),
            "discriminator": self.tx_discriminator.init(
                params["discriminator"])})

  def create_train_state(self, rng) -> AutoencoderTrainState:
    return jax.jit(self._init_state, out_shardings=self.replicated)(rng)

  def restore_train_state(self, mngr, step: Optional[int] = None):
    """(state, meta, step) of a checkpoint (default: the latest)."""
    return checkpoint.restore(mngr, self.abstract_state, step)

  def step_fn(self) -> Callable:
    return make_step_fn(self.model, self.discriminator,
                        self.config.autoencoder, self.tx_autoencoder,
                        self.tx_discriminator)

  def make_train_step(self, donate: bool = True) -> Callable:
    """The jitted step: state and metrics replicated, batch split."""
    return jax.jit(self.step_fn(),
                   in_shardings=(self.replicated, self.batch_sharding,
                                 self.replicated),
                   out_shardings=(self.replicated, self.replicated),
                   donate_argnums=(0,) if donate else ())

  def global_batch(self, local_batch):
    return parallel.global_batch({"image": local_batch["image"]},
                                 self.batch_sharding)


# --- What a run measures ------------------------------------------------------


def psnr(images, recon) -> float:
  """Mean over images of 10 log10(peak^2 / MSE), peak-to-peak 2 (data in
  [-1, 1]); [N, H, W, C] each. Reconstructions are clipped to [-1, 1] as
  saved images are."""
  images = np.asarray(images, np.float64)
  recon = np.clip(np.asarray(recon, np.float64), -1.0, 1.0)
  mse = np.mean(np.square(images - recon), axis=tuple(range(1, images.ndim)))
  # An exact reconstruction would be +inf; floor the error at 1e-10.
  return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-10))))


def make_reconstruct_fn(model: ae_lib.AutoencoderKL, chunk: int = 64):
  """(params, images [N, H, W, C]) -> (reconstructions, posterior means), as
  numpy, decoding the posterior mean (deterministic). Chunks of `chunk`
  images, the last padded, so one compiled shape serves any N."""
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def reconstruct(params, images):
    images = np.asarray(images, np.float32)
    recons, means = [], []
    for i in range(0, len(images), chunk):
      part = images[i:i + chunk]
      n = len(part)
      size = min(chunk, len(images))
      if n < size:
        part = np.concatenate([part, np.zeros((size - n,) + part.shape[1:],
                                              np.float32)])
      recon, mean, _ = apply(params, part)
      recons.append(np.asarray(recon)[:n])
      means.append(np.asarray(mean)[:n])
    return np.concatenate(recons), np.concatenate(means)
  return reconstruct


def measure_scaling_factor(means) -> float:
  """1 / std of posterior means (Stable Diffusion's recipe for 0.18215), so
  the diffusion model sees latents of about unit variance."""
  std = float(np.std(np.asarray(means, np.float64)))
  return 1.0 / std if std > 0 and np.isfinite(std) else 1.0


# --- The run format -----------------------------------------------------------


def config_to_dict(config: ae_lib.AutoencoderConfig) -> Dict[str, Any]:
  d = dataclasses.asdict(config)
  d["block_out_channels"] = list(d["block_out_channels"])
  return d


def write_run_file(workdir: str, config: ae_lib.AutoencoderConfig):
  """WORKDIR/autoencoder.json, atomically (a temporary file renamed)."""
  path = os.path.join(workdir, RUN_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"run_kind": RUN_KIND, "autoencoder": config_to_dict(config)},
              f, indent=2)
  os.replace(path + ".tmp", path)


def checkpoint_meta(config: ae_lib.AutoencoderConfig) -> Dict[str, Any]:
  """What every checkpoint's meta adds to mark the run and its model."""
  return {"run_kind": RUN_KIND, "autoencoder": config_to_dict(config)}


def _read_run_file(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, RUN_FILE)
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and info.get(
      "run_kind") == RUN_KIND else None


def is_autoencoder_run(workdir: str) -> bool:
  """Whether `workdir` is a jaxsd autoencoder run (it has autoencoder.json,
  written when `jaxsd-train-autoencoder` starts)."""
  return _read_run_file(workdir) is not None


def _not_a_run(workdir: str) -> Exception:
  what = ("a diffusion training workdir" if os.path.exists(
      os.path.join(workdir, "config.json")) else "not a jaxsd autoencoder run")
  expected = os.path.join(workdir, RUN_FILE)
  message = (f"{workdir!r} is {what}: expected {expected} and checkpoints, "
             f"written by `{COMMAND}`.")
  return (ValueError(message) if os.path.isdir(workdir)
          and os.listdir(workdir) else FileNotFoundError(message))


def load_run(workdir: str, step: Optional[int] = None
             ) -> Tuple[ae_lib.AutoencoderConfig, Any, int]:
  """(config, autoencoder params, step) of a trained autoencoder run.

  The config carries the checkpoint's scaling factor (the measured one when
  the run measured it); params are the autoencoder's only (no discriminator
  or optimiser state is read), replicated over all devices.

  Raises:
    ValueError / FileNotFoundError: `workdir` is not an autoencoder run
      (naming it and the command that makes one), or has no such checkpoint.
  """
  if not is_autoencoder_run(workdir):
    raise _not_a_run(workdir)
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    steps = mngr.all_steps()
    if step is None and not steps:
      raise FileNotFoundError(
          f"{checkpoint.checkpoint_dir(workdir)} has no checkpoint yet: let "
          f"`{COMMAND}` reach training.checkpoint_every first.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {mngr.directory}; available "
          f"steps: {list(steps) or 'none'}.")
    meta = mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("run_kind") != RUN_KIND:
      raise ValueError(f"The checkpoint {mngr.directory}/{step} is not an "
                       f"autoencoder checkpoint (written by `{COMMAND}`).")
    config = ae_lib.config_from_dict(meta["autoencoder"])
    model = ae_lib.AutoencoderKL(config)
    replicated = parallel.replicated(parallel.make_mesh(1))
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda rng: ae_lib.init_params(
            model, rng, config.sample_size), jax.random.key(0)))
    out = checkpoint.restore_partial(
        mngr, step, {"params": {"autoencoder": abstract}})
  finally:
    mngr.close()
  return config, out["params"]["autoencoder"], step
