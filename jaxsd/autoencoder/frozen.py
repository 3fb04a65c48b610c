"""The frozen autoencoder of a latent diffusion run (model.autoencoder).

`load(path)` takes a diffusers `vae/` folder, a Stable Diffusion pipeline
folder (its `vae/`), or a jaxsd autoencoder workdir (python -m
jaxsd.commands.train_autoencoder), and returns a `FrozenAutoencoder`: its module,
config and parameters (device arrays, never trained) and jittable
`encode(params, images) -> (mean, logvar)` and `decode(params, x)` that
work in the diffusion space `(z - shift_factor) * scaling_factor`.

Training draws latents from the posterior inside the train step
(train_step.add_noise_inputs), from the (mean, logvar) that `encode` gives
on the fly or that a latent cache (jaxsd-cache) stored, so both
paths train on the same numbers.
"""
import dataclasses
import hashlib
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models import autoencoder as ae_lib


@dataclasses.dataclass
class FrozenAutoencoder:
  source: str  # the path it was loaded from
  module: ae_lib.AutoencoderKL
  config: ae_lib.AutoencoderConfig
  params: Any
  _fingerprint: Optional[str] = dataclasses.field(default=None, repr=False)

  def encode(self, params, images) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """images [..., H, W, C] in [-1, 1] -> posterior (mean, logvar) of the
    raw latents (any leading axes)."""
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    mean, logvar = self.module.apply({"params": params}, flat,
                                     method=self.module.encode)
    return (mean.reshape(lead + mean.shape[1:]),
            logvar.reshape(lead + logvar.shape[1:]))

  def decode(self, params, x) -> jnp.ndarray:
    """Diffusion-space latents [B, h, w, c] -> images in [-1, 1]."""
    z = ae_lib.from_diffusion(x, self.config)
    images = self.module.apply({"params": params}, z,
                               method=self.module.decode)
    return jnp.clip(images, -1.0, 1.0)

  def latent_shape(self, image_size: int):
    return self.config.latent_shape(image_size)

  def fingerprint(self) -> str:
    """A digest of the architecture and every parameter: a latent cache
    records it, and a run reading the cache must have the same one."""
    if self._fingerprint is None:
      self._fingerprint = digest(self.params, repr(self.config))
    return self._fingerprint


def digest(params, header: str) -> str:
  """A short digest of frozen weights (every leaf, in tree order) and a
  header describing how they are used: what caches of their outputs record
  and check."""
  h = hashlib.sha256(header.encode())
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()[:16]


def text_fingerprint(text_params, max_length: int) -> str:
  """The digest a latent cache's text embeddings are checked by."""
  return digest(text_params, f"text max_length={max_length}")


def load(path: str) -> FrozenAutoencoder:
  """The autoencoder at `path` (see the module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"model.autoencoder={path!r} does not exist; give a diffusers vae/ "
        "folder, a Stable Diffusion pipeline folder, or a jaxsd autoencoder "
        "workdir (jaxsd-train-autoencoder --workdir=...).")
  folder = ae_lib.vae_folder(path)
  if folder is not None:
    module, params = ae_lib.load_diffusers(folder)
    return FrozenAutoencoder(folder, module, module.config, params)
  from jaxsd.autoencoder import training as autoencoder_training  # pylint: disable=g-import-not-at-top
  if autoencoder_training.is_autoencoder_run(path):
    config, params, _ = autoencoder_training.load_run(path)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return FrozenAutoencoder(path, ae_lib.AutoencoderKL(config), config,
                             params)
  raise ValueError(
      f"model.autoencoder={path!r} is neither a diffusers AutoencoderKL "
      "folder (config.json and diffusion_pytorch_model.safetensors or .bin), "
      "nor a pipeline folder with such a vae/ subfolder, nor a jaxsd "
      "autoencoder workdir (jaxsd-train-autoencoder).")


def check_run_config(frozen: FrozenAutoencoder, config) -> None:
  """The UNet's channels must be the latent channels, the data's channels
  the autoencoder's, and the image size a multiple of its downsampling."""
  source = f"model.autoencoder={config.model.autoencoder!r}"
  ae_lib.check_fits(frozen.config, config.model.in_channels,
                    config.model.out_channels, source)
  if config.data.num_channels != frozen.config.in_channels:
    raise ValueError(
        f"The autoencoder {source} encodes {frozen.config.in_channels}-channel "
        f"images but data.num_channels={config.data.num_channels}; set "
        f"data.num_channels={frozen.config.in_channels}.")
  frozen.latent_shape(config.data.image_size)
