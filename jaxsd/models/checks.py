"""The model.* section of a run's config (the UNet and its LoRA): valid
ranges, and the image size the UNet's levels can halve.

`check_model(config)` runs before anything is built. A latent run's size
depends on its autoencoder's downsampling, known once it is loaded:
`check_latent_size(config, factor)` then. The sides of sampled images
(sampling.height / sampling.width, jaxsd-sample's --height / --width) are
multiples of `size_multiple(config, factor)`: `check_sample_side`.
"""
from jaxsd import models
from jaxsd.checks import (check_channels, check_choice, check_float,
                          check_int, is_int, wrapped)
from jaxsd.data import buckets
from jaxsd.errors import ConfigError
from jaxsd.models import lora
from jaxsd.models import unet


def unet_levels(config) -> int:
  """Resolution levels of the UNet (len(model.block_out_channels)): it halves
  the size at each but the last."""
  return len(config.model.block_out_channels)


def _unet_divisor(config) -> int:
  return 2 ** (unet_levels(config) - 1)


def is_latent_run(config) -> bool:
  """The UNet denoises latents (model.autoencoder, or a pipeline that brings
  one), not the images themselves."""
  m = config.model
  return bool(m.autoencoder or m.get("pretrained_pipeline", ""))


def size_multiple(config, factor: int = 1) -> int:
  """What a side of the images a run makes must be a multiple of, in pixels:
  the UNet's 2**(levels - 1) (it halves the size at each level but the
  last), times the autoencoder's downsampling `factor` in latent runs."""
  return factor * _unet_divisor(config)


def check_sample_side(config, key: str, value, factor: int = 1,
                      default_ok: bool = False) -> int:
  """One side (pixels) of the images a run samples: a positive multiple of
  `size_multiple(config, factor)`; with default_ok also 0 (= data.image_size,
  the config's sampling.height / sampling.width). key names it in the error
  ("sampling.height", "--width"). Returns the side in pixels."""
  check_int(key, value, 0 if default_ok else 1,
            hint=("pixels; 0 = data.image_size" if default_ok else "pixels"))
  if default_ok and value == 0:
    return config.data.image_size
  multiple = size_multiple(config, factor)
  if value % multiple:
    levels = unet_levels(config)
    why = (f"the UNet halves it at each of its {levels} levels but the last: "
           f"model.block_out_channels={tuple(config.model.block_out_channels)}")
    if factor > 1:
      why = (f"the autoencoder downsamples {factor}x, then the UNet's "
             f"{levels} levels halve the latents {levels - 1} times")
    fits = max(multiple, round(value / multiple) * multiple)
    raise ConfigError(f"{key}={value} must be a multiple of {multiple} "
                      f"({why}); e.g. {key}={fits}.")
  return value


def check_bucket_sides(config, factor: int = 1):
  """data.buckets against the model: every side a multiple of the UNet's
  2**(levels - 1) times the autoencoder's downsampling `factor` (1 in pixel
  space), and no more buckets than data.max_buckets. Returns the shapes
  (None with buckets off)."""
  shapes = wrapped("data.buckets", buckets.shapes_of, config, factor)
  if shapes is None:
    return None
  multiple = buckets.model_multiple(config, factor)
  bad = [s for s in shapes if s[0] % multiple or s[1] % multiple]
  if bad:
    why = (f"the autoencoder downsamples {factor}x and the UNet "
           if factor > 1 else "the UNet ")
    h, w = bad[0]
    fix = (max(multiple, round(h / multiple) * multiple),
           max(multiple, round(w / multiple) * multiple))
    raise ConfigError(
        f"data.buckets={config.data.buckets!r}: the bucket {h}x{w} has a "
        f"side that is not a multiple of {multiple} ({why}halves it at each "
        f"of its {unet_levels(config)} levels but the last); e.g. "
        f"{fix[0]}x{fix[1]}.")
  limit = config.data.get("max_buckets", 32)
  if len(shapes) > limit:
    raise ConfigError(
        f"data.buckets={config.data.buckets!r} makes {len(shapes)} buckets, "
        f"more than data.max_buckets={limit} (each compiles its own train "
        "step); lower data.bucket_max_aspect, list fewer buckets or raise "
        "data.max_buckets.")
  return shapes


