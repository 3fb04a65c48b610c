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

Figures: benchmarks/README.md, "Operands tied to the incoming gradient"
and "Kernels cast inside the op".
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


def _tied_op(op, lhs, rhs, tie_lhs: bool):
  """op(lhs, rhs cast to lhs's dtype), with a custom VJP on CPU whose
  backward pass differentiates it at rhs (and lhs if `tie_lhs`) tied to
  the incoming gradient."""
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
    x, w = (tie(x, g) if tie_lhs else x), tie(w, g)
    return jax.vjp(apply, x, w)[1](g)

  tied.defvjp(forward, backward)
  return tied(lhs, rhs)


def conv_general_dilated(lhs, rhs, *args, **kwargs):
  """`lax.conv_general_dilated` with the kernel `rhs` cast to lhs's dtype
  inside it, whose backward pass, on CPU, ties both operands to the
  incoming gradient."""
  return _tied_op(
      lambda x, w: lax.conv_general_dilated(x, w, *args, **kwargs),
      lhs, rhs, tie_lhs=True)


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
