"""Builders of what a run is made of, from its config alone.

- `build_components(config)`: tokenizer, text encoder, UNet, noise schedule.
- `TrainSetup(config)`: those plus the optimiser, the mesh and the state's
  shardings; creates or restores the sharded train state and builds the
  jitted, sharded, donated train step.
- `restore_for_inference(workdir, mesh)`: a saved run's parameters without
  optimiser state.

Training, sampling, evaluation, benchmarks and tests all build through
these, so none of them assembles a state or a step by hand.
"""
import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from jaxsd.checkpointing import checkpoints as checkpoint
from jaxsd.checkpointing import run_config
from jaxsd import environment
from jaxsd.autoencoder import frozen as latent
from jaxsd.models import lora as lora_lib
from jaxsd import models
from jaxsd.models import checks as model_checks
from jaxsd import parallel
from jaxsd.interop import sd_pipeline
from jaxsd.text import encoder as text_lib
from jaxsd.training import state as ts
from jaxsd.diffusion import step as step_lib
from jaxsd.diffusion import schedules


@dataclasses.dataclass
class Components:
  config: Any
  tokenizer: Any
  text_encoder: text_lib.TextEncoder
  unet: Any
  schedule: schedules.NoiseSchedule
  uncond_ids: np.ndarray  # [1, L] token ids of the empty prompt
  # Latent diffusion (model.autoencoder): the frozen autoencoder; None in
  # pixel space.
  autoencoder: Optional[latent.FrozenAutoencoder] = None
  # LoRA (model.lora.rank > 0): what trains are adapters on a frozen base.
  lora: Optional[lora_lib.LoraConfig] = None
  _text_fingerprint: Optional[str] = dataclasses.field(default=None,
                                                       repr=False)
  _base_fingerprint: Optional[str] = dataclasses.field(default=None,
                                                       repr=False)
  _base: Any = dataclasses.field(default=None, repr=False)

  @property
  def image_shape(self):
    """The shape the UNet denoises: the image's, or its latents'."""
    c = self.config
    if self.autoencoder is not None:
      return self.autoencoder.latent_shape(c.data.image_size)
    return (c.data.image_size, c.data.image_size, c.model.in_channels)

  @property
  def pixel_shape(self):
    """The shape of the images the model makes."""
    c = self.config
    return (c.data.image_size, c.data.image_size, c.data.num_channels)

  @property
  def autoencoder_factor(self) -> int:
    """How many pixels a latent spans per side (1 in pixel space)."""
    return (1 if self.autoencoder is None
            else self.autoencoder.config.downsample_factor)

  @property
  def size_multiple(self) -> int:
    """What the sides (pixels) of the images the model makes must be
    multiples of: the UNet's downsampling, times the autoencoder's."""
    return model_checks.size_multiple(self.config, self.autoencoder_factor)

  def image_shape_at(self, height: int, width: int):
    """image_shape for images of height x width pixels (multiples of
    size_multiple): (height, width, in_channels) or the latents'."""
    c = self.config
    if self.autoencoder is None:
      return (height, width, c.model.in_channels)
    factor = self.autoencoder_factor
    return (height // factor, width // factor,
            self.autoencoder.config.latent_channels)

  def pixel_shape_at(self, height: int, width: int):
    """pixel_shape for images of height x width pixels."""
    return (height, width, self.config.data.num_channels)

  @property
  def autoencoder_params(self):
    """The frozen autoencoder's parameters (None in pixel space): passed
    to jitted code as an argument, never closed over as constants."""
    return None if self.autoencoder is None else self.autoencoder.params

  def decode(self, autoencoder_params, x):
    """What a sampler made -> images in [-1, 1]."""
    if self.autoencoder is None:
      return x
    return self.autoencoder.decode(autoencoder_params, x)

  def init_params(self, rng):
    """{"unet": ..., "text": ...}, freshly initialised or pretrained."""
    rng_text, rng_unet = jax.random.split(rng)
    context_shape = (self.text_encoder.max_length,
                     self.text_encoder.hidden_size)
    return {"unet": self.unet.init(rng_unet, self.image_shape, context_shape),
            "text": self.text_encoder.init(rng_text)}

  def base_params(self):
    """A LoRA run's frozen base {"unet", "text"} in model.lora.base_dtype:
    the pretrained weights, or (no pretrained weights) an initialisation
    fixed by training.seed, the same in training and inference."""
    if self._base is None:
      key = jax.random.fold_in(jax.random.key(self.config.training.seed),
                               _LORA_BASE_STREAM)
      # Not under an outer jit: pretrained weights would become constants
      # (both inits jit what they compute themselves).
      self._base = lora_lib.cast_base(self.init_params(key),
                                      self.lora.base_dtype)
    return self._base

  def base_fingerprint(self) -> str:
    """A LoRA run's base, digested (checkpoints record it)."""
    if self._base_fingerprint is None:
      self._base_fingerprint = latent.digest(self.base_params(),
                                             f"lora base {self.lora.base_dtype}")
    return self._base_fingerprint

  def init_trainable(self, rng, base):
    """What trains: {"unet", "text"} params, or in LoRA runs adapters for
    the base's (may be abstract) targets ({} for an unadapted text
    encoder)."""
    if self.lora is None:
      return self.init_params(rng)
    rng_unet, rng_text = jax.random.split(rng)
    l = self.lora
    return {"unet": lora_lib.init_adapters(rng_unet, base["unet"], l.targets,
                                           l.rank),
            "text": (lora_lib.init_adapters(rng_text, base["text"],
                                            l.text_targets, l.rank)
                     if l.text_targets else {})}

  def inference_params(self, trained, base=None, lora_scale: float = 1.0):
    """The weights sampling uses: trained params as they are, or a LoRA
    run's adapters merged into its base at lora_scale."""
    if self.lora is None:
      return trained
    if base is None:
      base = self.base_params()
    merge = lambda name: (lora_lib.merge(base[name], trained[name],
                                         self.lora.alpha, lora_scale)
                          if trained[name] else base[name])
    return {"unet": merge("unet"), "text": merge("text")}

  def denoise_fn(self, params):
    """(x_t [B,H,W,C], t [B], context [B,L,D]) -> model output, for samplers."""
    def fn(x_t, t, context):
      return self.unet.apply(params["unet"], x_t, t, context)
    return fn

  def encode(self, params, input_ids):
    return self.text_encoder(params["text"], input_ids)

  def frozen_text_fingerprint(self) -> Optional[str]:
    """The digest of a frozen pretrained text encoder (what a latent
    cache's text embeddings are checked by); None if the encoder trains or
    is freshly initialised (its weights are the run's, not fixed)."""
    text = self.config.text
    if not text.pretrained or text.trainable:
      return None
    if self._text_fingerprint is None:
      params = self.text_encoder.init(jax.random.key(0))  # no rng use
      self._text_fingerprint = latent.text_fingerprint(params,
                                                       text.max_length)
    return self._text_fingerprint


