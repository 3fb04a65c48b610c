"""jaxsd's UNet against diffusers' FlaxUNet2DConditionModel as the oracle."""
import collections
import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxUNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from jaxsd.models import unet as unet_lib

diffusers_logging.set_verbosity_error()

# Mixed down/up block types, two resolutions.
MIXED = dict(
    sample_size=16, in_channels=4, out_channels=4,
    block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32)
# The MNIST layout: 28 -> 14 -> 7, 784-token self-attention (blocked on CPU).
MNIST = dict(
    sample_size=28, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32)
BATCH, TOKENS = 2, 8


def random_params(shapes, seed=0):
  """Params at a realistic scale (fan-in kernels, norm scales near 1).

  Non-trivial biases and norm scales make the comparison stricter than a
  fresh init (zero biases, unit scales).
  """
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(s.shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(s.shape)
    else:  # kernel [..., in, out]
      value = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def inputs(cfg, seed=0):
  """NHWC sample [B, H, W, C], int timesteps [B], context [B, L, D]."""
  rng = np.random.default_rng(seed)
  size = cfg["sample_size"]
  sample = rng.standard_normal((BATCH, size, size, cfg["in_channels"]))
  timesteps = rng.integers(0, 1000, (BATCH,))
  context = rng.standard_normal((BATCH, TOKENS, cfg["cross_attention_dim"]))
  return (jnp.asarray(sample, jnp.float32), jnp.asarray(timesteps, jnp.int32),
          jnp.asarray(context, jnp.float32))


@functools.lru_cache(maxsize=None)
def diffusers_setup(name):
  """(diffusers model, its params) for a config; params without compiling."""
  cfg = {"MIXED": MIXED, "MNIST": MNIST}[name]
  model = FlaxUNet2DConditionModel(**cfg)
  sample, timesteps, context = inputs(cfg)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.transpose(sample, (0, 3, 1, 2)),
                         timesteps, context))["params"]
  return model, random_params(shapes)


def diffusers_forward(model, params, sample, timesteps, context):
  out = model.apply({"params": params}, jnp.transpose(sample, (0, 3, 1, 2)),
                    timesteps, context).sample
  return jnp.transpose(out, (0, 2, 3, 1))


# MNIST: 784-token self-attention (the blocked CPU path) against diffusers'.
@pytest.mark.parametrize("name", ["MIXED", "MNIST"])
def test_matches_diffusers(name):
  model, their_params = diffusers_setup(name)
  ours = unet_lib.unet_from_diffusers_config(model.config)
  params = unet_lib.convert_diffusers_params(their_params)
  sample, timesteps, context = inputs(model.config)

  expected = jax.jit(functools.partial(diffusers_forward, model))(
      their_params, sample, timesteps, context)
  got = jax.jit(ours.apply)({"params": params}, sample, timesteps, context)

  assert got.shape == sample.shape[:3] + (model.config.out_channels,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  assert float(jnp.abs(expected).max()) > 0.1  # not vacuous


def test_param_tree_is_diffusers_tree():
  model, their_params = diffusers_setup("MIXED")
  ours = unet_lib.unet_from_diffusers_config(model.config)
  sample, timesteps, context = inputs(model.config)
  our_shapes = jax.eval_shape(ours.init, jax.random.key(0), sample, timesteps,
                              context)["params"]
  converted = unet_lib.convert_diffusers_params({"params": their_params})
  shape_of = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
  assert shape_of(converted) == shape_of(our_shapes)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(
      our_shapes))


def test_scalar_timestep_broadcasts():
  model, their_params = diffusers_setup("MIXED")
  ours = unet_lib.unet_from_diffusers_config(model.config)
  params = unet_lib.convert_diffusers_params(their_params)
  sample, _, context = inputs(model.config)
  apply = jax.jit(ours.apply)
  scalar = apply({"params": params}, sample, jnp.asarray(250.0), context)
  vector = apply({"params": params}, sample, jnp.full((BATCH,), 250), context)
  np.testing.assert_allclose(scalar, vector, atol=1e-6)


def test_gradients_flow():
  model, their_params = diffusers_setup("MIXED")
  ours = unet_lib.unet_from_diffusers_config(model.config)
  params = unet_lib.convert_diffusers_params(their_params)
  sample, timesteps, context = inputs(model.config)

  def loss_fn(p):
    out = ours.apply({"params": p}, sample, timesteps, context, train=True)
    return jnp.mean(jnp.square(out - sample))

  # Checked in NumPy: an eager jnp op compiles once per leaf shape (tens of
  # milliseconds each on CPU, hundreds of leaves).
  grads = jax.device_get(jax.jit(jax.grad(loss_fn))(params))
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  for path, g in leaves:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.any(g != 0), jax.tree_util.keystr(path)


