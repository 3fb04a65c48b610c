"""UNet denoisers behind one interface: NHWC in, NHWC out.

Implementations (config model.implementation): "jaxsd" (models/unet.py, the
default) and "diffusers" (diffusers 0.39 FlaxUNet2DConditionModel, kept as
the reference and the oracle of the equivalence tests).
`build_unet(model_config, cross_attention_dim)` returns an object with
`init(rng, image_shape, context_shape) -> params` and
`apply(params, x [B, H, W, C], t [B], context [B, L, D]) -> [B, H, W, C]`.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from jaxsd import registry

_IMPLEMENTATIONS = registry.Registry("UNet implementation",
                                     "model.implementation")
register_unet = _IMPLEMENTATIONS.register  # class decorator
unet_implementations = _IMPLEMENTATIONS.names
unet_class = _IMPLEMENTATIONS.get  # ValueError naming model.implementation


def compute_dtype(name: str):
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
            "float16": jnp.float16}
  if name not in dtypes:
    raise ValueError(f"model.dtype={name!r}; choose one of {sorted(dtypes)}.")
  return dtypes[name]


def _hashable(value):
  """Per-block settings may arrive as lists (config.json); modules need tuples."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


def architecture_kwargs(model_config, cross_attention_dim: int):
  """The UNet2DConditionModel-style fields both implementations share."""
  return dict(
      in_channels=model_config.in_channels,
      out_channels=model_config.out_channels,
      down_block_types=tuple(model_config.down_block_types),
      up_block_types=tuple(model_config.up_block_types),
      block_out_channels=tuple(model_config.block_out_channels),
      layers_per_block=model_config.layers_per_block,
      attention_head_dim=_hashable(model_config.attention_head_dim),
      only_cross_attention=_hashable(model_config.only_cross_attention),
      cross_attention_dim=cross_attention_dim,
      use_linear_projection=model_config.use_linear_projection)


@register_unet("diffusers")
class DiffusersUNet:
  """diffusers 0.39 FlaxUNet2DConditionModel (NCHW inside; we transpose)."""

  def __init__(self, model_config, cross_attention_dim: int):
    import diffusers  # pylint: disable=g-import-not-at-top
    diffusers.utils.logging.set_verbosity_error()
    if model_config.pooled_text_embedding:
      raise ValueError(
          "model.pooled_text_embedding is a jaxsd UNet feature: set "
          "model.implementation='jaxsd' or model.pooled_text_embedding=''.")
    if model_config.norm_num_groups != 32:
      raise ValueError(
          "The diffusers UNet hard-codes GroupNorm(32): set "
          "model.norm_num_groups=32 (and channels divisible by 32), or "
          "model.implementation='jaxsd'.")
    self._pretrained_params = None
    if model_config.pretrained:
      model, params = diffusers.FlaxUNet2DConditionModel.from_pretrained(
          model_config.pretrained, subfolder="unet",
          dtype=compute_dtype(model_config.dtype))
      self._pretrained_params = params
    else:
      model = diffusers.FlaxUNet2DConditionModel(
          sample_size=32, dtype=compute_dtype(model_config.dtype),
          **architecture_kwargs(model_config, cross_attention_dim))
    self.module = model

  def init(self, rng, image_shape: Tuple[int, ...], context_shape):
    if self._pretrained_params is not None:
      return jax.tree_util.tree_map(jnp.asarray, self._pretrained_params)
    def init_fn(rng):
      x = jnp.zeros((1, image_shape[-1]) + tuple(image_shape[:2]), jnp.float32)
      t = jnp.zeros((1,), jnp.int32)
      ctx = jnp.zeros((1,) + tuple(context_shape), jnp.float32)
      return self.module.init(rng, x, t, ctx)["params"]
    return jax.jit(init_fn)(rng)  # op-by-op init takes tens of seconds

  def apply(self, params, x, t, context):
    x = jnp.transpose(x, (0, 3, 1, 2))
    out = self.module.apply({"params": params}, x, t, context).sample
    return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)


@register_unet("jaxsd")
class JaxsdUNet:
  """jaxsd's own NHWC UNet (models/unet.py): diffusers' architecture and
  parameter tree, several times faster to train on CPU."""

  def __init__(self, model_config, cross_attention_dim: int):
    # pylint: disable-next=g-import-not-at-top
    from jaxsd.models import unet, unet_convert
    self._pretrained_params = None
    dtype = compute_dtype(model_config.dtype)
    if model_config.pretrained:
      # A diffusers UNet folder (or a pipeline folder's unet/) with PyTorch
      # weights, converted by name; Flax-only folders (msgpack) go through
      # diffusers' Flax loader as before.
      import os  # pylint: disable=g-import-not-at-top
      if model_config.pooled_text_embedding:
        raise ValueError(
            "model.pooled_text_embedding adds parameters a pretrained "
            "diffusers UNet does not have: set model.pooled_text_embedding='' "
            "with model.pretrained.")
      folder = unet_convert.unet_folder(model_config.pretrained)
      flax_weights = os.path.join(folder, unet_convert.FLAX_WEIGHTS)
      if (not unet_convert.has_torch_weights(folder)
          and os.path.isfile(flax_weights)):
        import diffusers  # pylint: disable=g-import-not-at-top
        diffusers.utils.logging.set_verbosity_error()
        _, params = diffusers.FlaxUNet2DConditionModel.from_pretrained(folder)
        self.module = unet_convert.unet_from_config(
            unet_convert.load_config(folder)[1], dtype,
            os.path.join(folder, "config.json"), torch_numerics=False)
        self._pretrained_params = unet.convert_diffusers_params(params)
        unet_convert.check_fits(self._pretrained_params,
                                unet_convert.param_shapes(self.module),
                                flax_weights, "UNet")
      else:
        self.module, self._pretrained_params = unet_convert.load_diffusers(
            folder, dtype)
      if self.module.cross_attention_dim != cross_attention_dim:
        raise ValueError(
            f"model.pretrained={model_config.pretrained!r} has "
            f"cross_attention_dim={self.module.cross_attention_dim}, but the "
            f"text encoder gives {cross_attention_dim}-dimensional states; "
            "choose a text encoder of that width.")
    else:
      self.module = unet.UNet(
          norm_num_groups=model_config.norm_num_groups, dtype=dtype,
          pooled_text_embedding=model_config.pooled_text_embedding,
          **architecture_kwargs(model_config, cross_attention_dim))
    # Gradient checkpointing changes how, not what, it computes: the same
    # parameters, loaded or fresh.
    remat = unet.remat_policy(model_config.get("remat", "none"))
    if remat != "none":
      self.module = self.module.clone(remat=remat)

  def init(self, rng, image_shape: Tuple[int, ...], context_shape):
    if self._pretrained_params is not None:
      return jax.tree_util.tree_map(jnp.asarray, self._pretrained_params)
    def init_fn(rng):
      x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
      t = jnp.zeros((1,), jnp.int32)
      ctx = jnp.zeros((1,) + tuple(context_shape), jnp.float32)
      return self.module.init(rng, x, t, ctx)["params"]
    return jax.jit(init_fn)(rng)

  def apply(self, params, x, t, context):
    return self.module.apply({"params": params}, x, t, context)


def build_unet(model_config, cross_attention_dim: int):
  cls = unet_class(model_config.implementation)
  return cls(model_config, cross_attention_dim)
