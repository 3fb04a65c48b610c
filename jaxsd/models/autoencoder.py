"""jaxsd's KL autoencoder (VAE): diffusers' AutoencoderKL in Flax, NHWC.

The architecture and config fields are diffusers' (`block_out_channels`,
`layers_per_block`, `latent_channels`, `norm_num_groups`, the mid block's
attention, `scaling_factor`, `shift_factor`, the quant convs), and module
names mirror its PyTorch parameter names (`encoder.down_blocks.0.resnets.1.
conv1.weight` is `encoder/down_blocks_0/resnets_1/conv1/kernel`), so its
PyTorch weights convert by name (`convert_diffusers_weights`), with no
Flax class from diffusers in the path.

`AutoencoderKL.encode(x [B, H, W, C] in [-1, 1]) -> (mean, logvar)`, each
[B, H/f, W/f, latent_channels] with f = 2^(len(block_out_channels) - 1);
`decode(z) -> [B, H, W, out_channels]`. Diffusion works on
`(z - shift_factor) * scaling_factor` (`to_diffusion` / `from_diffusion`).
"""
import dataclasses
import json
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.models import torch_weights
from jaxsd.models.tied_gradient import Conv
from jaxsd.models.tied_gradient import Dense
from jaxsd.models.unet import GroupNorm, Upsample2x

Dtype = Any
_EPS = 1e-6  # diffusers' VAE norms (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """diffusers' AutoencoderKL config fields that jaxsd implements."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  sample_size: int = 32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
    if image_size % self.downsample_factor:
      raise ValueError(
          f"data.image_size={image_size} does not divide by the autoencoder's "
          f"downsampling factor {self.downsample_factor}; choose a multiple of "
          f"{self.downsample_factor}.")
    s = image_size // self.downsample_factor
    return (s, s, self.latent_channels)

  def to_diffusers(self) -> Dict[str, Any]:
    """The config.json diffusers' AutoencoderKL reads."""
    n = len(self.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(self.block_out_channels),
        "layers_per_block": self.layers_per_block, "act_fn": "silu",
        "latent_channels": self.latent_channels,
        "norm_num_groups": self.norm_num_groups,
        "sample_size": self.sample_size,
        "scaling_factor": self.scaling_factor,
        "shift_factor": self.shift_factor or None,
        "mid_block_add_attention": self.mid_block_add_attention,
        "use_quant_conv": self.use_quant_conv,
        "use_post_quant_conv": self.use_post_quant_conv,
        "force_upcast": True,
    }


# Fields of a diffusers config.json: the value jaxsd needs, or None = any.
_REQUIRED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path",
            "force_upcast", "sample_size")


def config_from_diffusers(cfg: Dict[str, Any], source: str = "config.json"
                          ) -> AutoencoderConfig:
  """An AutoencoderConfig from diffusers' AutoencoderKL config; fields that
  would need an architecture jaxsd does not implement are refused."""
  cfg = dict(cfg)
  name = cfg.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ValueError(f"{source} describes a {name!r}; jaxsd reads "
                     "AutoencoderKL (a KL VAE) only.")
  for key, want in _REQUIRED.items():
    if key in cfg and cfg[key] != want and not (want is None and
                                                cfg[key] is None):
      raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported "
                       f"(jaxsd's AutoencoderKL needs {want!r}).")
  for key in ("down_block_types", "up_block_types"):
    want = "DownEncoderBlock2D" if key.startswith("down") else "UpDecoderBlock2D"
    bad = [b for b in cfg.get(key, ()) if b != want]
    if bad:
      raise ValueError(f"{source}: {key} has {bad}; jaxsd's AutoencoderKL "
                       f"implements {want} only.")
  fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
  unknown = set(cfg) - fields - set(_REQUIRED) - set(_IGNORED) - {
      "down_block_types", "up_block_types"}
  if unknown:
    raise ValueError(f"{source}: fields {sorted(unknown)} are not supported "
                     "by jaxsd's AutoencoderKL.")
  kwargs = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
  if "block_out_channels" in kwargs:
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
  n = len(kwargs.get("block_out_channels", (64,)))
  for key in ("down_block_types", "up_block_types"):
    if key in cfg and len(cfg[key]) != n:
      raise ValueError(f"{source}: {len(cfg[key])} {key} for {n} "
                       "block_out_channels.")
  kwargs["shift_factor"] = float(kwargs.get("shift_factor") or 0.0)
  if "scaling_factor" in kwargs:
    kwargs["scaling_factor"] = float(kwargs["scaling_factor"])
  return AutoencoderConfig(**kwargs)


def config_from_dict(d: Dict[str, Any]) -> AutoencoderConfig:
  """An AutoencoderConfig from its own fields (jaxsd's config tree)."""
  d = dict(d)
  d["block_out_channels"] = tuple(d["block_out_channels"])
  return AutoencoderConfig(**d)


# --- Modules -----------------------------------------------------------------


