"""models/tied_gradient: a convolution whose backward pass reads its
operands only once its gradient exists, layers that cast their kernels
inside the op, and remat leaving the parameters untied unless its block
casts them. The values are lax's and flax's own; the memory plans are
XLA:CPU's."""
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxsd.models import remat
from jaxsd.models import tied_gradient

CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="XLA:CPU's memory plan")


def test_tie_keeps_values_and_integer_leaves():
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "i": jnp.arange(3),
          "h": jnp.ones((2,), jnp.bfloat16)}
  tied = tied_gradient.tie(tree, {"g": jnp.full((4,), 7.0)})
  for key in tree:
    assert tied[key].dtype == tree[key].dtype
    np.testing.assert_array_equal(tied[key], tree[key])


@pytest.mark.parametrize("dtype,kwargs", [
    (jnp.float32, dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))),
    (jnp.float32, dict(window_strides=(2, 2), padding=((1, 1), (1, 1)))),
    (jnp.float32, dict(window_strides=(1, 1), padding="VALID",
                       rhs_dilation=(2, 2), feature_group_count=2)),
    (jnp.bfloat16, dict(window_strides=(1, 1), padding="SAME")),
])
def test_conv_equals_lax_in_values_and_gradients(dtype, kwargs):
  """Forward and both gradients equal lax.conv_general_dilated's, NHWC /
  HWIO as Flax calls it, with strides, dilation and groups."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 9, 9, 4), dtype)
  groups = kwargs.get("feature_group_count", 1)
  w = jax.random.normal(kw, (3, 3, 4 // groups, 6), dtype)
  dims = ("NHWC", "HWIO", "NHWC")
  plain = lambda a, b: lax.conv_general_dilated(
      a, b, dimension_numbers=dims, **kwargs)
  tied = lambda a, b: tied_gradient.conv_general_dilated(
      a, b, dimension_numbers=dims, **kwargs)
  want, pull_want = jax.vjp(plain, x, w)
  got, pull_got = jax.vjp(tied, x, w)
  g = jax.random.normal(kg, want.shape, dtype)
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(
      rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)
  for a, b in zip(pull_got(g), pull_want(g)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b), **tol)


@pytest.mark.parametrize("x_shape,w_shape,padding,dtype", [
    ((1, 2, 2, 8), (3, 3, 8, 32), ((1, 1), (1, 1)), jnp.float32),
    ((2, 3, 2, 8), (3, 3, 8, 64), "SAME", jnp.float32),
    ((1, 4, 3, 8), (3, 3, 8, 64), "VALID", jnp.float32),
    ((1, 3, 3, 8), (1, 1, 8, 64), "SAME", jnp.float32),
    ((1, 3, 4, 8), (3, 2, 8, 64), ((2, 0), (0, 1)), jnp.float32),
    ((1, 2, 2, 8), (3, 3, 8, 32), "SAME", jnp.bfloat16),
])
def test_matmul_input_gradient_equals_lax(x_shape, w_shape, padding, dtype):
  """Small, wide convolutions (output channels >= 4x the output
  positions) take their input gradient from one matmul over the kernel in
  place: values and both gradients are lax's, for symmetric, one-sided
  and string paddings, 1x1 and non-square kernels, batches and bf16."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape, dtype)
  w = jax.random.normal(kw, w_shape, dtype)
  dims = ("NHWC", "HWIO", "NHWC")
  assert tied_gradient._matmul_input_gradient(  # pylint: disable=protected-access
      x, w, (1, 1), padding, None, None, dims, 1, 1) is not None
  plain = lambda a, b: lax.conv_general_dilated(
      a, b, (1, 1), padding, dimension_numbers=dims)
  tied = lambda a, b: tied_gradient.conv_general_dilated(
      a, b, (1, 1), padding, dimension_numbers=dims)
  want, pull_want = jax.vjp(plain, x, w)
  got, pull_got = jax.vjp(tied, x, w)
  g = jax.random.normal(kg, want.shape, dtype)
  tol = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)
  for a, b in zip(pull_got(g), pull_want(g)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.float32(a), np.float32(b), **tol)


