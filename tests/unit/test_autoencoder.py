"""jaxsd's AutoencoderKL against diffusers' PyTorch AutoencoderKL as the
oracle: loading its saved folders (safetensors and .bin), encode and decode
values, the export back to PyTorch, legacy attention names, and the errors
a wrong config or weight file must give."""
import functools
import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.utils import logging as diffusers_logging

from jaxsd.models import autoencoder as ae
from jaxsd.models import torch_weights

diffusers_logging.set_verbosity_error()

TOL = 1e-4  # max abs difference to PyTorch (float32 on CPU: ~1e-6 seen)

# A few architectures, kept tiny. Each covers fields the others leave at
# diffusers' defaults, and each is saved in one format first (the other is
# checked to load to the same params).
CASES = {
    "2_blocks": dict(block_out_channels=(8, 16), layers_per_block=1,
                     latent_channels=4, norm_num_groups=4),
    "3_blocks_gray_no_quant": dict(
        block_out_channels=(8, 16, 16), layers_per_block=2, in_channels=1,
        out_channels=1, latent_channels=8, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False),
    "3_blocks_no_attention_shifted": dict(
        block_out_channels=(8, 8, 16), layers_per_block=1, in_channels=3,
        out_channels=1, latent_channels=4, norm_num_groups=2,
        mid_block_add_attention=False, scaling_factor=0.13025,
        shift_factor=0.0609),
    "2_blocks_post_quant_only": dict(
        block_out_channels=(16, 16), layers_per_block=2, latent_channels=8,
        norm_num_groups=8, use_quant_conv=False, scaling_factor=0.5),
}


def torch_vae(seed=0, **fields):
  """A random diffusers AutoencoderKL, its weights moved off their init.

  Fresh norms (scale 1, bias 0) and zero biases would hide a swapped or
  dropped scale or bias; noise on every parameter makes each one count.
  """
  n = len(fields["block_out_channels"])
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n,
                             up_block_types=["UpDecoderBlock2D"] * n,
                             **fields)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def nhwc(t):
  return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def images(channels, seed=0):
  """Non-square [2, H, W, C] in [-1, 1]: H != W catches a swapped axis."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (2, 16, 24, channels)).astype(np.float32)


def torch_encode_decode(model, x):
  """(mean, logvar, decode(mean)) of diffusers' model, NHWC numpy."""
  with torch.no_grad():
    posterior = model.encode(nchw(x)).latent_dist
    decoded = model.decode(posterior.mean).sample
  return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(decoded)


@functools.lru_cache(maxsize=None)
def jitted(module):
  """(encode, decode) of a module, jitted with params as an argument."""
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                             method=module.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z,
                                             method=module.decode))
  return encode, decode


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(torch model, folder) of the "2_blocks" model saved as safetensors;
  tests copy the folder before changing anything in it."""
  model = torch_vae(**CASES["2_blocks"])
  folder = str(tmp_path_factory.mktemp("vae"))
  model.save_pretrained(folder)
  return model, folder


def state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# --- Loading and numerics ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pytorch(name, tmp_path):
  """Both of save_pretrained's formats load to the same params, and
  encode's mean and logvar and decode match PyTorch."""
  fields = CASES[name]
  model = torch_vae(**fields)
  model.save_pretrained(tmp_path / "st")
  model.save_pretrained(tmp_path / "bin", safe_serialization=False)
  assert os.listdir(tmp_path / "bin").count(
      "diffusion_pytorch_model.bin") == 1
  module, params = ae.load_diffusers(ae.vae_folder(str(tmp_path / "st")))
  _, params_bin = ae.load_diffusers(ae.vae_folder(str(tmp_path / "bin")))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_bin)

  # Every field of the config.json arrives, the factors included.
  assert module.config == ae.AutoencoderConfig(**fields)

  x = images(fields.get("in_channels", 3))
  mean, logvar, decoded = torch_encode_decode(model, x)
  encode, decode = jitted(module)
  our_mean, our_logvar = encode(params, jnp.asarray(x))
  assert our_mean.shape == (2, 16 // module.config.downsample_factor,
                            24 // module.config.downsample_factor,
                            fields["latent_channels"])
  assert max_diff(our_mean, mean) < TOL
  assert max_diff(our_logvar, logvar) < TOL
  # Decode the same latents, so decode's error is its own.
  our_decoded = decode(params, jnp.asarray(mean))
  assert our_decoded.shape == x.shape[:3] + (fields.get("out_channels", 3),)
  assert max_diff(our_decoded, decoded) < TOL


