"""Text-conditioned UNet (Stable Diffusion layout), NHWC throughout.

A faster replacement for diffusers' `FlaxUNet2DConditionModel`: the same
blocks, numerics and parameter tree (module names and kernel layouts), so
`convert_diffusers_params` is the identity up to unwrapping. What differs is
how it computes:

* NHWC in and out: no layout transposes at the model's edges.
* Attention keeps heads in [B, T, N, H] (no head<->batch transposes) and goes
  through `attention.dot_product_attention`: cuDNN's fused kernel on GPUs
  where it applies, XLA's for short attention, and for long self-attention
  a blocked (flash-style) attention with a recomputing backward pass that
  never holds the [T, S] scores. That is where the CPU train-step speedup
  and memory saving come from (benchmarks/bench_unet.py, bench_memory.py).
* GroupNorm (`group_norm`) reduces its statistics one axis at a time and has
  a hand-written backward pass: XLA:CPU's reductions over several axes are
  slow.

Numerics follow diffusers' Flax classes, including their quirks:
`attention_head_dim` is the number of heads (diffusers issue #2011), GEGLU
uses the tanh approximation of GELU (`flax.linen.gelu`'s default; the PyTorch
UNet uses the exact one), GroupNorm and LayerNorm eps are 1e-5 (PyTorch's
transformer GroupNorm: 1e-6). `UNet.torch_numerics` follows PyTorch in both,
for models loaded from PyTorch weights.

`UNet.remat` trades compute for memory (gradient checkpointing): "blocks"
wraps every down, mid and up block in `flax.linen.remat`, "transformers"
only the spatial transformers; the parameter tree is the same either way.
"""
import functools
import math
from typing import Any, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.ad_checkpoint import checkpoint_name

from jaxsd.models import attention
from jaxsd.models.remat import POLICIES as REMAT_POLICIES
from jaxsd.models.remat import call as _call
from jaxsd.models.remat import remat_call
from jaxsd.models.tied_gradient import Conv
from jaxsd.models.tied_gradient import Dense

Dtype = Any
IntOrTuple = Union[int, Tuple[int, ...]]

_NORM_EPS = 1e-5


def _per_block(value, n: int) -> Tuple[Any, ...]:
  """Broadcasts a scalar setting to one entry per down block."""
  if isinstance(value, (tuple, list)):
    if len(value) != n:
      raise ValueError(f"expected {n} per-block values, got {value!r}")
    return tuple(value)
  return (value,) * n