def test_bfloat16_compute_stays_close_to_float32():
  model, their_params = diffusers_setup("MIXED")
  params = unet_lib.convert_diffusers_params(their_params)
  sample, timesteps, context = inputs(model.config)
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    ours = unet_lib.unet_from_diffusers_config(model.config, dtype=dtype)
    outs[dtype] = jax.jit(ours.apply)({"params": params}, sample, timesteps,
                                      context)
  assert outs[jnp.bfloat16].dtype == jnp.float32
  err = jnp.abs(outs[jnp.bfloat16] - outs[jnp.float32]).max()
  assert err < 0.05 * jnp.abs(outs[jnp.float32]).max()


def _norm_vjp(module, params, x, d_y):
  """(output, d_params, d_x) of a norm module at x, pulled back from d_y."""
  def vjp():
    out, pullback = jax.vjp(
        lambda p, a: module.apply({"params": p}, a), params, x)
    return (out,) + pullback(d_y)
  return jax.jit(vjp)()


@pytest.mark.parametrize("shape", [(2, 6, 5, 32), (2, 6, 5, 96), (3, 4, 64)])
def test_group_norm_matches_flax(shape):
  """Values and gradients of the hand-written backward against autodiff of
  flax's GroupNorm, one and several channels per group."""
  keys = jax.random.split(jax.random.key(1), 4)
  x = 3.0 * jax.random.normal(keys[0], shape) + 1.0
  c = shape[-1]
  params = {"scale": 1.0 + 0.3 * jax.random.normal(keys[1], (c,)),
            "bias": 0.3 * jax.random.normal(keys[2], (c,))}
  d_y = jax.random.normal(keys[3], shape)

  got = _norm_vjp(unet_lib.GroupNorm(32), params, x, d_y)
  expected = _norm_vjp(flax.linen.GroupNorm(32, epsilon=1e-5), params, x,
                       d_y)
  for g, e in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5)
  assert float(jnp.abs(got[2]).max()) > 0.1  # the input gradient is not 0


@pytest.mark.parametrize("shape", [(2, 6, 32), (2, 3, 5, 96), (4, 8)])
def test_layer_norm_matches_flax(shape):
  """Values and gradients (input, scale, bias) of the hand-written
  backward against autodiff of flax's LayerNorm, and the compute dtype."""
  keys = jax.random.split(jax.random.key(2), 4)
  x = 3.0 * jax.random.normal(keys[0], shape) + 1.0
  c = shape[-1]
  params = {"scale": 1.0 + 0.3 * jax.random.normal(keys[1], (c,)),
            "bias": 0.3 * jax.random.normal(keys[2], (c,))}
  d_y = jax.random.normal(keys[3], shape)

  got = _norm_vjp(unet_lib.LayerNorm(), params, x, d_y)
  expected = _norm_vjp(flax.linen.LayerNorm(epsilon=1e-5), params, x, d_y)
  for g, e in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5)
  assert float(jnp.abs(got[2]).max()) > 0.1  # the input gradient is not 0
  out = unet_lib.LayerNorm(dtype=jnp.bfloat16).apply({"params": params}, x)
  assert out.dtype == jnp.bfloat16


def test_group_norm_keeps_compute_dtype_and_rejects_bad_groups():
  x = jnp.ones((2, 4, 4, 64), jnp.bfloat16)
  norm = unet_lib.GroupNorm(32, dtype=jnp.bfloat16)
  params = norm.init(jax.random.key(0), x)
  assert norm.apply(params, x).dtype == jnp.bfloat16
  assert params["params"]["scale"].dtype == jnp.float32
  with pytest.raises(ValueError, match="norm_num_groups"):
    unet_lib.GroupNorm(32).init(jax.random.key(0), jnp.ones((1, 2, 2, 48)))


def test_rejects_unsupported_config():
  with pytest.raises(ValueError, match="addition_embed_type"):
    unet_lib.unet_from_diffusers_config(
        dict(MIXED, addition_embed_type="text_time"))