def build_components(config) -> Components:
  """The config's tokenizer, text encoder, UNet and schedule (the config is
  resolved for this machine first, jaxsd.environment, and filled from
  model.pretrained_pipeline, jaxsd.interop.sd_pipeline)."""
  sd_pipeline.resolve(environment.resolve(config))
  tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
  encoder = text_lib.TextEncoder(config.text, text_lib.vocab_size(tokenizer))
  unet = models.build_unet(config.model, encoder.hidden_size)
  schedule = schedules.from_config(config.diffusion)
  uncond = text_lib.empty_prompt_ids(tokenizer, config.text.max_length)
  autoencoder = None
  if config.model.autoencoder:
    autoencoder = latent.load(config.model.autoencoder)
    latent.check_run_config(autoencoder, config)
    model_checks.check_latent_size(config,
                                   autoencoder.config.downsample_factor)
  return Components(config=config, tokenizer=tokenizer, text_encoder=encoder,
                    unet=unet, schedule=schedule, uncond_ids=uncond,
                    autoencoder=autoencoder,
                    lora=lora_lib.from_config(config.model.get("lora")))


def make_optimizer(config):
  """The config's optimiser (AdamW, warmup-cosine over training.num_steps);
  in LoRA runs over the adapters (the text encoder's if it has some)."""
  lora = lora_lib.from_config(config.model.get("lora"))
  text_trains = (config.text.trainable if lora is None
                 else bool(lora.text_targets))
  return ts.make_optimizer(config.optim, config.training.num_steps,
                           text_trains)