@CPU_ONLY
@pytest.mark.parametrize("x_shape,channels,matmul", [
    ((1, 8, 8, 2560), 1280, True),     # SD-1.5's 8x8 level
    ((1, 16, 16, 1280), 1280, True),   # its 16x16 level
    ((2, 16, 16, 1280), 1280, False),  # 2.5 channels per position
    ((1, 32, 32, 640), 640, False),
])
def test_input_gradient_skips_the_flipped_kernel_where_it_pays(
    x_shape, channels, matmul):
  """Where the kernel outweighs the gradient the compiled input gradient
  has one convolution (the forward pass) and a matmul, no second
  convolution over a flipped copy of the kernel; elsewhere it keeps the
  convolution."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, x_shape[-1], channels), jnp.float32)
  conv = lambda a, b: tied_gradient.conv_general_dilated(
      a, b, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) ** 2)))
  hlo = grad.lower(x, w).as_text()
  assert hlo.count("stablehlo.convolution") == (1 if matmul else 2), hlo
  # Strided, dilated and grouped convolutions keep XLA's input gradient.
  base = dict(window_strides=(1, 1), padding="SAME", lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=("NHWC", "HWIO", "NHWC"),
              feature_group_count=1, batch_group_count=1)
  for change in (dict(window_strides=(2, 2)), dict(rhs_dilation=(2, 2)),
                 dict(feature_group_count=2)):
    assert tied_gradient._matmul_input_gradient(  # pylint: disable=protected-access
        x, w, **{**base, **change}) is None, change


class _ConvChain(nn.Module):
  conv: type

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate((64, 128) * 3):
      x = jnp.tanh(self.conv(features, (3, 3), padding="SAME",
                             name=f"c{i}")(x))
    return x


def _grad_temp_bytes(module, x):
  params = module.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.sum(module.apply({"params": p}, x) ** 2)
  with helpers.xla_optimised():
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@CPU_ONLY
def test_tied_convolutions_halve_the_gradients_temporaries():
  """XLA:CPU may build a kernel's flipped, transposed copy for the input
  gradient at any time, and schedules them early; tied to the gradient,
  the step's plan shrinks (this chain: 5.2 -> 2.4 MB; SD-1.5's LoRA step
  without remat 4.69 -> 2.34 GB)."""
  x = jnp.ones((1, 32, 32, 128))
  plain = _grad_temp_bytes(_ConvChain(nn.Conv), x)
  tied = _grad_temp_bytes(_ConvChain(tied_gradient.Conv), x)
  assert tied < 0.7 * plain, (tied, plain)


class _Block(nn.Module):
  """Four wide convolutions on a small image: the kernels' bytes dominate."""

  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = jnp.tanh(nn.Conv(256, (3, 3), padding="SAME", name=f"c{i}")(x))
    return x


class _Remat(nn.Module):
  policy: str

  @nn.compact
  def __call__(self, x):
    return remat.remat_call(self.policy, "blocks", remat.call,
                            _Block(name="block"), x)


@CPU_ONLY
def test_remat_recomputes_without_copying_the_parameters():
  """The CPU recomputation ties its inputs to the gradient but not the
  block's parameters: tied too, their copies were alive at once (here 7.5
  MB of temporaries against 2.7 MB, a kernel being 2.4 MB; SD-1.5 LoRA
  1.94 GB against 1.14 GB). The gradients stay those of no remat."""
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 256))
  temp = _remat_temp_bytes_and_check_gradients(_Remat, x)
  assert temp < 1.5 * 3 * 3 * 256 * 256 * 4, temp  # 1.5 f32 kernels


def _remat_temp_bytes_and_check_gradients(make, x) -> int:
  """The "blocks" policy's planned temporaries for make(policy) on x,
  after checking that its gradients equal no remat's."""
  grads, temp = {}, None
  for policy in ("none", "blocks"):
    module = make(policy)
    params = module.init(jax.random.key(0), x)["params"]
    loss = lambda p, m=module: jnp.sum(m.apply({"params": p}, x) ** 2)
    with helpers.xla_optimised():
      compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    grads[policy] = compiled(params)
    temp = compiled.memory_analysis().temp_size_in_bytes
  for a, b in zip(jax.tree_util.tree_leaves(grads["blocks"]),
                  jax.tree_util.tree_leaves(grads["none"])):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  return temp