@pytest.mark.parametrize("pooling", ["mean", "flatten"])
def test_pooled_text_embedding_adds_a_prompt_dependent_term(pooling):
  """The pooled path's contribution to the output depends on the prompt."""
  kwargs = dict(MIXED, pooled_text_embedding=pooling)
  del kwargs["sample_size"]
  model = unet_lib.UNet(**kwargs)
  sample, timesteps, context = inputs(MIXED)
  other = context.at[:, 3].add(1.0)  # one token changed
  params = random_params(jax.eval_shape(model.init, jax.random.key(0), sample,
                                        timesteps, context)["params"])
  width = MIXED["cross_attention_dim"] * (TOKENS if pooling == "flatten"
                                          else 1)
  assert params["text_pool_norm"]["scale"].shape == (width,)
  # The same model with the pooled path's last layer zeroed: no pooled term.
  off = jax.tree_util.tree_map(lambda x: x, params)
  off["text_embedding"]["linear_2"] = jax.tree_util.tree_map(
      jnp.zeros_like, params["text_embedding"]["linear_2"])
  apply = jax.jit(lambda p, c: model.apply({"params": p}, sample, timesteps,
                                           c))
  term = lambda c: apply(params, c) - apply(off, c)
  assert float(jnp.max(jnp.abs(term(context)))) > 1e-3
  assert float(jnp.max(jnp.abs(term(context) - term(other)))) > 1e-3
  with pytest.raises(ValueError, match="pooled_text_embedding"):
    unet_lib.pool_text(context, "max")


# --- Gradient checkpointing (UNet.remat) ---------------------------------

# Remat: one level of MIXED's blocks (a cross-attention down block, the mid
# block, a cross-attention up block taking the down block's skips): every
# policy's wrapping, at a third less tracing and compiling than two levels
# (the remat tests: 58 -> 39 s cold, 2026-12-06). dropout: the static
# `train` matters.
REMAT_CFG = dict(MIXED, block_out_channels=(32,),
                 down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",), dropout=0.1)
del REMAT_CFG["sample_size"]


def _remat_loss(policy):
  """(loss(params, sample, timesteps, context) -> (loss, output), model)
  with dropout on (train=True, a fixed 'dropout' rng)."""
  model = unet_lib.UNet(**REMAT_CFG, remat=policy)

  def loss(params, sample, timesteps, context):
    out = model.apply({"params": params}, sample, timesteps, context, True,
                      rngs={"dropout": jax.random.key(7)})
    return jnp.mean(jnp.square(out - sample)), out
  return loss, model


@functools.lru_cache(maxsize=None)
def _remat_output_and_grads(policy):
  """(output, gradients, XLA's planned temporary bytes, optimised HLO
  text) of the compiled loss-and-gradient step under a remat policy."""
  loss, model = _remat_loss(policy)
  sample, timesteps, context = inputs(MIXED)
  params = random_params(jax.eval_shape(model.init, jax.random.key(0), sample,
                                        timesteps, context)["params"])
  compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
      params, sample, timesteps, context).compile()
  (_, out), grads = compiled(params, sample, timesteps, context)
  return (out, grads, compiled.memory_analysis().temp_size_in_bytes,
          compiled.as_text())


def _shapes(policy):
  model = unet_lib.UNet(**REMAT_CFG, remat=policy)
  sample, timesteps, context = inputs(MIXED)
  return jax.eval_shape(model.init, jax.random.key(0), sample, timesteps,
                        context)["params"]


@pytest.mark.parametrize("policy", [p for p in unet_lib.REMAT_POLICIES
                                    if p != "none"] + [True])
def test_remat_keeps_the_param_tree(policy):
  """Same names, shapes and dtypes: checkpoints and the diffusers
  conversion read the same tree with and without remat."""
  flat = lambda tree: {k: (v.shape, v.dtype) for k, v in
                       flax.traverse_util.flatten_dict(tree).items()}
  assert flat(_shapes(policy)) == flat(_shapes("none"))


@pytest.mark.parametrize("policy", [p for p in unet_lib.REMAT_POLICIES
                                    if p != "none"])