class TrainSetup:
  """A config's train state and step, built once and shared.

  Attributes:
    config, components, mesh, tx: what the step is made of.
    state_shardings: NamedSharding per state array (replicated, or
      FSDP-split with parallel.fsdp).
    abstract_state: ShapeDtypeStructs carrying those shardings (the target
      of checkpoint restores).
    batch_sharding: of the step's batch ([B, ...], or [steps_per_call, B,
      ...] with training.steps_per_call > 1).
  """

  def __init__(self, config, mesh=None, components: Optional[Components] = None):
    self.config = config
    self.components = components or build_components(config)
    self.mesh = mesh or parallel.make_mesh(
        parallel.model_axis_size(config.parallel))
    self.tx = make_optimizer(config)
    # LoRA runs: the frozen base, an input of the step (replicated).
    self.base_params = None
    self._abstract_base = None
    if self.components.lora is not None:
      self._abstract_base = jax.eval_shape(self.components.init_params,
                                           jax.random.key(0))
      self.base_params = jax.device_put(self.components.base_params(),
                                        parallel.replicated(self.mesh))
    abstract = jax.eval_shape(self._init_state, jax.random.key(0))
    self.state_shardings = parallel.state_shardings(
        abstract, self.mesh, config.parallel.fsdp_min_size)
    self.abstract_state = parallel.with_shardings(abstract,
                                                  self.state_shardings)
    self.steps_per_call = config.training.steps_per_call
    self.batch_sharding = (parallel.batch_sharding(self.mesh)
                           if self.steps_per_call == 1
                           else parallel.stacked_batch_sharding(self.mesh))
    self._encode = None
    self._jitted_init = None
    self._jitted_param_init = None
    self.autoencoder_params = None
    if self.components.autoencoder is not None:
      self.autoencoder_params = jax.device_put(
          self.components.autoencoder_params,
          parallel.replicated(self.mesh))
      self._encode = jax.jit(encode_images(self.components.autoencoder),
                             out_shardings=self.batch_sharding)

  def _init_state(self, rng) -> ts.TrainState:
    return ts.create(
        self.components.init_trainable(rng, self._abstract_base), self.tx)

  def param_init(self):
    """rng -> the trained parameters (in their shardings), jitted: the part
    of create_train_state that depends on the model alone."""
    if self._jitted_param_init is None:
      self._jitted_param_init = jax.jit(
          functools.partial(self.components.init_trainable,
                            base=self._abstract_base),
          out_shardings=self.state_shardings.params)
    return self._jitted_param_init

  def create_train_state(self, rng) -> ts.TrainState:
    """A fresh state (params, EMA, optimiser), initialised in its shardings.

    Two programs, the same values as one: the parameters' random
    initialisation (param_init), then the EMA copy and the optimiser state
    from them. The first is most of the compile (the threefry draws of every
    parameter: about 10 of configs/tiny.py's 11 s on 2 cores), and a run
    that changes only the optimiser, EMA or training settings reads it back
    from the compilation cache."""
    if self._jitted_init is None:  # jitted once: a second call reuses it
      # The parameters are donated: the state's own copy reuses them.
      self._jitted_init = jax.jit(functools.partial(ts.create, tx=self.tx),
                                  out_shardings=self.state_shardings,
                                  donate_argnums=0)
    return self._jitted_init(self.param_init()(rng))

  def restore_train_state(self, mngr, step: Optional[int] = None
                          ) -> Tuple[ts.TrainState, Dict[str, Any], int]:
    """(state, run metadata, step) of a checkpoint (default: the latest),
    restored straight into this setup's shardings."""
    return checkpoint.restore(mngr, self.abstract_state, step)

  def step_fn(self):
    """The step as a pure function of (state, batch, rng), unjitted."""
    c = self.components
    return step_lib.make_step_fn(
        unet_apply=c.unet.apply, text_apply=c.text_encoder,
        schedule=c.schedule, uncond_ids=c.uncond_ids, config=self.config,
        tx=self.tx, steps_per_call=self.steps_per_call,
        latent_scale=(c.autoencoder.config.scaling_factor
                      if c.autoencoder else 1.0),
        latent_shift=(c.autoencoder.config.shift_factor
                      if c.autoencoder else 0.0),
        lora=c.lora)

  def make_train_step(self, donate: bool = True):
    """The jitted step as a function of (state, batch, rng): state sharded
    as `state_shardings`, batch as `batch_sharding`, rng and metrics
    replicated; the input state's buffers are donated (reused for the
    output) unless donate=False. A LoRA run's frozen base goes in as a
    (replicated, not donated) argument."""
    replicated = parallel.replicated(self.mesh)
    jitted = jax.jit(
        self.step_fn(),
        in_shardings=(self.state_shardings, self.batch_sharding, replicated,
                      replicated),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,) if donate else ())
    base = self.base_params

    def step(state, batch, rng):
      return jitted(state, batch, rng, base)
    step.jitted = jitted  # (state, batch, rng, base): for .lower()
    step.base = base
    return step

  def inference_params(self, trained, lora_scale: float = 1.0):
    """Components.inference_params with this setup's base (placed once)."""
    return self.components.inference_params(trained, self.base_params,
                                            lora_scale)

  def global_batch(self, local_batch):
    """This process's share of a batch -> the step's global, sharded batch.

    In latent runs the images are replaced by their posterior under the
    frozen autoencoder (`latent_mean`, `latent_logvar`), which the step
    samples; a latent cache's batches already hold them.
    """
    batch = parallel.global_batch(local_batch, self.batch_sharding)
    if self._encode is not None and "image" in batch:
      batch = self._encode(self.autoencoder_params, batch)
    return batch