def _conv(features: int, dtype, name: str, kernel: int = 3, strides: int = 1,
          padding=None):
  pad = kernel // 2
  return Conv(features, (kernel, kernel), strides=(strides, strides),
              padding=padding if padding is not None else
              ((pad, pad), (pad, pad)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding."""
  features: int
  norm_num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: GroupNorm(self.norm_num_groups, epsilon=_EPS,
                                  dtype=self.dtype, name=name)
    h = _conv(self.features, self.dtype, "conv1")(nn.swish(norm("norm1")(x)))
    h = _conv(self.features, self.dtype, "conv2")(nn.swish(norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, self.dtype, "conv_shortcut", kernel=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """The mid block's single-head spatial self-attention (diffusers'
  Attention with group norm and a residual), softmax in float32."""
  norm_num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = GroupNorm(self.norm_num_groups, epsilon=_EPS, dtype=self.dtype,
                  name="group_norm")(x).reshape(b, h * w, c)
    dense = lambda name: Dense(c, dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
    scores = jnp.einsum("btc,bsc->bts", q, k).astype(jnp.float32) / np.sqrt(c)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = dense("to_out_0")(jnp.einsum("bts,bsc->btc", weights, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  norm_num_groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.norm_num_groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.norm_num_groups, self.dtype,
                         name="attentions_0")(x)
    return ResnetBlock(c, self.norm_num_groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Pad right and bottom by one, then a stride-2 3x3 conv (diffusers'
  Downsample2D with padding=0): H -> H / 2 for even H."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.features, self.dtype, "conv", strides=2,
                 padding="VALID")(x)


class Encoder(nn.Module):
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = _conv(cfg.block_out_channels[0], self.dtype, "conv_in")(x)
    last = len(cfg.block_out_channels) - 1
    for i, features in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(features, cfg.norm_num_groups, self.dtype,
                        name=f"down_blocks_{i}_resnets_{j}")(x)
      if i != last:
        x = Downsample(features, self.dtype,
                       name=f"down_blocks_{i}_downsamplers_0")(x)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention,
                 self.dtype, name="mid_block")(x)
    x = nn.swish(GroupNorm(cfg.norm_num_groups, epsilon=_EPS,
                           dtype=self.dtype, name="conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    channels = tuple(reversed(cfg.block_out_channels))
    x = _conv(channels[0], self.dtype, "conv_in")(z)
    x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention,
                 self.dtype, name="mid_block")(x)
    for i, features in enumerate(channels):
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(features, cfg.norm_num_groups, self.dtype,
                        name=f"up_blocks_{i}_resnets_{j}")(x)
      if i != len(channels) - 1:
        x = Upsample2x(features, self.dtype,
                       name=f"up_blocks_{i}_upsamplers_0")(x)
    x = nn.swish(GroupNorm(cfg.norm_num_groups, epsilon=_EPS,
                           dtype=self.dtype, name="conv_norm_out")(x))
    return _conv(cfg.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """encode -> (mean, logvar); decode(latents) -> images; __call__ (for
  init and training) -> (reconstruction of a posterior sample, mean,
  logvar)."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, self.dtype,
                              "quant_conv", kernel=1)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, self.dtype,
                                   "post_quant_conv", kernel=1)

  def encode(self, x):
    """x [B, H, W, C] in [-1, 1] -> (mean, logvar), float32."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """Latents [B, h, w, latent_channels] -> images (float32, unclipped)."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x, rng=None):
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return self.decode(z), mean, logvar


