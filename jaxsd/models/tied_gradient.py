"""Convolutions and dense layers whose backward passes read their
operands only once the incoming gradient has arrived (XLA:CPU memory).

XLA:CPU computes a convolution's input gradient with the kernel flipped
and transposed into a buffer of its own. That buffer depends only on the
parameters, so the scheduler is free to build it early, and it does:
kernels' transposed copies were built before the backward pass reached
their layers and held until it did. Tied, an SD-1.5-sized UNet's step
plans half the temporaries without remat (LoRA 4.69 -> 2.34 GB, full
fine-tune 5.35 -> 3.04 GB), and remat can leave the parameters untied
(models/remat.py). `conv_general_dilated` here is
`lax.conv_general_dilated` with a custom VJP whose backward pass
differentiates the same op at operands tied to the incoming gradient
(`tie`: plus `0 * g[0]`, which XLA cannot fold for floats): the copy
cannot be built before its layer's gradient exists, and is freed right
after. The forward pass is the plain op and the gradients are its
gradients. Other backends use the plain op (the early copies were seen
on XLA:CPU only). Matmuls in their kernel's dtype stay plain: tying them
too changed no plan (SD-1.5 LoRA with remat: 1.14 GB of temporaries
either way).

Lower-precision compute (`model.dtype` bfloat16 over float32 parameters):
flax casts a layer's kernel before calling its op, and that cast depends
on the parameter only, so XLA computes it once and keeps the cast copy
from the forward pass to the backward pass (and CSE hands remat's
recomputation the same copy): SD-1.5 LoRA planned 5.30 GB of temporaries
at bf16 against 2.34 GB at f32, with or without remat. `Conv` and `Dense`
here leave the kernel in its own dtype (`promote_dtype`) and cast it
inside the op: the forward pass's copy is dead after its layer, and the
backward pass casts the kernel again from a copy tied to the incoming
gradient, so that cast is made when the layer's gradient exists and
freed after it. SD-1.5 at bf16 now plans LoRA 4.02 GB without remat and
3.64 GB with "blocks", full fine-tune 4.48 / 3.64 GB (5.30-5.59 GB
before). bf16 stays above f32 on this backend: XLA:CPU runs a bf16
convolution in f32 on converted copies of its operands.

Small, wide convolutions (SD-1.5's 16x16 and 8x8 levels at batch 1) take
their input gradient from one matmul over the kernel as it lies, then
col2im (`conv_input_gradient_by_matmul`): no flipped copy is built at all,
and on XLA:CPU that copy was most of the gradient's time there.

Figures: benchmarks/README.md, "Operands tied to the incoming gradient",
"Kernels cast inside the op" and "Input gradients of small, wide
convolutions".
"""
import functools
from typing import Any

import flax.linen as nn
from flax.linen import dtypes
import jax
from jax import lax
import jax.numpy as jnp


def tie(tree, like) -> Any:
  """`tree` with each floating leaf plus `0 * like[0]`: the same values,
  computed only once `like` (a gradient, any pytree of arrays) exists."""
  first = jax.tree_util.tree_leaves(like)[0]
  zero = jnp.ravel(first)[0].astype(jnp.float32) * 0
  return jax.tree_util.tree_map(
      lambda r: (r + zero.astype(r.dtype)
                 if jnp.issubdtype(r.dtype, jnp.floating) else r), tree)


def promote_dtype(inputs, kernel, bias=None, *, dtype=None,
                  inexact=True) -> list:
  """flax's `promote_dtype` for (inputs, kernel, bias), but the kernel
  keeps its own dtype: `conv_general_dilated` and `dot_general` cast it to
  the inputs' dtype inside the op (see the module docstring)."""
  inputs, _, bias = dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype,
                                         inexact=inexact)
  return [inputs, kernel, bias]


def _tied_op(op, lhs, rhs, tie_lhs: bool, input_gradient=None):
  """op(lhs, rhs cast to lhs's dtype), with a custom VJP on CPU whose
  backward pass differentiates it at rhs (and lhs if `tie_lhs`) tied to
  the incoming gradient. `input_gradient(g, rhs)`, where given, computes
  lhs's gradient instead (and needs no tie: it reads rhs as it is)."""
  dtype = lhs.dtype
  apply = lambda x, w: op(x, w.astype(dtype))
  if jax.default_backend() != "cpu" or (not tie_lhs and rhs.dtype == dtype):
    return apply(lhs, rhs)

  @jax.custom_vjp
  def tied(x, w):
    return apply(x, w)

  def forward(x, w):
    return apply(x, w), (x, w)

  def backward(operands, g):
    x, w = operands
    tied_x = tie(x, g) if tie_lhs else x
    if input_gradient is not None:
      # The kernel's gradient alone (dead code, so dropped, for a frozen
      # kernel); the input's from the matmul, which reads the kernel in
      # place, or from a cast made only now (tied) where it computes in
      # another dtype.
      d_w = jax.vjp(lambda w_: apply(tied_x, w_), w)[1](g)[0]
      kernel = w if w.dtype == dtype else tie(w, g).astype(dtype)
      return input_gradient(g, kernel).astype(x.dtype), d_w
    return jax.vjp(apply, tied_x, tie(w, g))[1](g)

  tied.defvjp(forward, backward)
  return tied(lhs, rhs)