def encode_images(autoencoder: latent.FrozenAutoencoder):
  """(autoencoder params, batch) -> the batch with "image" replaced by its
  posterior's "latent_mean" and "latent_logvar" (unjitted)."""
  def encode(params, batch):
    batch = dict(batch)
    mean, logvar = autoencoder.encode(params, batch.pop("image"))
    return {**batch, "latent_mean": mean, "latent_logvar": logvar}
  return encode


_LORA_BASE_STREAM = 0x42415345  # fold_in tag of a random LoRA base's key


def restore_for_inference(workdir: str, mesh, step=None, use_ema=True,
                          lora_scale: float = 1.0, merge_lora: bool = True,
                          config=None, components: Optional[Components] = None):
  """(config, components, params, step) from a run's saved config and
  checkpoint; params are replicated over the mesh, no optimiser state.

  A LoRA run's params are its adapters merged into the base at lora_scale
  (merge_lora=False: the adapters themselves). `config`: the run's config
  when the caller has read it already (load_run_config(workdir, step));
  `components`: its build_components(config), when built already.
  """
  config = config or run_config.load_run_config(workdir, step)
  comps = components or build_components(config)
  replicated = parallel.replicated(mesh)
  base = (jax.eval_shape(comps.init_params, jax.random.key(0))
          if comps.lora is not None else None)
  abstract = jax.eval_shape(lambda k: comps.init_trainable(k, base),
                            jax.random.key(0))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      abstract)
  params, step = checkpoint.restore_params(workdir, abstract, step=step,
                                           use_ema=use_ema)
  if comps.lora is not None and merge_lora:
    params = jax.device_put(comps.inference_params(params,
                                                   lora_scale=lora_scale),
                            replicated)
  return config, comps, params, step