def sample_posterior(rng, mean, logvar):
  """mean + std * N(0, 1): a draw from the diagonal Gaussian posterior."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape,
                                                          mean.dtype)


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements [B]."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                       axis=tuple(range(1, mean.ndim)))


def to_diffusion(z, config: AutoencoderConfig):
  """Autoencoder latents -> the space diffusion runs in."""
  return (z - config.shift_factor) * config.scaling_factor


def from_diffusion(x, config: AutoencoderConfig):
  return x / config.scaling_factor + config.shift_factor


def init_params(module: AutoencoderKL, rng, image_size: int):
  x = jnp.zeros((1, image_size, image_size, module.config.in_channels))
  return jax.jit(module.init)(rng, x)["params"]


# --- diffusers' PyTorch weights ----------------------------------------------

# Attention names of checkpoints written before diffusers' Attention class
# (diffusers renames them when loading too).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                     "proj_attn": "to_out.0"}


def _rename(key: str) -> str:
  parts = key.split(".")
  if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
    parts[-2:-1] = _LEGACY_ATTENTION[parts[-2]].split(".")
  # Encoder / decoder blocks are flat modules here ("down_blocks_0_resnets_1").
  for prefix in ("down_blocks", "up_blocks"):
    if len(parts) > 4 and parts[1] == prefix:
      parts[1:5] = ["_".join(parts[1:5])]
  return ".".join(parts)


def convert_diffusers_weights(state_dict: Dict[str, np.ndarray],
                              config: AutoencoderConfig,
                              source: str = "the state dict") -> dict:
  """diffusers' AutoencoderKL PyTorch state dict -> AutoencoderKL params.

  Every expected parameter must be present with its shape, and nothing
  else: a mismatch is an error naming the keys (the usual cause: a
  config.json that does not describe these weights).
  """
  fixed = {}
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    # Pre-diffusers attention used 1x1 convs where diffusers has linears.
    if ".attentions." in key and key.endswith("weight") and value.ndim == 4:
      value = value[:, :, 0, 0]
    fixed[key] = value
  tree = torch_weights.to_flax_tree(fixed, rename=_rename)
  expected = jax.eval_shape(lambda: init_params(
      AutoencoderKL(config), jax.random.key(0), 8 * config.downsample_factor))
  flat_want = _flatten(expected)
  flat_got = _flatten(tree)
  # Messages name the PyTorch keys and shapes: those are what the reader has.
  missing = sorted(_torch_key(p) for p in set(flat_want) - set(flat_got))
  extra = sorted(_torch_key(p) for p in set(flat_got) - set(flat_want))
  if missing or extra:
    raise ValueError(
        f"The weights of {source} do not fit the AutoencoderKL its config "
        f"describes: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
        f", unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}.")
  for name, want in flat_want.items():
    if flat_got[name].shape != want.shape:
      raise ValueError(
          f"{source}: {_torch_key(name)} has shape "
          f"{torch_weights.torch_shape(name, flat_got[name].shape)}, the "
          f"config needs {torch_weights.torch_shape(name, want.shape)}.")
  return jax.tree_util.tree_map(jnp.asarray, tree)


def _torch_key(path: Tuple[str, ...]) -> str:
  """A Flax param path -> its diffusers PyTorch key: ("encoder",
  "down_blocks_0_resnets_1", "conv1", "kernel") -> "encoder.down_blocks.0.
  resnets.1.conv1.weight"; to_out_0 -> to_out.0."""
  *module, leaf = path
  names = [re.sub(r"_(\d+)(_|$)",
                  lambda m: "." + m.group(1) + ("." if m.group(2) else ""),
                  name) for name in module]
  return ".".join(names + ["weight" if leaf in ("kernel", "scale") else leaf])


def to_diffusers_weights(params) -> Dict[str, np.ndarray]:
  """AutoencoderKL params -> diffusers' PyTorch state dict (export)."""
  return {_torch_key(path): torch_weights.to_torch_layout(path, value)
          for path, value in _flatten(params).items()}


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def vae_folder(path: str) -> Optional[str]:
  """The diffusers AutoencoderKL folder at `path`: the folder itself, or
  the `vae/` of a pipeline folder; None if neither."""
  for folder in (path, os.path.join(path, "vae")):
    cfg = os.path.join(folder, "config.json")
    if os.path.isfile(cfg) and torch_weights.weight_file(folder):
      return folder
  return None


def load_config(folder: str) -> AutoencoderConfig:
  """The AutoencoderConfig of a diffusers `vae/` folder's config.json."""
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    return config_from_diffusers(json.load(f), path)


def save_diffusers(config: AutoencoderConfig, params, folder: str,
                   sample_size: Optional[int] = None):
  """Writes `folder/config.json` and `diffusion_pytorch_model.safetensors`,
  a folder diffusers' `AutoencoderKL.from_pretrained` (and `load_diffusers`)
  loads."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  cfg = config.to_diffusers()
  if sample_size:
    cfg["sample_size"] = int(sample_size)
  save_file(to_diffusers_weights(params),
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)


def load_diffusers(folder: str, dtype: Dtype = jnp.float32
                   ) -> Tuple[AutoencoderKL, dict]:
  """(module, params) of a diffusers `vae/` folder (config.json plus
  diffusion_pytorch_model.safetensors or .bin)."""
  config = load_config(folder)
  params = convert_diffusers_weights(torch_weights.read_weights(folder),
                                     config, folder)
  return AutoencoderKL(config, dtype), params


def check_fits(config: AutoencoderConfig, unet_in: int, unet_out: int,
               source: str):
  """The UNet's channels must be the latent channels."""
  c = config.latent_channels
  if unet_in != c or unet_out != c:
    raise ValueError(
        f"The autoencoder {source} has latent_channels={c}, but the UNet has "
        f"model.in_channels={unet_in} and model.out_channels={unet_out}; set "
        f"both to {c}.")
  if not np.isfinite(config.scaling_factor) or config.scaling_factor <= 0:
    raise ValueError(
        f"The autoencoder {source} has scaling_factor="
        f"{config.scaling_factor}; it must be a positive number (SD 1.x: "
        "0.18215; a jaxsd autoencoder measures it when it trains).")


def image_shape(config: AutoencoderConfig, image_size: int) -> Sequence[int]:
  return (image_size, image_size, config.out_channels)
