"""diffusers' PyTorch UNet2DConditionModel -> jaxsd's UNet and back, with the
PyTorch model as the oracle: outputs of loaded folders (safetensors, .bin,
shards, pipeline folders), the exact export, config checks and errors."""
import contextlib
import json
import os
import re

import flax
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlaxUNet2DConditionModel
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models import activations
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.utils import logging as diffusers_logging

from jaxsd import models
from jaxsd.models import unet_convert

diffusers_logging.set_verbosity_error()

# Max |jaxsd - PyTorch| relative to max(1, max |PyTorch|), float32 on CPU.
TOL = 1e-4  # PyTorch computing with jaxsd's numerics (~1e-6 seen)
# PyTorch's own numerics (unet_convert.NUMERICS; ~2e-4 seen, GELU's share).
NUMERICS_TOL = 1e-3
# jax_disable_most_optimizations' settings, for these compiles only.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}

CASES = {
    # SD 1.x's layout, shrunk: one head count, conv projections.
    "sd1": dict(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8),
    # SD 2.x's: per-block head counts, linear projections, upcast attention;
    # plus two transformer layers in one block and a cross-only block.
    "sd2": dict(
        sample_size=16, in_channels=4, out_channels=4,
        block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                        "CrossAttnUpBlock2D"),
        attention_head_dim=[2, 4, 8], use_linear_projection=True,
        upcast_attention=True, cross_attention_dim=24, norm_num_groups=4,
        transformer_layers_per_block=[1, 2, 1],
        only_cross_attention=[False, True, False]),
}


def torch_unet(seed=0, **fields):
  """A random UNet2DConditionModel, every parameter moved off its init
  (zero-initialised proj_out and conv_out would hide a dropped block)."""
  torch.manual_seed(seed)
  model = TorchUNet(**fields)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def inputs(cfg, seed=0):
  """NHWC sample (H != W catches a swapped axis), timesteps, context."""
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((2, 16, 24, cfg["in_channels"]))
  timesteps = np.array([3.0, 871.5])
  context = rng.standard_normal((2, 7, cfg["cross_attention_dim"]))
  return tuple(a.astype(np.float32) for a in (sample, timesteps, context))


@contextlib.contextmanager
def jaxsd_numerics(model):
  """PyTorch computing as diffusers' Flax UNet (jaxsd's UNet with
  torch_numerics=False) does (unet_convert.NUMERICS)."""
  norms = [m.norm for m in model.modules() if isinstance(m, Transformer2DModel)]
  exact = activations.GEGLU.gelu
  activations.GEGLU.gelu = lambda self, g: F.gelu(g, approximate="tanh")
  for norm in norms:
    norm.eps = 1e-5
  try:
    yield
  finally:
    activations.GEGLU.gelu = exact
    for norm in norms:
      norm.eps = 1e-6


def torch_forward(model, sample, timesteps, context):
  with torch.no_grad():
    out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)),
                torch.from_numpy(timesteps), torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_close(got, want, tol):
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() / scale < tol