def test_remat_gives_the_same_output_and_gradients(policy):
  out, grads, _, _ = _remat_output_and_grads(policy)
  ref_out, ref_grads, _, _ = _remat_output_and_grads("none")
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
  assert float(jnp.abs(ref_out).max()) > 0.1  # not vacuous
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def _residual_bytes(policy):
  """Bytes the backward pass keeps from the forward (the params included),
  from the traced program alone: what remat decides."""
  loss, model = _remat_loss(policy)
  sample, timesteps, context = inputs(MIXED)
  params = _shapes(policy)
  pullback = jax.eval_shape(
      lambda p: jax.vjp(lambda q: loss(q, sample, timesteps, context)[0],
                        p)[1], params)
  return sum(int(np.prod(r.shape)) * r.dtype.itemsize
             for r in jax.tree_util.tree_leaves(pullback))


def test_remat_keeps_fewer_activations():
  """The residuals saved for the backward pass shrink: block remat keeps
  only the blocks' inputs and outputs (REMAT_CFG: 21 MB -> 1.5 MB, of
  which the params are about 1 MB)."""
  none, blocks = _residual_bytes("none"), _residual_bytes("blocks")
  transformers = _residual_bytes("transformers")
  assert blocks < 0.25 * none
  assert blocks < transformers < 0.6 * none


def test_remat_reduces_compiled_memory():
  """XLA's plan of the compiled loss-and-gradient step (the one compared
  above), on every backend: on CPU the recomputation reads residuals tied
  to the incoming gradient (jaxsd/models/remat.py), so CSE cannot fold it
  back. REMAT_CFG at 16x16, batch 2 (2026-12-06, in a conditional then):
  none 35.9 MB, blocks 19.4 MB, transformers 14.1 MB."""
  temp_bytes = lambda policy: _remat_output_and_grads(policy)[2]
  none = temp_bytes("none")
  assert temp_bytes("blocks") < 0.75 * none
  assert temp_bytes("transformers") < 0.85 * none


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's HLO")
def test_remat_recomputes_in_the_main_computation_on_cpu():
  """Every convolution of the remat gradient in XLA:CPU's canonical form
  (NHWC input, HWIO kernel), none in a conditional: recomputed in a
  conditional's branch (the first remat formulation), the weight-gradient
  convolutions stayed in another layout and ran 3x slower (a small SD-layout
  UNet's full fine-tune step: 6.7 s without remat, 20.7 s with, 7.2 s tied;
  benchmarks/README.md, "Remat recomputed in the main computation")."""
  hlo = _remat_output_and_grads("blocks")[3]
  labels = re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", hlo)
  assert labels  # not vacuous: REMAT_CFG has 3x3 convolutions
  assert set(labels) == {"b01f_01io->b01f"}, collections.Counter(labels)
  assert " conditional(" not in hlo


def test_remat_rejects_an_unknown_policy():
  with pytest.raises(ValueError, match="model.remat"):
    _shapes("everything")


@functools.lru_cache(maxsize=None)
def _lora_grads(policy):
  """Gradients w.r.t. LoRA adapters on to_q/to_v (random up, so that every
  adapter's gradient is non-zero) with the base frozen."""
  from jaxsd.models import lora  # pylint: disable=g-import-not-at-top
  loss, model = _remat_loss(policy)
  sample, timesteps, context = inputs(MIXED)
  params = random_params(jax.eval_shape(model.init, jax.random.key(0), sample,
                                        timesteps, context)["params"])
  adapters = lora.init_adapters(jax.random.key(1), params, ("to_q", "to_v"),
                                rank=2)
  adapters = jax.tree_util.tree_map(
      lambda a: a if a.any() else 0.1 * jax.random.normal(
          jax.random.key(a.size), a.shape), adapters)

  def adapted(adapters):
    return lora.apply_with_adapters(
        lambda p, *a: loss(p, *a)[0], params, adapters, sample, timesteps,
        context, alpha=2.0)
  compiled = jax.jit(jax.grad(adapted)).lower(adapters).compile()
  return compiled(adapters), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("policy", ["blocks", "attention"])
def test_remat_with_lora_gives_the_same_adapter_gradients(policy):
  """LoRA reaches the Dense layers through a method interceptor that closes
  over the adapters; remat's CPU custom VJP takes them as inputs
  (remat.closure_inputs): the same gradients, no leaked tracer, and the
  recomputation still saves memory."""
  ref, ref_temp = _lora_grads("none")
  assert min(float(np.abs(g).max())
             for g in jax.tree_util.tree_leaves(ref)) > 0  # not vacuous
  grads, temp = _lora_grads(policy)
  for g, r in zip(jax.tree_util.tree_leaves(grads),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=0)
  if policy == "blocks":
    assert temp < 0.85 * ref_temp, (temp, ref_temp)
