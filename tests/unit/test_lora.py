"""LoRA adapters (jaxsd/models/lora.py): merging, the intercepted train-time
forward, gradients, and diffusers' file format (jaxsd/interop/lora_format.py)
against PyTorch diffusers + peft as the oracle."""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsd.interop import lora_format
from jaxsd.models import lora
from jaxsd.models import unet as unet_lib

RANK, ALPHA = 4, 8.0  # alpha != rank: a lost alpha shows as a 2x error
# One tiny architecture for jaxsd's UNet and the PyTorch oracle's.
UNET = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=16, norm_num_groups=8)
CLIP = dict(vocab_size=1000, hidden_size=16, intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=16)


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def trained(adapters, seed=1):
  """Adapters as after training: non-zero up (and a moved down)."""
  keys = iter(jax.random.split(jax.random.key(seed), 1000))
  return jax.tree_util.tree_map(
      lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), adapters)


def assert_trees_close(a, b, atol, rtol=0.0):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k], np.float32),
                               np.asarray(fb[k], np.float32), atol=atol,
                               rtol=rtol, err_msg="/".join(k))


class MLP(nn.Module):
  """Two adaptable Dense layers ("to_q", "to_out_0") and one not ("head")."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(12, name="to_q")(x))
    x = nn.gelu(nn.Dense(10, name="to_out_0")(x))
    return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (6, 5))
  params = model.init(jax.random.key(1), x)["params"]
  return (lambda p, x: model.apply({"params": p}, x)), params, x


class TinyUNet:
  """jaxsd's UNet with random params at a realistic scale, its jitted base
  forward and its jitted adapted forward (one compile per dropout rate)."""

  def __init__(self):
    self.model = unet_lib.UNet(**UNET)
    rng = np.random.default_rng(0)
    self.args = (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32),
                 jnp.asarray([10, 500]),
                 jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32))
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), *self.args)
    self.params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape)
                              / np.sqrt(np.prod(s.shape[:-1]) or 1.0),
                              jnp.float32), shapes["params"])
    self.base = jax.jit(self.apply_fn)
    self.adapted = jax.jit(self._adapted, static_argnums=3)

  def apply_fn(self, params, *args):
    return self.model.apply({"params": params}, *args)

  def _adapted(self, params, adapters, rng, dropout):
    return lora.apply_with_adapters(self.apply_fn, params, adapters,
                                    *self.args, alpha=ALPHA, dropout=dropout,
                                    rng=rng)


@pytest.fixture(scope="module")
def tiny_unet():
  return TinyUNet()


# ------------------------------------------------------------------------
# Targets and fresh adapters
# ------------------------------------------------------------------------


def test_target_paths_match_module_names_and_path_suffixes(tiny_unet):
  params = tiny_unet.params
  paths = lora.target_paths(params, lora.UNET_TARGETS)
  # Every attn1/attn2 module contributes exactly its four projections.
  attns = {p[:-1] for p in paths}
  assert attns and all(p[-1] in ("attn1", "attn2") for p in attns)
  assert len(paths) == 4 * len(attns)
  assert ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2",
          "to_k") in paths
  assert ("mid_block", "attentions_0", "transformer_blocks_0", "attn1",
          "to_out_0") in paths
  cross_k = lora.target_paths(params, ["attn2/to_k"])
  assert cross_k and all(p[-2:] == ("attn2", "to_k") for p in cross_k)
  assert len(cross_k) == len(attns) // 2
  with pytest.raises(ValueError, match=r"\['q_proj'\].*to_q"):
    lora.target_paths(params, ["q_proj"])
  with pytest.raises(ValueError, match="Dense layers"):  # a 1x1 conv
    lora.target_paths(params, ["proj_in"])


def test_fresh_adapters_change_nothing(tiny_unet):
  params = tiny_unet.params
  adapters = lora.init_adapters(jax.random.key(3), params, lora.UNET_TARGETS,
                                RANK)
  kernels = flat(params)
  for path in lora.target_paths(params, lora.UNET_TARGETS):
    fan_in, fan_out = kernels[path + ("kernel",)].shape
    pair = flat(adapters)
    down, up = pair[path + ("down",)], pair[path + ("up",)]
    assert down.shape == (fan_in, RANK) and down.dtype == jnp.float32
    assert up.shape == (RANK, fan_out) and not np.any(np.asarray(up))
    # peft's kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in), and not zero.
    assert 0.5 / np.sqrt(fan_in) < np.abs(down).max() <= 1 / np.sqrt(fan_in)
  merged = lora.merge(params, adapters, ALPHA)
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(merged)[k], v)
  out = tiny_unet.adapted(params, adapters, jax.random.key(0), 0.0)
  np.testing.assert_allclose(out, tiny_unet.base(params, *tiny_unet.args),
                             atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------
# Merged forward == intercepted forward; dropout
# ------------------------------------------------------------------------


def test_merged_equals_intercepted_on_a_small_model(mlp):
  apply_fn, params, x = mlp
  adapters = trained(lora.init_adapters(jax.random.key(2), params,
                                        ("to_q", "to_out_0"), RANK))
  merged = lora.merge(params, adapters, ALPHA, scale=0.5)
  ours, merged_out, base = jax.jit(lambda a, m: (
      lora.apply_with_adapters(apply_fn, params, a, x, alpha=ALPHA,
                               scale=0.5),
      apply_fn(m, x), apply_fn(params, x)))(adapters, merged)
  np.testing.assert_allclose(ours, merged_out, atol=1e-5, rtol=1e-5)
  # The merge is W + scale * alpha / r * down @ up on exactly the targets.
  pair = adapters["to_q"]
  np.testing.assert_allclose(
      merged["to_q"]["kernel"], params["to_q"]["kernel"]
      + 0.5 * ALPHA / RANK * pair["down"] @ pair["up"], atol=1e-6)
  np.testing.assert_array_equal(merged["head"]["kernel"],
                                params["head"]["kernel"])
  np.testing.assert_array_equal(merged["to_q"]["bias"], params["to_q"]["bias"])
  assert not np.allclose(ours, base, atol=1e-3)
  # A bf16 base stays bf16.
  bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  merged16 = lora.merge(bf16, adapters, ALPHA)
  assert merged16["to_q"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(merged16["to_q"]["kernel"], np.float32),
      lora.merge(params, adapters, ALPHA)["to_q"]["kernel"], atol=2e-2)


def test_merged_equals_intercepted_on_the_unet_and_dropout(tiny_unet):
  params, args = tiny_unet.params, tiny_unet.args
  adapters = trained(lora.init_adapters(jax.random.key(3), params,
                                        lora.UNET_TARGETS, RANK))
  merged_out = tiny_unet.base(lora.merge(params, adapters, ALPHA), *args)
  ours = tiny_unet.adapted(params, adapters, jax.random.key(0), 0.0)
  np.testing.assert_allclose(ours, merged_out, atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(ours - tiny_unet.base(params, *args))).max() > 1e-2

  drop = lambda rng: tiny_unet.adapted(params, adapters, rng, 0.5)
  a, b, c = drop(jax.random.key(1)), drop(jax.random.key(1)), drop(
      jax.random.key(2))
  np.testing.assert_array_equal(a, b)  # reproducible per rng
  assert np.abs(np.asarray(a - ours)).max() > 1e-3
  assert np.abs(np.asarray(a - c)).max() > 1e-3


def test_merged_equals_intercepted_on_the_clip_text_encoder():
  transformers = pytest.importorskip("transformers")
  model = transformers.FlaxCLIPTextModel(
      transformers.CLIPTextConfig(**CLIP), _do_init=False)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 7)))
  pos = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
  params = jax.jit(model.module.init)(jax.random.key(0), ids,
                                      jnp.ones_like(ids), pos)["params"]

  def apply_fn(p, ids):  # as jaxsd.text.encoder.TextEncoder calls the module
    return model.module.apply({"params": p}, ids, jnp.ones_like(ids), pos,
                              deterministic=True)[0]

  adapters = trained(lora.init_adapters(jax.random.key(0), params,
                                        lora.TEXT_TARGETS, RANK))
  assert len(flat(adapters)) == 2 * 4 * CLIP["num_hidden_layers"]
  ours, merged, base = jax.jit(lambda a: (
      lora.apply_with_adapters(apply_fn, params, a, ids, alpha=ALPHA),
      apply_fn(lora.merge(params, a, ALPHA), ids),
      apply_fn(params, ids)))(adapters)
  np.testing.assert_allclose(ours, merged, atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(ours - base)).max() > 1e-2


def test_adapters_that_no_call_reaches_are_an_error(mlp):
  apply_fn, params, x = mlp
  adapters = lora.init_adapters(jax.random.key(0), params, ["to_q"], RANK)
  nested = {"params": params}  # one level too deep for apply_fn's paths
  wrong = lora.init_adapters(jax.random.key(0), nested, ["to_q"], RANK)
  with pytest.raises(ValueError, match="never called.*params/to_q"):
    lora.apply_with_adapters(apply_fn, params, wrong, x, alpha=ALPHA)
  with pytest.raises(ValueError, match="needs an rng"):
    lora.apply_with_adapters(apply_fn, params, adapters, x, alpha=ALPHA,
                             dropout=0.1)


# ------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------


def test_gradients_reach_the_adapters_only(mlp):
  apply_fn, params, x = mlp
  target = jnp.sin(x[:, :3])
  adapters = trained(lora.init_adapters(jax.random.key(2), params,
                                        ("to_q", "to_out_0"), RANK))

  def loss(a, p, dropout=0.0, rng=None):
    out = lora.apply_with_adapters(apply_fn, jax.lax.stop_gradient(p), a, x,
                                   alpha=ALPHA, dropout=dropout, rng=rng)
    return jnp.mean((out - target) ** 2)

  def merged_loss(a):
    return jnp.mean((apply_fn(lora.merge(params, a, ALPHA), x) - target) ** 2)

  grads = jax.jit(jax.grad(loss))(adapters, params)
  assert_trees_close(grads, jax.jit(jax.grad(merged_loss))(adapters),
                     atol=1e-6, rtol=1e-4)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in flat(grads).values())
  # With the base under stop_gradient, a joint gradient leaves it zero.
  _, base_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(adapters, params)
  assert not any(np.any(np.asarray(g)) for g in flat(base_grads).values())

  # A few Adam steps on the adapters alone (with dropout) lower the loss and
  # leave the base as it was.
  before = jax.tree_util.tree_map(np.array, params)
  tx = optax.adam(3e-2)
  opt_state = tx.init(adapters)

  @jax.jit
  def step(a, opt_state, rng):
    g = jax.grad(loss)(a, params, 0.1, rng)
    updates, opt_state = tx.update(g, opt_state)
    return optax.apply_updates(a, updates), opt_state

  eval_loss = jax.jit(loss)
  first = eval_loss(adapters, params)
  for i in range(30):
    adapters, opt_state = step(adapters, opt_state, jax.random.key(i))
  assert eval_loss(adapters, params) < 0.5 * first
  assert_trees_close(params, before, atol=0.0)


# ------------------------------------------------------------------------
# diffusers' format
# ------------------------------------------------------------------------


def test_diffusers_module_names():
  assert lora_format.diffusers_module_name(
      ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1",
       "to_out_0")) == ("down_blocks.0.attentions.0.transformer_blocks.0."
                        "attn1.to_out.0")
  assert lora_format.diffusers_module_name(
      ("mid_block", "attentions_0", "transformer_blocks_1", "attn2", "to_k")
  ) == "mid_block.attentions.0.transformer_blocks.1.attn2.to_k"
  assert lora_format.diffusers_module_name(
      ("text_model", "encoder", "layers", "11", "self_attn", "q_proj")
  ) == "text_model.encoder.layers.11.self_attn.q_proj"
  assert lora_format.diffusers_module_name(("time_embedding", "linear_1")) == (
      "time_embedding.linear_1")


def test_state_dict_round_trip(tmp_path, tiny_unet, mlp):
  unet_params = tiny_unet.params
  _, mlp_params, _ = mlp
  unet_adapters = trained(lora.init_adapters(
      jax.random.key(0), unet_params, lora.UNET_TARGETS, RANK))
  text_adapters = trained(lora.init_adapters(
      jax.random.key(1), mlp_params, ["to_q"], RANK), seed=2)
  sd = lora_format.to_diffusers_state_dict(unet_adapters)
  name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  down = unet_adapters["down_blocks_0"]["attentions_0"][
      "transformer_blocks_0"]["attn1"]["to_q"]["down"]
  np.testing.assert_array_equal(sd[name + ".lora_A.weight"], np.asarray(down).T)
  assert sd[name + ".lora_A.weight"].shape == (RANK, 16)
  assert sd[name + ".lora_B.weight"].shape == (16, RANK)
  assert len(sd) == len(flat(unet_adapters))  # lora_A, lora_B per module
  assert_trees_close(lora_format.from_diffusers_state_dict(sd, unet_params),
                     unet_adapters, atol=0.0)

  path = lora_format.save_diffusers_lora(str(tmp_path), unet_adapters,
                                         text_adapters, alpha=ALPHA)
  assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
  u, t, alpha = lora_format.load_diffusers_lora(str(tmp_path), unet_params,
                                                mlp_params)
  assert alpha == ALPHA
  assert_trees_close(u, unet_adapters, atol=0.0)
  assert_trees_close(t, text_adapters, atol=0.0)
  assert lora_format.load_diffusers_lora(path, unet_params)[1] is None

  # Without metadata diffusers takes alpha = r, and so do we.
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  bare = str(tmp_path / "bare.safetensors")
  safetensors.numpy.save_file(sd, bare)
  assert lora_format.load_diffusers_lora(bare, unet_params)[2] == RANK

  with pytest.raises(ValueError, match="not a Dense layer"):
    lora_format.from_diffusers_state_dict(
        {"unet.nope.to_q.lora_A.weight": np.zeros((RANK, 16)),
         "unet.nope.to_q.lora_B.weight": np.zeros((16, RANK))}, unet_params)
  with pytest.raises(ValueError, match="do not fit"):
    lora_format.from_diffusers_state_dict(
        {name + ".lora_A.weight": np.zeros((RANK, 7)),
         name + ".lora_B.weight": np.zeros((16, RANK))}, unet_params)
  with pytest.raises(ValueError, match="kohya"):
    lora_format.from_diffusers_state_dict(
        {"unet.x.alpha": np.zeros(())}, unet_params)


def _linear_kernels(state_dict, rename=lambda path: path):
  """Torch Linear weights [out, in] as a Flax tree of kernels [in, out]."""
  return flax.traverse_util.unflatten_dict({
      rename(tuple(k.split(".")[:-1])) + ("kernel",): v.numpy().T.copy()
      for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 2})


def test_diffusers_load_lora_weights_fuses_to_our_merge(tmp_path):
  """diffusers' StableDiffusionPipeline.load_lora_weights + fuse_lora on our
  file gives, weight by weight, W + alpha / r * (down @ up)^T (our merge),
  and leaves every other weight as it was."""
  pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(sample_size=8, **UNET)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP))
  pipe = diffusers.StableDiffusionPipeline(
      vae=diffusers.AutoencoderKL(
          block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
          down_block_types=("DownEncoderBlock2D",),
          up_block_types=("UpDecoderBlock2D",)),
      text_encoder=text,
      tokenizer=transformers.CLIPTokenizer.from_pretrained(
          os.environ["JAXSD_CLIP_TOKENIZER"]),
      unet=unet,
      scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
      safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)

  # The torch modules' kernels in jaxsd's layout: "down_blocks.0" ->
  # "down_blocks_0" for the UNet (as jaxsd's UNet names them), CLIP's
  # "layers.0" -> "layers/0" (as FlaxCLIPTextModel does).
  def unet_path(path):
    return tuple("_".join(p) for p in _merge_indices(path))

  unet_params = _linear_kernels(unet.state_dict(), unet_path)
  text_params = _linear_kernels(text.state_dict())
  # The same targets, shapes and names as jaxsd's own UNet and Flax CLIP.
  ours = jax.eval_shape(lambda: unet_lib.UNet(**UNET).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
      jnp.zeros((1, 5, 16)))["params"])
  flax_clip = transformers.FlaxCLIPTextModel(
      transformers.CLIPTextConfig(**CLIP), _do_init=False)
  flax_text = jax.eval_shape(lambda: flax_clip.module.init(
      jax.random.key(0), jnp.zeros((1, 7), jnp.int32),
      jnp.ones((1, 7), jnp.int32), jnp.zeros((1, 7), jnp.int32))["params"])
  for theirs, mine, targets in ((unet_params, ours, lora.UNET_TARGETS),
                                (text_params, flax_text, lora.TEXT_TARGETS)):
    shapes = lambda t: {p: flat(t)[p + ("kernel",)].shape
                        for p in lora.target_paths(t, targets)}
    assert shapes(theirs) == shapes(mine)

  unet_adapters = trained(lora.init_adapters(
      jax.random.key(0), unet_params, lora.UNET_TARGETS, RANK), seed=1)
  text_adapters = trained(lora.init_adapters(
      jax.random.key(1), text_params, lora.TEXT_TARGETS, RANK), seed=2)
  lora_format.save_diffusers_lora(str(tmp_path), unet_adapters,
                                  text_adapters, alpha=ALPHA)
  before = {"unet": {k: v.clone() for k, v in unet.state_dict().items()},
            "text": {k: v.clone() for k, v in text.state_dict().items()}}

  # (offline, as the tests run, diffusers needs the file's name)
  pipe.load_lora_weights(str(tmp_path), weight_name=lora_format.WEIGHT_NAME)
  pipe.fuse_lora()
  pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers

  for name, model, params, adapters, rename, targets in (
      ("unet", unet, unet_params, unet_adapters, unet_path,
       lora.UNET_TARGETS),
      ("text", text, text_params, text_adapters, lambda p: p,
       lora.TEXT_TARGETS)):
    merged = flat(lora.merge(params, adapters, ALPHA))
    targeted = {lora_format.diffusers_module_name(p) + ".weight"
                for p in lora.target_paths(params, targets)}
    after = model.state_dict()
    assert after.keys() == before[name].keys()
    changed = {k for k in after if not torch.equal(after[k], before[name][k])}
    assert changed == targeted, name
    for key in targeted:
      path = rename(tuple(key.split(".")[:-1])) + ("kernel",)
      np.testing.assert_allclose(after[key].numpy().T, merged[path], atol=1e-6,
                                 rtol=0, err_msg=key)


def _merge_indices(path):
  """("down_blocks", "0", "attentions") -> [("down_blocks", "0"),
  ("attentions",)]: a torch ModuleList index joins its list's name."""
  out = []
  for part in path:
    if part.isdigit() and out:
      out[-1] = out[-1] + (part,)
    else:
      out.append((part,))
  return out


def test_metadata_is_what_diffusers_reads(tmp_path, mlp):
  """The file's lora_adapter_metadata is diffusers' own: prefixed peft
  LoraConfig kwargs that diffusers' loader hands to peft's LoraConfig."""
  peft = pytest.importorskip("peft")
  _, params, _ = mlp
  adapters = lora.init_adapters(jax.random.key(0), params, ["to_q"], RANK)
  path = lora_format.save_diffusers_lora(str(tmp_path),
                                         unet_adapters=adapters, alpha=ALPHA)
  # pylint: disable-next=g-import-not-at-top
  from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
  metadata = _load_sft_state_dict_metadata(path)
  assert metadata == json.loads(json.dumps(lora_format.lora_metadata(
      adapters, ALPHA)))
  config = peft.LoraConfig(**{k.removeprefix("unet."): v
                              for k, v in metadata.items()})
  assert (config.r, config.lora_alpha) == (RANK, ALPHA)
  assert set(config.target_modules) == {"to_q"}
