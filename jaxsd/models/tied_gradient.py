"""A convolution whose backward pass reads its operands only once the
incoming gradient has arrived (XLA:CPU memory).

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
on XLA:CPU only). Matmuls stay plain: tying them too changed no plan
(SD-1.5 LoRA with remat: 1.14 GB of temporaries either way).

Figures: benchmarks/README.md, "Operands tied to the incoming gradient".
"""
import functools
from typing import Any

import flax.linen as nn
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


def conv_general_dilated(lhs, rhs, *args, **kwargs):
  """`lax.conv_general_dilated` whose backward pass, on CPU, ties its
  operands to the incoming gradient."""
  if jax.default_backend() != "cpu":
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  apply = lambda x, w: lax.conv_general_dilated(x, w, *args, **kwargs)

  @jax.custom_vjp
  def conv(x, w):
    return apply(x, w)

  def forward(x, w):
    return apply(x, w), (x, w)

  def backward(operands, g):
    return jax.vjp(apply, *tie(operands, g))[1](g)

  conv.defvjp(forward, backward)
  return conv(lhs, rhs)


# Flax's layer with it: the same module and parameters.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