def test_pipeline_folder_layout(saved, tmp_path):
  """A pipeline folder (model_index.json + vae/) is found through its vae/;
  a folder with neither a vae nor a vae/ is None."""
  _, folder = saved
  pipeline = tmp_path / "pipeline"
  shutil.copytree(folder, pipeline / "vae")
  (pipeline / "model_index.json").write_text(
      json.dumps({"_class_name": "StableDiffusionPipeline",
                  "vae": ["diffusers", "AutoencoderKL"]}))
  assert ae.vae_folder(str(pipeline)) == str(pipeline / "vae")
  assert ae.vae_folder(folder) == folder

  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "model_index.json").write_text("{}")
  assert ae.vae_folder(str(empty)) is None
  # A config.json without weights is not a model folder either.
  config_only = tmp_path / "config_only"
  config_only.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), config_only)
  assert ae.vae_folder(str(config_only)) is None


def test_export_loads_into_pytorch(saved):
  """to_diffusers_weights gives the exact state dict of a strict load into
  the PyTorch model that config.to_diffusers() describes."""
  model, folder = saved
  module, params = ae.load_diffusers(folder)
  exported = ae.to_diffusers_weights(params)
  theirs = TorchAutoencoderKL.from_config(module.config.to_diffusers()).eval()
  theirs.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                         strict=True)
  original = state_dict(model)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)

  z = np.random.default_rng(1).standard_normal((2, 4, 6, 4)).astype(np.float32)
  with torch.no_grad():
    want = nhwc(model.decode(nchw(z)).sample)
    got = nhwc(theirs.decode(nchw(z)).sample)
  np.testing.assert_array_equal(got, want)
  _, decode = jitted(module)
  assert max_diff(decode(params, jnp.asarray(z)), want) < TOL


def test_legacy_attention_names(saved):
  """query/key/value/proj_attn, as linears or as [C, C, 1, 1] convs,
  convert to the same params as diffusers' to_q/to_k/to_v/to_out.0."""
  model, _ = saved
  config = ae.AutoencoderConfig(**CASES["2_blocks"])
  modern = state_dict(model)
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value",
                  "to_out.0": "proj_attn"}

  def legacy(as_conv):
    out = {}
    for key, value in modern.items():
      for new, old in legacy_names.items():
        marker = f".attentions.0.{new}."
        if marker in key:
          key = key.replace(marker, f".attentions.0.{old}.")
          if as_conv and key.endswith("weight"):
            value = value[:, :, None, None]
      out[key] = value
    return out

  renamed = legacy(as_conv=False)
  # weight and bias, in the encoder's and the decoder's mid block
  assert sum(".query." in k for k in renamed) == 4
  want = ae.convert_diffusers_weights(modern, config)
  for as_conv in (False, True):
    got = ae.convert_diffusers_weights(legacy(as_conv), config)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
        want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


# --- Errors -------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
    ({"use_magic": True}, r"fields \['use_magic'\] are not supported"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     "down_block_types has \\['AttnDownEncoderBlock2D'\\]"),
    ({"latents_mean": [0.1, 0.2, 0.3, 0.4]}, "latents_mean"),
    ({"_class_name": "VQModel"}, "describes a 'VQModel'"),
])
def test_unsupported_config_refused(saved, tmp_path, change, message):
  """A config.json asking for what jaxsd does not implement is refused
  when loading, with the file's path in the message."""
  _, folder = saved
  copy = tmp_path / "vae"
  shutil.copytree(folder, copy)
  with open(copy / "config.json") as f:
    cfg = json.load(f)
  ae.config_from_diffusers(cfg)  # the unchanged config is fine
  cfg.update(change)
  (copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=message) as error:
    ae.load_diffusers(str(copy))
  assert str(copy / "config.json") in str(error.value)