def _grouped(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """[B, ..., C] as float32 [B, S, G, C/G], or [B, S, C] for one channel
  per group: XLA:CPU reduces a trailing size-1 axis slowly."""
  b, c = x.shape[0], x.shape[-1]
  shape = (b, -1, groups, c // groups) if c > groups else (b, -1, c)
  return x.astype(jnp.float32).reshape(shape)


def _group_mean(v: jnp.ndarray) -> jnp.ndarray:
  """Mean over everything but batch and group, one axis at a time: XLA:CPU
  reduces (S, C/G) together many times slower than S alone
  (benchmarks/README.md, "GroupNorm")."""
  m = jnp.mean(v, axis=1, keepdims=True)
  return jnp.mean(m, axis=3, keepdims=True) if v.ndim == 4 else m


def _group_norm_fwd(x, scale, bias, groups, eps):
  xg = _grouped(x, groups)
  mean = _group_mean(xg)
  # E[x^2] - E[x]^2, as flax's GroupNorm (use_fast_variance) computes it.
  var = jnp.maximum(_group_mean(jnp.square(xg)) - jnp.square(mean), 0.0)
  rstd = jax.lax.rsqrt(var + eps)
  xhat = ((xg - mean) * rstd).reshape(x.shape)
  return xhat * scale + bias, (x, scale, mean, rstd)


def _group_norm_bwd(groups, eps, residuals, d_y):
  del eps
  x, scale, mean, rstd = residuals
  xg = _grouped(x, groups)
  xhat = (xg - mean) * rstd
  d_yg = d_y.astype(jnp.float32).reshape(xg.shape)
  scale_g = scale.astype(jnp.float32).reshape(xg.shape[2:])
  # Per-channel sums over the positions, the scale applied after them (it
  # is constant along them). The sum of a product is an einsum: written
  # as reduce(multiply), XLA:CPU's YNNPACK fusion took 36-47 ms for one
  # SD-sized [1, 4096, 32, 30] operand, against 1.6 as a dot_general
  # (benchmarks/README.md, "GroupNorm's backward").
  rows = "bsgc" if xg.ndim == 4 else "bsc"
  sum_d_y = jnp.sum(d_yg, axis=1)
  sum_d_y_xhat = jnp.einsum(f"{rows},{rows}->{rows.replace('s', '')}",
                            d_yg, xhat)
  count = xg.shape[1] * (xg.shape[3] if xg.ndim == 4 else 1)

  def group_mean(per_channel):  # [B, G, C/G] or [B, C] -> like mean
    total = per_channel * scale_g
    if xg.ndim == 4:
      total = jnp.sum(total, axis=-1, keepdims=True)
    return jnp.expand_dims(total, 1) / count

  d_x = rstd * (d_yg * scale_g - group_mean(sum_d_y)
                - xhat * group_mean(sum_d_y_xhat))
  c = x.shape[-1]
  d_scale = jnp.sum(sum_d_y_xhat.reshape(-1, c), axis=0)
  d_bias = jnp.sum(sum_d_y.reshape(-1, c), axis=0)
  return (d_x.reshape(x.shape).astype(x.dtype), d_scale.astype(scale.dtype),
          d_bias.astype(scale.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
               groups: int, eps: float) -> jnp.ndarray:
  """GroupNorm of x [B, ..., C] (statistics and result in float32), with a
  hand-written backward pass: autodiff of the axis-at-a-time statistics
  gives XLA:CPU a slow reduction layout."""
  return _group_norm_fwd(x, scale, bias, groups, eps)[0]


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """flax.linen.GroupNorm's maths and parameters ("scale", "bias"), computed
  by `group_norm`: on XLA:CPU the MNIST UNet's norms take about two thirds
  of the time of flax's (benchmarks/README.md)."""
  num_groups: int = 32
  epsilon: float = _NORM_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into "
                       f"{self.num_groups} groups; choose norm_num_groups "
                       "that divides every block's channels.")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups,
                      self.epsilon).astype(self.dtype)


def _layer_norm_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  # E[x^2] - E[x]^2, as flax's LayerNorm (use_fast_variance) computes it.
  var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
                    - jnp.square(mean), 0.0)
  rstd = jax.lax.rsqrt(var + eps)
  return (xf - mean) * rstd * scale + bias, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, residuals, d_y):
  del eps
  x, scale, mean, rstd = residuals
  c = x.shape[-1]
  xhat = (x.astype(jnp.float32) - mean) * rstd
  d_y = d_y.astype(jnp.float32)
  scale_f = scale.astype(jnp.float32)
  d_xhat = d_y * scale_f
  # Sums of products as einsums, as in `_group_norm_bwd`: autodiff of
  # flax's LayerNorm reduces products over the channels, 9.1 ms for one
  # [1, 4096, 960] operand on XLA:CPU against 1.15 as an einsum
  # (benchmarks/README.md, "GroupNorm's backward").
  mean_d_xhat = jnp.einsum("...c,c->...", d_y, scale_f)[..., None] / c
  mean_d_xhat_xhat = jnp.einsum("...c,...c->...", d_xhat, xhat)[..., None] / c
  d_x = rstd * (d_xhat - mean_d_xhat - xhat * mean_d_xhat_xhat)
  rows_d_y, rows_xhat = d_y.reshape(-1, c), xhat.reshape(-1, c)
  d_scale = jnp.einsum("nc,nc->c", rows_d_y, rows_xhat)
  return (d_x.astype(x.dtype), d_scale.astype(scale.dtype),
          jnp.sum(rows_d_y, axis=0).astype(scale.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
               eps: float) -> jnp.ndarray:
  """LayerNorm over the last axis (statistics and result in float32), with
  a hand-written backward pass (sums of products as einsums)."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm's maths and parameters ("scale", "bias"),
  computed by `layer_norm`."""
  epsilon: float = _NORM_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def _conv3x3(features: int, dtype: Dtype, name: str, strides: int = 1):
  return Conv(features, kernel_size=(3, 3), strides=(strides, strides),
              padding=((1, 1), (1, 1)), dtype=dtype, name=name)


def timestep_embedding(timesteps: jnp.ndarray, dim: int,
                       flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> jnp.ndarray:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Args:
    timesteps: [B] float.
    dim: even embedding size.
    flip_sin_to_cos: put the cosines first (diffusers' default for SD).
    freq_shift: diffusers' `freq_shift` (downscale_freq_shift).

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  # As diffusers' get_sinusoidal_embeddings, down to the float64 increment.
  log_increment = math.log(1.0e4) / (half - freq_shift)
  inv_timescales = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -log_increment)
  angles = timesteps.astype(jnp.float32)[:, None] * inv_timescales[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  parts = (cos, sin) if flip_sin_to_cos else (sin, cos)
  return jnp.concatenate(parts, axis=-1)


class Upsample2x(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, 2H, 2W, features]."""
    b, h, w, c = x.shape
    # Same values as diffusers' jax.image.resize(..., "nearest") at exactly 2x
    # (source index floor((i + 0.5) / 2) == i // 2), as a broadcast: no
    # gather forward, no scatter-add backward.
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    x = x.reshape(b, 2 * h, 2 * w, c)
    return _conv3x3(self.features, self.dtype, "conv")(x)


class Downsample2x(nn.Module):
  """3x3 conv with stride 2 and padding 1: H -> ceil(H / 2) (28 -> 14 -> 7)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return _conv3x3(self.features, self.dtype, "conv", strides=2)(x)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, timestep embedding added in between."""
  features: int
  norm_num_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray,
               train: bool = False) -> jnp.ndarray:
    """x: [B, H, W, C_in], temb: [B, D] -> [B, H, W, features]."""
    norm = lambda name: GroupNorm(self.norm_num_groups, dtype=self.dtype,
                                  name=name)
    h = nn.swish(norm("norm1")(x))
    h = _conv3x3(self.features, self.dtype, "conv1")(h)
    temb = Dense(self.features, dtype=self.dtype,
                 name="time_emb_proj")(nn.swish(temb))
    h = h + temb[:, None, None, :]
    h = nn.swish(norm("norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(self.features, self.dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, kernel_size=(1, 1), dtype=self.dtype,
               name="conv_shortcut")(x)
    return checkpoint_name(x + h, "resnet_out")


class Attention(nn.Module):
  """Multi-head attention; queries from `x`, keys/values from `context`."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, C], context: [B, S, D] -> [B, T, C]."""
    inner = self.heads * self.dim_head
    dense = lambda name: Dense(inner, use_bias=False, dtype=self.dtype,
                               name=name)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
    q, k, v = (split(dense("to_q")(x)), split(dense("to_k")(context)),
               split(dense("to_v")(context)))
    out = attention.dot_product_attention(q, k, v)
    out = out.reshape(*out.shape[:2], inner)
    out = Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)
    return checkpoint_name(out, "attention_out")


class GEGLU(nn.Module):
  """Dense to 2 * 4 * dim, then value * gelu(gate)."""
  dim: int
  dtype: Dtype = jnp.float32
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = Dense(self.dim * 8, dtype=self.dtype, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    # Tanh-approximate GELU, as diffusers' FlaxGEGLU (nn.gelu's default);
    # the exact one (PyTorch's) with torch_numerics.
    return value * nn.gelu(gate, approximate=not self.exact_gelu)


class FeedForward(nn.Module):
  dim: int
  dtype: Dtype = jnp.float32
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = GEGLU(self.dim, self.dtype, self.exact_gelu, name="net_0")(x)
    return Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention and GEGLU feed-forward."""
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  dtype: Dtype = jnp.float32
  torch_numerics: bool = False
  remat: str = "none"  # a REMAT_POLICIES name

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, C], context: [B, S, D] -> [B, T, C]."""
    ln = lambda name: LayerNorm(epsilon=_NORM_EPS, dtype=self.dtype,
                                name=name)
    attn = lambda name, *args: remat_call(
        self.remat, "attention", _call,
        Attention(self.heads, self.dim_head, self.dtype, name=name), *args)
    h = ln("norm1")(x)
    x = x + attn("attn1", h, context if self.only_cross_attention else h)
    x = x + attn("attn2", ln("norm2")(x), context)
    x = x + FeedForward(x.shape[-1], self.dtype, self.torch_numerics,
                        name="ff")(ln("norm3")(x))
    return x


class SpatialTransformer(nn.Module):
  """GroupNorm, project in, transformer blocks over H*W tokens, project out."""
  heads: int
  depth: int = 1
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  torch_numerics: bool = False
  remat: str = "none"  # a REMAT_POLICIES name

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    """x: [B, H, W, C], context: [B, S, D] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    # PyTorch's Transformer2DModel normalises with eps 1e-6.
    h = GroupNorm(self.norm_num_groups,
                  epsilon=1e-6 if self.torch_numerics else _NORM_EPS,
                  dtype=self.dtype, name="norm")(x)
    # The same matmul either way; the param tree keeps the kernel's shape
    # ([C, C] or [1, 1, C, C]).
    if self.use_linear_projection:
      proj = lambda name: Dense(c, dtype=self.dtype, name=name)
    else:
      proj = lambda name: Conv(c, kernel_size=(1, 1), dtype=self.dtype,
                               name=name)
    h = proj("proj_in")(h).reshape(b, height * width, c)
    for i in range(self.depth):
      h = TransformerBlock(self.heads, c // self.heads,
                           self.only_cross_attention, self.dtype,
                           self.torch_numerics, self.remat,
                           name=f"transformer_blocks_{i}")(h, context)
    h = proj("proj_out")(h.reshape(b, height, width, c))
    return checkpoint_name(x + h, "transformer_out")


class TimestepEmbedding(nn.Module):
  """Dense-SiLU-Dense on the sinusoidal embedding."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, D_in] -> [B, features]."""
    x = Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return Dense(self.features, dtype=self.dtype,
                 name="linear_2")(nn.swish(x))


class _Block(nn.Module):
  """Fields shared by the down, mid and up blocks."""
  features: int
  num_layers: int = 1
  has_attention: bool = True
  heads: int = 8
  depth: int = 1
  only_cross_attention: bool = False
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = "none"  # a REMAT_POLICIES name
  torch_numerics: bool = False

  def resnet(self, name: str) -> ResnetBlock:
    return ResnetBlock(self.features, self.norm_num_groups, self.dropout,
                       self.dtype, name=name)

  def transformer(self, name: str):
    """The spatial transformer `name` as a function of (x, context)."""
    module = SpatialTransformer(
        self.heads, self.depth, self.use_linear_projection,
        self.only_cross_attention, self.norm_num_groups, self.dtype,
        self.torch_numerics, self.remat, name=name)
    return functools.partial(remat_call, self.remat, "transformers", _call,
                             module)


class DownBlock(_Block):
  """(Resnet [+ transformer]) x num_layers, then an optional downsample.

  diffusers' CrossAttnDownBlock2D (has_attention) or DownBlock2D.
  """
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x, temb, context, train: bool = False):
    """Returns the output [B, H', W', features] and the skips it produced."""
    skips = []
    for j in range(self.num_layers):
      x = self.resnet(f"resnets_{j}")(x, temb, train)
      if self.has_attention:
        x = self.transformer(f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2x(self.features, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(_Block):
  """Resnet, transformer, resnet (diffusers' UNetMidBlock2DCrossAttn)."""

  @nn.compact
  def __call__(self, x, temb, context, train: bool = False):
    x = self.resnet("resnets_0")(x, temb, train)
    x = self.transformer("attentions_0")(x, context)
    return self.resnet("resnets_1")(x, temb, train)


class UpBlock(_Block):
  """(Concat skip, resnet [+ transformer]) x num_layers, optional upsample.

  diffusers' CrossAttnUpBlock2D (has_attention) or UpBlock2D.
  """
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x, skips, temb, context, train: bool = False):
    """Consumes `skips` from the end (last skip first)."""
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
      x = self.resnet(f"resnets_{j}")(x, temb, train)
      if self.has_attention:
        x = self.transformer(f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = Upsample2x(self.features, self.dtype, name="upsamplers_0")(x)
    return x


def remat_policy(remat: Union[bool, str]) -> str:
  """`UNet.remat` as one of remat.POLICIES (False -> "none", True ->
  "blocks")."""
  if remat is False or remat is None:
    return "none"
  if remat is True:
    return "blocks"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r}; choose one of "
                     f"{list(REMAT_POLICIES)} (or a bool).")
  return remat


class UNet(nn.Module):
  """Text-conditioned UNet; fields mirror diffusers' UNet2DConditionModel.

  `attention_head_dim` is, as in diffusers, the number of heads per block
  (head size = channels // attention_head_dim). Params are float32; `dtype`
  is the compute dtype. diffusers' Flax UNet hard-codes 32 norm groups, so
  only `norm_num_groups=32` reproduces it. `dropout` applies in the resnets
  only (as PyTorch diffusers' resnets; its Flax UNet also drops out in the
  transformers).

  `remat` (gradient checkpointing) keeps fewer activations for the backward
  pass and recomputes the rest there: "none" (or False, the default) keeps
  them all; "blocks" (or True) keeps only each down/mid/up block's inputs
  and outputs, about one extra forward pass of compute; "transformers"
  recomputes only the spatial transformers (attention and feed-forward),
  which hold most activations at high resolution. Outputs, gradients and
  the parameter tree are the same under every policy.
  """
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  only_cross_attention: Union[bool, Tuple[bool, ...]] = False
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: IntOrTuple = 8
  cross_attention_dim: int = 1280
  norm_num_groups: int = 32
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  use_linear_projection: bool = False
  transformer_layers_per_block: IntOrTuple = 1
  dropout: float = 0.0
  pooled_text_embedding: str = ""  # "" | "mean" | "flatten"
  dtype: Dtype = jnp.float32
  remat: Union[bool, str] = False  # a REMAT_POLICIES name or a bool
  # PyTorch UNet2DConditionModel's numerics where diffusers' Flax UNet
  # (which jaxsd follows by default) differs: exact GELU in GEGLU and eps
  # 1e-6 in the transformers' GroupNorm. Set for PyTorch weights
  # (unet_convert.unet_from_config), so loaded models compute as trained.
  torch_numerics: bool = False

  @nn.compact
  def __call__(self, sample: jnp.ndarray, timesteps: jnp.ndarray,
               encoder_hidden_states: jnp.ndarray,
               train: bool = False) -> jnp.ndarray:
    """Predicts noise (or v, ...) for a noisy batch.

    Args:
      sample: [B, H, W, in_channels] noisy images/latents.
      timesteps: [B] or scalar, int or float.
      encoder_hidden_states: [B, L, cross_attention_dim] text encodings.
      train: enables dropout (needs a 'dropout' rng when dropout > 0).

    Returns:
      [B, H, W, out_channels] float32.
    """
    if encoder_hidden_states.shape[-1] != self.cross_attention_dim:
      raise ValueError(f"encoder_hidden_states {encoder_hidden_states.shape} "
                       f"!= [B, L, {self.cross_attention_dim}]")
    n = len(self.block_out_channels)
    for types in (self.down_block_types, self.up_block_types):
      if len(types) != n:
        raise ValueError(f"{types} and {self.block_out_channels} differ in "
                         "length")
    heads = _per_block(self.attention_head_dim, n)
    cross_only = _per_block(self.only_cross_attention, n)
    depths = _per_block(self.transformer_layers_per_block, n)
    channels = self.block_out_channels
    policy = remat_policy(self.remat)
    # `train` (dropout) is a Python-level choice: closed over, not traced.
    block = functools.partial(remat_call, policy, "blocks",
                              lambda mdl, *args: mdl(*args, train))

    def settings(i):
      return dict(heads=heads[i], depth=depths[i],
                  use_linear_projection=self.use_linear_projection,
                  norm_num_groups=self.norm_num_groups, dropout=self.dropout,
                  dtype=self.dtype, remat=policy,
                  torch_numerics=self.torch_numerics)

    t = jnp.asarray(timesteps, jnp.float32).reshape(-1)
    t = jnp.broadcast_to(t, (sample.shape[0],))
    temb = timestep_embedding(t, channels[0], self.flip_sin_to_cos,
                              self.freq_shift)
    temb = TimestepEmbedding(channels[0] * 4, self.dtype,
                             name="time_embedding")(temb)
    context = encoder_hidden_states.astype(self.dtype)
    if self.pooled_text_embedding:
      pooled = pool_text(context, self.pooled_text_embedding)
      pooled = LayerNorm(epsilon=_NORM_EPS, dtype=self.dtype,
                         name="text_pool_norm")(pooled)
      temb = temb + TimestepEmbedding(channels[0] * 4, self.dtype,
                                      name="text_embedding")(pooled)

    x = _conv3x3(channels[0], self.dtype, "conv_in")(sample.astype(self.dtype))
    skips = [x]
    for i, block_type in enumerate(self.down_block_types):
      x, block_skips = block(DownBlock(
          channels[i], self.layers_per_block,
          has_attention=_has_attention(block_type, "Down"),
          only_cross_attention=cross_only[i], add_downsample=i < n - 1,
          name=f"down_blocks_{i}", **settings(i)), x, temb, context)
      skips.extend(block_skips)

    x = block(MidBlock(channels[-1], name="mid_block", **settings(n - 1)),
              x, temb, context)

    for i, block_type in enumerate(self.up_block_types):
      r = n - 1 - i  # the down block this one mirrors
      num_layers = self.layers_per_block + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      x = block(UpBlock(
          channels[r], num_layers,
          has_attention=_has_attention(block_type, "Up"),
          only_cross_attention=cross_only[r], add_upsample=i < n - 1,
          name=f"up_blocks_{i}", **settings(r)), x, block_skips, temb, context)

    x = GroupNorm(self.norm_num_groups, dtype=self.dtype,
                  name="conv_norm_out")(x)
    x = _conv3x3(self.out_channels, self.dtype, "conv_out")(nn.swish(x))
    return x.astype(jnp.float32)


TEXT_POOLINGS = ("mean", "flatten")  # model.pooled_text_embedding, or "" (off)


def pool_text(context: jnp.ndarray, pooling: str) -> jnp.ndarray:
  """[B, L, D] text encoding -> [B, D] ("mean") or [B, L * D] ("flatten")."""
  if pooling == "mean":
    return context.mean(axis=1)
  if pooling == "flatten":
    return context.reshape(context.shape[0], -1)
  raise ValueError(f"model.pooled_text_embedding={pooling!r}; choose '' "
                   f"(off) or one of {TEXT_POOLINGS}.")


def _has_attention(block_type: str, direction: str) -> bool:
  """"CrossAttn{direction}Block2D" -> True, "{direction}Block2D" -> False."""
  name = block_type.removeprefix("Flax")
  if name == f"CrossAttn{direction}Block2D":
    return True
  if name == f"{direction}Block2D":
    return False
  raise ValueError(f"unsupported {direction.lower()} block type {block_type!r}")


_CONFIG_FIELDS = ("in_channels", "out_channels", "down_block_types",
                  "up_block_types", "only_cross_attention",
                  "block_out_channels", "layers_per_block",
                  "attention_head_dim", "cross_attention_dim",
                  "norm_num_groups", "flip_sin_to_cos", "freq_shift",
                  "use_linear_projection", "transformer_layers_per_block",
                  "dropout")


def unet_from_diffusers_config(cfg: dict, dtype: Dtype = jnp.float32) -> UNet:
  """Builds the UNet a diffusers UNet2DConditionModel config describes.

  Keys this UNet has no use for (sample_size, act_fn, ...) are ignored; ones
  that would change the architecture into something it does not implement
  raise.
  """
  cfg = dict(cfg)
  unsupported = {
      "num_attention_heads": None, "addition_embed_type": None,
      "class_embed_type": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
      "act_fn": "silu", "center_input_sample": False,
  }
  for key, ok in unsupported.items():
    if key in cfg and cfg[key] != ok:
      raise ValueError(f"unsupported diffusers config {key}={cfg[key]!r}")
  kwargs = {k: cfg[k] for k in _CONFIG_FIELDS if k in cfg}
  for k in ("down_block_types", "up_block_types", "block_out_channels",
            "attention_head_dim", "only_cross_attention",
            "transformer_layers_per_block"):
    if isinstance(kwargs.get(k), list):
      kwargs[k] = tuple(kwargs[k])
  return UNet(dtype=dtype, **kwargs)


def convert_diffusers_params(diffusers_params) -> dict:
  """Maps a FlaxUNet2DConditionModel param tree onto `UNet`'s.

  Module names and kernel layouts (HWIO convs, [in, out] denses, [1, 1, I, O]
  projections) already agree, so this only unwraps an optional {"params": ...}
  level, unfreezes and copies.
  """
  params = flax.core.unfreeze(diffusers_params)
  if set(params) == {"params"}:
    params = params["params"]
  return jax.tree_util.tree_map(jnp.asarray, params)