# A convolution's input gradient goes through one matmul, not a flipped
# kernel, where the kernel outweighs the gradient: output channels at least
# MATMUL_INPUT_GRADIENT_RATIO times the output positions (SD-1.5 at 64x64
# latents, batch 1: the 16x16 and 8x8 levels). There XLA:CPU's
# convolution path spends most of its time copying the kernel flipped and
# transposed (3x3x2560x1280: 118 MB); on 2 AVX2 cores the matmul took
# 18-37 ms against 90-270 at 8x8 and 72-166 against 138-377 at 16x16,
# level at 2.5 and slower below (benchmarks/README.md, "Input gradients
# of small, wide convolutions").
MATMUL_INPUT_GRADIENT_RATIO = 4

_NHWC = ("NHWC", "HWIO", "NHWC")


def _pads(padding, in_sizes, kernel_sizes):
  if isinstance(padding, str):
    return lax.padtype_to_pads(in_sizes, kernel_sizes, (1,) * len(in_sizes),
                               padding)
  return [tuple(p) for p in padding]


def conv_input_gradient_by_matmul(g, w, pads):
  """lhs's gradient of a stride-1, undilated NHWC x HWIO convolution with
  explicit `pads` [(low, high)] per spatial axis, from its output's
  gradient g [B, H', W', O]: Y = W[tap, i, :] . g[m, :] as one
  [taps * I, O] x [O, B H' W'] matmul over the kernel in place (no flipped
  copy), then each input position sums its taps' rows of Y (col2im).
  g and w in one dtype; float32 accumulation; returns [B, H, W, I]
  float32."""
  b, ho, wo, o = g.shape
  kh, kw, i, _ = w.shape
  (plo_h, phi_h), (plo_w, phi_w) = pads
  h, wd = ho - plo_h - phi_h + kh - 1, wo - plo_w - phi_w + kw - 1
  y = jnp.einsum("tio,mo->tim", w.reshape(kh * kw, i, o),
                 g.reshape(b * ho * wo, o),
                 preferred_element_type=jnp.float32)
  y = y.reshape(kh, kw, i, b, ho, wo)
  # Input row p takes tap dh from output row p + low - dh: padded so that
  # each tap's rows are one slice.
  y = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, 0),
                  (kh - 1 - plo_h, kh - 1 - phi_h),
                  (kw - 1 - plo_w, kw - 1 - phi_w)))
  d_x = sum(y[dh, dw, :, :, kh - 1 - dh:kh - 1 - dh + h,
              kw - 1 - dw:kw - 1 - dw + wd]
            for dh in range(kh) for dw in range(kw))
  return jnp.transpose(d_x, (1, 2, 3, 0))


def _matmul_input_gradient(lhs, rhs, window_strides, padding, lhs_dilation,
                           rhs_dilation, dimension_numbers,
                           feature_group_count, batch_group_count):
  """conv_input_gradient_by_matmul for this convolution where it applies
  and pays (MATMUL_INPUT_GRADIENT_RATIO), else None."""
  if lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
    return None
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  if any(d not in (None, 1) for d in (*(window_strides or ()),
                                      *(lhs_dilation or ()),
                                      *(rhs_dilation or ()))):
    return None
  kernel = rhs.shape[:2]
  pads = _pads(padding, lhs.shape[1:3], kernel)
  if any(not 0 <= p <= k - 1 for pair, k in zip(pads, kernel) for p in pair):
    return None
  out_sizes = [n + lo + hi - k + 1
               for n, (lo, hi), k in zip(lhs.shape[1:3], pads, kernel)]
  positions = lhs.shape[0] * out_sizes[0] * out_sizes[1]
  if rhs.shape[3] < MATMUL_INPUT_GRADIENT_RATIO * positions:
    return None
  return lambda g, w: conv_input_gradient_by_matmul(g, w, pads)


def conv_general_dilated(lhs, rhs, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, **kwargs):
  """`lax.conv_general_dilated` with the kernel `rhs` cast to lhs's dtype
  inside it, whose backward pass, on CPU, ties both operands to the
  incoming gradient; small, wide convolutions take their input gradient
  from a matmul (`conv_input_gradient_by_matmul`)."""
  conv = dict(window_strides=window_strides, padding=padding,
              lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers,
              feature_group_count=feature_group_count,
              batch_group_count=batch_group_count)
  return _tied_op(
      lambda x, w: lax.conv_general_dilated(x, w, **conv, **kwargs),
      lhs, rhs, tie_lhs=True,
      input_gradient=_matmul_input_gradient(lhs, rhs, **conv))


def dot_general(lhs, rhs, *args, **kwargs):
  """`lax.dot_general` with the kernel `rhs` cast to lhs's dtype inside
  it. When that is a cast, the backward pass ties the kernel to the
  incoming gradient on CPU (a late cast); otherwise it is the plain op."""
  return _tied_op(lambda x, w: lax.dot_general(x, w, *args, **kwargs),
                  lhs, rhs, tie_lhs=False)


# Flax's layers with them: the same modules and parameters.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated,
                         promote_dtype=promote_dtype)
Dense = functools.partial(nn.Dense, dot_general=dot_general,
                          promote_dtype=promote_dtype)