def assert_same_params(a, b):
  fa, fb = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (_, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (torch model, folder saved as safetensors); read only."""
  out = {}
  for name, cfg in CASES.items():
    model = torch_unet(**cfg)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


# --- Outputs -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_loaded_unet_matches_pytorch(saved, name):
  model, folder = saved[name]
  module, params = unet_convert.load_diffusers(folder)
  x = inputs(CASES[name])
  got = np.asarray(jax.jit(module.apply, compiler_options=FAST_COMPILE)(
      {"params": params}, *x))
  # Loaded with PyTorch's numerics (UNet.torch_numerics: exact GELU, eps
  # 1e-6 in the transformers' GroupNorm): PyTorch's own output.
  assert module.torch_numerics
  assert_close(got, torch_forward(model, *x), TOL)
  # Diffusers' Flax numerics (jaxsd's default) are measurably further off:
  # the flag is what closes the gap.
  flax_numerics = np.asarray(jax.jit(
      module.clone(torch_numerics=False).apply,
      compiler_options=FAST_COMPILE)({"params": params}, *x))
  with jaxsd_numerics(model):
    assert_close(flax_numerics, torch_forward(model, *x), TOL)
  assert_close(flax_numerics, torch_forward(model, *x), NUMERICS_TOL)


def test_bin_and_sharded_folders_load_to_the_same_params(saved, tmp_path):
  model, folder = saved["sd1"]
  _, want = unet_convert.load_diffusers(folder)
  model.save_pretrained(tmp_path / "bin", safe_serialization=False)
  model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
  assert os.listdir(tmp_path / "bin").count("diffusion_pytorch_model.bin")
  index = "diffusion_pytorch_model.safetensors.index.json"
  assert index in os.listdir(tmp_path / "shards")
  for sub in ("bin", "shards"):
    _, got = unet_convert.load_diffusers(str(tmp_path / sub))
    assert_same_params(got, want)


def test_pipeline_folder_is_found(saved, tmp_path):
  model, folder = saved["sd1"]
  model.save_pretrained(tmp_path / "unet")
  (tmp_path / "model_index.json").write_text("{}")
  assert unet_convert.unet_folder(str(tmp_path)) == str(tmp_path / "unet")
  module, params = unet_convert.load_diffusers(str(tmp_path))
  want_module, want = unet_convert.load_diffusers(folder)
  assert module == want_module
  assert_same_params(params, want)


# --- Export ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_export_is_the_exact_inverse(saved, name):
  model = saved[name][0]
  want = state_dict(model)
  params = unet_convert.convert_diffusers_weights(want, dict(model.config))
  got = unet_convert.to_diffusers_weights(params)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  fresh = TorchUNet(**CASES[name])
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()},
                        strict=True)


def test_saved_folder_loads_in_pytorch(saved, tmp_path):
  model, folder = saved["sd2"]
  module, params = unet_convert.load_diffusers(folder)
  unet_convert.save_diffusers(module, params, str(tmp_path), sample_size=16)
  reloaded = TorchUNet.from_pretrained(str(tmp_path)).eval()
  as_json = lambda c: json.loads(json.dumps(dict(c)))  # tuples -> lists
  got, want = as_json(reloaded.config), as_json(model.config)
  for key in want:
    if not key.startswith("_") and key != "upcast_attention":
      assert got[key] == want[key], key
  x = inputs(CASES["sd2"])
  np.testing.assert_allclose(torch_forward(reloaded, *x),
                             torch_forward(model, *x), atol=1e-6, rtol=0)
  # And back: the saved folder is the same UNet to jaxsd too.
  module_again, params_again = unet_convert.load_diffusers(str(tmp_path))
  assert module_again == module
  assert_same_params(params_again, params)


def test_export_refuses_jaxsd_only_text_pooling(saved):
  module, params = unet_convert.load_diffusers(saved["sd1"][1])
  pooled = module.clone(pooled_text_embedding="mean")
  with pytest.raises(ValueError, match="pooled_text_embedding"):
    unet_convert.config_to_diffusers(pooled)
  with pytest.raises(ValueError, match="pooled_text_embedding"):
    unet_convert.to_diffusers_weights(
        dict(params, text_embedding={"linear_1": {"bias": np.zeros(4)}}))


# --- Configs -----------------------------------------------------------------

SD1 = dict(CASES["sd1"],
           down_block_types=list(CASES["sd1"]["down_block_types"]),
           up_block_types=list(CASES["sd1"]["up_block_types"]))


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
    ("addition_time_embed_dim", 256), ("num_class_embeds", 10),
    ("projection_class_embeddings_input_dim", 8), ("time_cond_proj_dim", 32),
    ("encoder_hid_dim", 16), ("encoder_hid_dim_type", "text_proj"),
    ("resnet_time_scale_shift", "scale_shift"), ("conv_in_kernel", 1),
    ("conv_out_kernel", 1), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", None), ("dual_cross_attention", True),
    ("attention_type", "gated"), ("norm_eps", 1e-6), ("downsample_padding", 0),
    ("mid_block_scale_factor", 2), ("num_attention_heads", 4),
    ("cross_attention_norm", "group_norm"), ("time_embedding_type", "fourier"),
    ("resnet_out_scale_factor", 2.0), ("resnet_skip_time_act", True),
    ("time_embedding_dim", 64), ("time_embedding_act_fn", "silu"),
    ("timestep_post_act", "silu"), ("class_embeddings_concat", True),
    ("act_fn", "gelu"), ("center_input_sample", True),
    ("norm_num_groups", None), ("layers_per_block", [1, 2]),
    ("cross_attention_dim", [32, 16]), ("attention_head_dim", 3),
    ("attention_head_dim", [8, None]),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("transformer_layers_per_block", [[1, 2], 1]),
    ("reverse_transformer_layers_per_block", [2, 1]),
    ("a_future_field", 1), ("_class_name", "UNet2DModel"),
])
def test_unsupported_config_fields_are_refused(key, value):
  with pytest.raises(ValueError) as e:
    unet_convert.unet_from_config(dict(SD1, **{key: value}))
  message = str(e.value)
  assert repr(value) in message or str(value) in message
  if not key.startswith("_"):
    assert key in message and "not" in message and "support" in message


def test_config_fields_that_change_nothing_are_accepted():
  want = unet_convert.unet_from_config(SD1)
  same = dict(SD1, upcast_attention=True, num_attention_heads=8,
              mid_block_only_cross_attention=True, layers_per_block=[1, 1],
              cross_attention_dim=[32, 32], attention_head_dim=[8, 8],
              sample_size=64, time_embedding_dim=128,
              reverse_transformer_layers_per_block=[1, 1],
              _diffusers_version="0.39.0", _class_name="UNet2DConditionModel")
  assert unet_convert.unet_from_config(same) == want
  sd2 = unet_convert.unet_from_config(CASES["sd2"])
  assert sd2.attention_head_dim == (2, 4, 8)
  assert sd2.transformer_layers_per_block == (1, 2, 1)
  assert sd2.only_cross_attention == (False, True, False)
  assert sd2.use_linear_projection and sd2.cross_attention_dim == 24


_SD_TYPES = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
# The unet/config.json of SD 1.5 and of SD 2.1, as published.
SD15_CONFIG = dict(
    _SD_TYPES, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0",
    act_fn="silu", attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32,
    out_channels=4, sample_size=64)
SD21_CONFIG = dict(
    SD15_CONFIG, _diffusers_version="0.10.0.dev0",
    attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    dual_cross_attention=False, num_class_embeds=None,
    only_cross_attention=False, resnet_time_scale_shift="default",
    upcast_attention=True, use_linear_projection=True, sample_size=96,
    class_embed_type=None)


@pytest.mark.parametrize("cfg", [SD15_CONFIG, SD21_CONFIG],
                         ids=["sd1.5", "sd2.1"])
def test_full_size_sd_configs_have_pytorchs_parameters(cfg):
  """Every name and shape of the real UNets (PyTorch's on the meta device:
  shapes without memory)."""
  with torch.device("meta"):
    model = TorchUNet(**cfg)
  want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  shapes = unet_convert.param_shapes(unet_convert.unet_from_config(cfg))
  got = {unet_convert.torch_key(p): unet_convert.torch_shape(p, v.shape)
         for p, v in flax.traverse_util.flatten_dict(shapes).items()}
  assert got == want


def test_config_round_trips_through_diffusers():
  for cfg in CASES.values():
    module = unet_convert.unet_from_config(cfg)
    exported = unet_convert.config_to_diffusers(module)
    assert unet_convert.unet_from_config(exported) == module
    TorchUNet.from_config(exported)  # diffusers builds it


# --- Errors ------------------------------------------------------------------

def test_missing_folder_config_or_weights_raise(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="No folder"):
    unet_convert.load_diffusers(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    unet_convert.load_diffusers(str(tmp_path))
  with open(os.path.join(saved["sd1"][1], "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(FileNotFoundError,
                     match="diffusion_pytorch_model.safetensors"):
    unet_convert.load_diffusers(str(tmp_path))
  index = {"weight_map": {"conv_in.weight": "shard-1.safetensors"}}
  (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps(index))
  with pytest.raises(FileNotFoundError, match="shard-1.safetensors"):
    unet_convert.load_diffusers(str(tmp_path))


def test_state_dict_that_does_not_fit_raises_naming_keys(saved):
  model = saved["sd1"][0]
  cfg = dict(model.config)
  weights = state_dict(model)
  missing = {k: v for k, v in weights.items() if k != "conv_in.bias"}
  with pytest.raises(ValueError, match=r"missing \['conv_in.bias'\]"):
    unet_convert.convert_diffusers_weights(missing, cfg)
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias"
  extra = dict(weights, **{key: np.zeros(32, np.float32)})
  with pytest.raises(ValueError, match=re.escape(f"unexpected ['{key}']")):
    unet_convert.convert_diffusers_weights(extra, cfg)
  wrong = dict(weights, **{"conv_in.weight": np.zeros((32, 4, 1, 1))})
  with pytest.raises(ValueError,
                     match=re.escape("conv_in.weight is (32, 4, 1, 1), not "
                                     "(32, 4, 3, 3)")):
    unet_convert.convert_diffusers_weights(wrong, cfg)
  # Weights of another architecture: a few keys named, the rest counted.
  with pytest.raises(ValueError, match=r"missing \[.*\] and \d+ more"):
    unet_convert.convert_diffusers_weights(weights, CASES["sd2"])


# --- model.pretrained --------------------------------------------------------

def test_pretrained_jaxsd_unet_loads_pytorch_weights(saved, tiny_config,
                                                     tmp_path):
  model, folder = saved["sd1"]
  model.save_pretrained(tmp_path / "unet")  # a pipeline folder
  config = tiny_config().model
  config.implementation, config.pretrained = "jaxsd", str(tmp_path)
  config.pooled_text_embedding = ""
  unet = models.build_unet(config, cross_attention_dim=32)
  want_module, want = unet_convert.load_diffusers(folder)
  assert unet.module == want_module
  assert_same_params(unet.init(jax.random.key(0), (16, 16, 4), (7, 32)), want)
  with pytest.raises(ValueError, match="cross_attention_dim=32"):
    models.build_unet(config, cross_attention_dim=24)
  config.pooled_text_embedding = "mean"
  with pytest.raises(ValueError, match="pooled_text_embedding"):
    models.build_unet(config, cross_attention_dim=32)


def test_pretrained_jaxsd_unet_still_reads_flax_weights(tiny_config, tmp_path):
  cfg = dict(CASES["sd1"])
  del cfg["norm_num_groups"]  # diffusers' Flax UNet has GroupNorm(32) only
  flax_model = FlaxUNet2DConditionModel(**cfg)
  shapes = jax.eval_shape(flax_model.init_weights, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  flax_model.save_pretrained(tmp_path, params=params)
  config = tiny_config().model
  config.implementation, config.pretrained = "jaxsd", str(tmp_path)
  config.pooled_text_embedding = ""
  unet = models.build_unet(config, cross_attention_dim=32)
  assert unet.module.norm_num_groups == 32
  got = unet.init(jax.random.key(0), (16, 16, 4), (7, 32))
  assert_same_params(got, params)