def check_latent_size(config, factor: int) -> int:
  """A latent run's image size against its autoencoder: data.image_size
  must divide by the autoencoder's downsampling `factor`, and the latent size
  image_size / factor by the UNet's 2**(levels - 1); so must the sampled
  sides sampling.height / sampling.width (0 = data.image_size). Call once the
  autoencoder is loaded (its factor is then known); returns the latent size.
  """
  size = config.data.image_size
  check_int("data.image_size", size, 1)
  if factor < 1 or size % factor:
    raise ConfigError(
        f"data.image_size={size} does not divide by the autoencoder's "
        f"downsampling factor {factor} (model.autoencoder="
        f"{config.model.autoencoder!r}); choose a multiple of {factor}.")
  latent_size = size // factor
  divisor = _unet_divisor(config)
  check_bucket_sides(config, factor)
  if latent_size % divisor:
    multiple = factor * divisor
    raise ConfigError(
        f"data.image_size={size} gives {latent_size}x{latent_size} latents "
        f"(the autoencoder downsamples {factor}x), which the UNet's "
        f"{unet_levels(config)} levels (model.block_out_channels="
        f"{tuple(config.model.block_out_channels)}) cannot halve "
        f"{unet_levels(config) - 1} times; data.image_size must be a multiple "
        f"of {multiple} (e.g. {max(multiple, round(size / multiple) * multiple)}"
        ").")
  for key in ("height", "width"):
    check_sample_side(config, f"sampling.{key}",
                      config.sampling.get(key, 0), factor, default_ok=True)
  return latent_size


def check_model(config):
  """model.*: the implementation, its architecture, LoRA and remat; a
  pixel-space UNet's channels and levels against data.num_channels and
  data.image_size (a latent run's: `check_latent_size`)."""
  m = config.model
  wrapped("model.implementation", models.unet_class, m.implementation)
  wrapped("model.dtype", models.compute_dtype, m.dtype)
  # Latent runs (an autoencoder, or a pipeline that brings one): the UNet
  # sees latents, checked by check_latent_size once the autoencoder loads.
  latent = is_latent_run(config)
  check_int("model.in_channels", m.in_channels, 1)
  check_int("model.out_channels", m.out_channels, 1)
  channels = check_channels("model.block_out_channels", m.block_out_channels)
  check_int("model.layers_per_block", m.layers_per_block, 1)
  heads = m.attention_head_dim
  if is_int(heads):
    check_int("model.attention_head_dim", heads, 1,
              hint="heads per block (diffusers' naming)")
  else:
    check_channels("model.attention_head_dim", heads)
  check_int("model.norm_num_groups", m.norm_num_groups, 1)
  if m.implementation == "jaxsd":
    bad = [c for c in channels if c % m.norm_num_groups]
    if bad:
      raise ConfigError(
          f"model.norm_num_groups={m.norm_num_groups} must divide every entry "
          f"of model.block_out_channels={channels} ({bad} do not split into "
          "that many groups).")
  n_blocks = len(channels)
  for key in ("down_block_types", "up_block_types"):
    if len(m[key]) != n_blocks:
      raise ConfigError(
          f"model.{key} has {len(m[key])} entries but "
          f"model.block_out_channels has {n_blocks}; give one per level.")
  if not latent and config.data.num_channels != m.in_channels:
    raise ConfigError(
        f"data.num_channels={config.data.num_channels} but "
        f"model.in_channels={m.in_channels}: a pixel-space UNet "
        "denoises the images themselves; set both to 1 (grey) or 3 (RGB).")
  if not latent:
    check_bucket_sides(config)
    divisor = _unet_divisor(config)
    size = config.data.image_size
    if size % divisor:
      fits = max(divisor, round(size / divisor) * divisor)
      raise ConfigError(
          f"data.image_size={size} must be a multiple of {divisor} (the UNet "
          f"halves it at each of its {n_blocks} levels but the last: "
          f"model.block_out_channels={channels}); e.g. data.image_size="
          f"{fits}, or use fewer levels.")
  pooling = m.pooled_text_embedding
  if pooling and pooling not in unet.TEXT_POOLINGS:
    raise ConfigError(f"model.pooled_text_embedding={pooling!r}; choose '' "
                      f"(off) or one of {unet.TEXT_POOLINGS}.")
  lora_config = m.get("lora")
  if lora_config is not None:
    check_int("model.lora.rank", lora_config.rank, 0,
              hint="0 = no LoRA, full training")
    check_float("model.lora.alpha", lora_config.alpha, 0.0,
                hint="the update is scaled by alpha / rank; 0 = rank")
    check_float("model.lora.dropout", lora_config.dropout, 0.0, 1.0,
                high_open=True)
    check_choice("model.lora.base_dtype",
                 lora_config.get("base_dtype", "float32"),
                 sorted(lora.BASE_DTYPES))
  wrapped("model.lora", lora.from_config, lora_config)  # targets, base_dtype
  remat = wrapped("model.remat", unet.remat_policy, m.get("remat", "none"))
  if remat != "none" and m.implementation != "jaxsd":
    raise ConfigError(f"model.remat={remat!r} is a jaxsd UNet feature; set "
                      "model.implementation='jaxsd' or model.remat='none'.")
