"""The autoencoder.* section of a run's config: its valid ranges, and the
image size an autoencoder run's downsampling needs.

`check_autoencoder` runs for every run (a diffusion run's tree carries the
section too); `check_image_size` for an autoencoder run
(jaxsd-train-autoencoder), whose images the autoencoder itself downsamples.
A diffusion run's images against a loaded autoencoder:
`jaxsd.models.checks.check_latent_size`.
"""
from jaxsd.autoencoder import training as autoencoder_training
from jaxsd.checks import check_channels, check_choice, check_float, check_int
from jaxsd.errors import ConfigError


def check_autoencoder(config):
  """autoencoder.*: the architecture, the scaling, the losses and the
  discriminator."""
  a = config.autoencoder
  channels = check_channels("autoencoder.block_out_channels",
                            a.block_out_channels)
  check_int("autoencoder.layers_per_block", a.layers_per_block, 1)
  check_int("autoencoder.latent_channels", a.latent_channels, 1)
  check_int("autoencoder.norm_num_groups", a.norm_num_groups, 1)
  bad = [c for c in channels if c % a.norm_num_groups]
  if bad:
    raise ConfigError(
        f"autoencoder.norm_num_groups={a.norm_num_groups} must divide every "
        f"entry of autoencoder.block_out_channels={channels} ({bad} do not).")
  check_float("autoencoder.scaling_factor", a.scaling_factor, 0.0,
              hint="0 = measured when checkpointing")
  check_float("autoencoder.shift_factor", a.shift_factor)
  check_choice("autoencoder.reconstruction_loss", a.reconstruction_loss,
               autoencoder_training.RECONSTRUCTION_LOSSES)
  check_float("autoencoder.kl_weight", a.kl_weight, 0.0)
  check_int("autoencoder.disc_start", a.disc_start, None,
            hint="the discriminator's first step; < 0 = never")
  check_float("autoencoder.disc_weight", a.disc_weight, 0.0)
  check_int("autoencoder.disc_channels", a.disc_channels, 1)
  check_int("autoencoder.disc_layers", a.disc_layers, 1)
  check_int("autoencoder.eval_images", a.eval_images, 2,
            hint="eval/rfid needs a covariance of at least 2 images")


def check_image_size(config):
  """An autoencoder run's data.image_size: a multiple of its downsampling,
  2 per level of autoencoder.block_out_channels after the first (as
  `AutoencoderConfig.downsample_factor`). Call after `check_autoencoder`."""
  factor = 2 ** (len(config.autoencoder.block_out_channels) - 1)
  size = config.data.image_size
  if size % factor:
    raise ConfigError(
        f"data.image_size={size} must be a multiple of {factor}, the "
        "downsampling of autoencoder.block_out_channels="
        f"{tuple(config.autoencoder.block_out_channels)} (2 per level after "
        "the first).")