def test_weights_not_fitting_config_refused(saved):
  """A missing key, an unexpected one and a wrong shape are each named
  by their PyTorch key."""
  model, _ = saved
  config = ae.AutoencoderConfig(**CASES["2_blocks"])
  weights = state_dict(model)
  ae.convert_diffusers_weights(weights, config, "vae/")  # fits as it is

  missing = dict(weights)
  del missing["decoder.up_blocks.1.resnets.0.norm2.bias"]
  with pytest.raises(ValueError, match=r"vae/.*missing \['decoder\.up_blocks"
                     r"\.1\.resnets\.0\.norm2\.bias'\], unexpected \[\]"):
    ae.convert_diffusers_weights(missing, config, "vae/")

  extra = dict(weights, **{"encoder.extra.weight": np.ones((8, 8, 3, 3))})
  with pytest.raises(ValueError, match=r"unexpected \['encoder\.extra\."
                     r"weight'\]"):
    ae.convert_diffusers_weights(extra, config, "vae/")

  wrong = dict(weights)
  wrong["encoder.conv_in.weight"] = np.zeros((8, 1, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"vae/: encoder\.conv_in\.weight has "
                     r"shape \(8, 1, 3, 3\), the config needs \(8, 3, 3, 3\)"):
    ae.convert_diffusers_weights(wrong, config, "vae/")


class _RunsShell:
  """Pickles as a call of os.system: what a malicious .bin would hold.
  Pickling only records the call; loading it with pickle would run it."""

  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


def _bin_folder(saved, tmp_path):
  """A copy of the saved vae's config.json with no weights yet."""
  _, folder = saved
  vae = tmp_path / "vae"
  vae.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), vae)
  return vae


def test_bin_naming_a_callable_refused(saved, tmp_path):
  """A .bin (torch's zip format) whose pickle calls os.system is refused,
  and the call never runs."""
  vae = _bin_folder(saved, tmp_path)
  sentinel = tmp_path / "ran"
  payload = pickle.dumps({"encoder.conv_in.weight": _RunsShell(sentinel)},
                         protocol=2)
  with zipfile.ZipFile(vae / "diffusion_pytorch_model.bin", "w") as archive:
    archive.writestr("archive/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle "
                     r"(posix|os)\.system"):
    ae.load_diffusers(str(vae))
  assert not sentinel.exists()


def test_legacy_stream_bin_naming_a_callable_refused(saved, tmp_path):
  """The same for a .bin that is not a zip (torch's legacy stream, the
  format torch_checkpoint tries for anything else): its first pickle is
  the call."""
  vae = _bin_folder(saved, tmp_path)
  sentinel = tmp_path / "ran"
  (vae / "diffusion_pytorch_model.bin").write_bytes(
      pickle.dumps(_RunsShell(sentinel), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
    ae.load_diffusers(str(vae))
  assert not sentinel.exists()


def test_missing_weight_file(saved, tmp_path):
  vae = _bin_folder(saved, tmp_path)
  with pytest.raises(FileNotFoundError, match=str(vae)):
    ae.load_diffusers(str(vae))


def test_read_safetensors_half_precision(tmp_path):
  """bf16 and f16 tensors read to torch's values (safetensors' own
  writer)."""
  torch.manual_seed(0)
  tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16),
             "f16": torch.randn(2, 2, 3).to(torch.float16),
             "f32": torch.randn(4)}
  path = str(tmp_path / "t.safetensors")
  safetensors.torch.save_file(tensors, path)
  got = torch_weights.read_safetensors(path)
  assert sorted(got) == sorted(tensors)
  for name, tensor in tensors.items():
    assert got[name].shape == tuple(tensor.shape)
    assert got[name].dtype.itemsize == tensor.element_size()
    np.testing.assert_array_equal(got[name].astype(np.float32),
                                  tensor.float().numpy(), err_msg=name)