@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_layers_computing_in_bf16_equal_flax_in_values_and_gradients(layer):
  """jaxsd's Conv and Dense with float32 parameters and bfloat16 compute
  cast the kernel inside the op; outputs and every gradient (input,
  kernel, bias) are flax's, in the same dtypes."""
  make = {"conv": lambda cls: cls(8, (3, 3), padding="SAME",
                                  dtype=jnp.bfloat16),
          "dense": lambda cls: cls(8, dtype=jnp.bfloat16)}[layer]
  ours = make(tied_gradient.Conv if layer == "conv" else tied_gradient.Dense)
  theirs = make(nn.Conv if layer == "conv" else nn.Dense)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4), jnp.bfloat16)
  params = theirs.init(jax.random.key(1), x)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      ours.init(jax.random.key(1), x)["params"])
  assert params["kernel"].dtype == jnp.float32
  g = jax.random.normal(jax.random.key(2), (2, 6, 6, 8), jnp.bfloat16)
  results = []
  for module in (ours, theirs):
    out, pull = jax.vjp(lambda p, a, m=module: m.apply({"params": p}, a),
                        params, x)
    results.append((out, pull(g)))
  for a, b in zip(jax.tree_util.tree_leaves(results[0]),
                  jax.tree_util.tree_leaves(results[1])):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-2,
                               atol=1e-2)


class _MixedChain(nn.Module):
  """Convolutions and dense layers computing in bf16 over f32 kernels."""
  conv: type
  dense: type

  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = jnp.tanh(self.conv(256, (3, 3), padding="SAME", dtype=jnp.bfloat16,
                             name=f"c{i}")(x))
      x = jnp.tanh(self.dense(256, dtype=jnp.bfloat16, name=f"d{i}")(x))
    return x.astype(jnp.float32)


@CPU_ONLY
def test_kernels_cast_inside_the_op_are_not_kept_for_the_backward_pass():
  """flax casts each kernel before its op, and XLA keeps the cast copies
  from the forward pass to the backward pass; cast inside the op (and
  again, tied, in its backward pass) they are not. This chain: flax's
  layers 8.4 MB of temporaries, tied convolutions over flax's cast 4.0 MB,
  jaxsd's layers 2.4 MB (a 3x3x256x256 f32 kernel is 2.4 MB); SD-1.5 LoRA
  at bf16 5.30 -> 4.02 GB."""
  x = jnp.ones((1, 8, 8, 256), jnp.bfloat16)
  flax_cast = functools.partial(
      nn.Conv, conv_general_dilated=tied_gradient.conv_general_dilated)
  plain = _grad_temp_bytes(_MixedChain(nn.Conv, nn.Dense), x)
  tied_flax_cast = _grad_temp_bytes(_MixedChain(flax_cast, nn.Dense), x)
  ours = _grad_temp_bytes(
      _MixedChain(tied_gradient.Conv, tied_gradient.Dense), x)
  assert ours < 0.75 * tied_flax_cast < 0.75 * plain, (
      ours, tied_flax_cast, plain)


class _DenseBlock(nn.Module):
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = jnp.tanh(tied_gradient.Dense(1024, dtype=self.dtype,
                                       name=f"d{i}")(x))
    return x


class _DenseBlocks(nn.Module):
  policy: str

  @nn.compact
  def __call__(self, x):
    for b in range(4):
      x = remat.remat_call(self.policy, "blocks", remat.call,
                           _DenseBlock(name=f"b{b}"), x)
    return x.astype(jnp.float32)


@CPU_ONLY
def test_remat_recasts_the_parameters_a_block_computes_in_bf16():
  """A block computing in bf16 casts its f32 parameters; untied, CSE gave
  the recomputation the forward pass's cast copies, kept from the forward
  pass on (here 8.9 MB of temporaries against 4.9 MB, a bf16 kernel being
  2.1 MB; SD-1.5 LoRA at bf16 with remat 4.13 -> 3.64 GB). The gradients
  stay those of no remat."""
  x = jax.random.normal(jax.random.key(1), (1, 64, 1024), jnp.bfloat16)
  temp = _remat_temp_bytes_and_check_gradients(_DenseBlocks, x)
  assert temp < 3.2 * 1024 * 1024 * 2, temp  # 3.2 bf16 kernels
