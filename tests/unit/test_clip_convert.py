"""jaxsd's CLIP text encoder conversion against transformers' PyTorch
CLIPTextModel as the oracle: its saved folders (safetensors, .bin, sharded,
with a projection, inside a pipeline) load and encode as torch does, the
export loads back into torch, TextEncoder reads such folders through
text.pretrained, and bad folders, configs, weights and pickles are refused."""
import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsd.text import encoder as text_lib
from jaxsd.models import clip_convert

TOL = 1e-4  # max abs difference to PyTorch's last hidden states
PROMPTS = ["a photograph of the number 3", "", "a red cube on a blue sphere, "
           "photographed from above at dusk"]


def tiny_config(**changes):
  fields = dict(vocab_size=49408, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
  fields.update(changes)
  return transformers.CLIPTextConfig(**fields)


def perturbed(model, seed=0):
  """The model with noise on every parameter: fresh norms (scale 1, bias 0)
  and zero biases would hide a swapped or dropped scale or bias."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def torch_model():
  return perturbed(transformers.CLIPTextModel(tiny_config()))


@pytest.fixture(scope="module")
def saved(torch_model, tmp_path_factory):
  """A folder of the model saved as safetensors; tests copy it before
  changing anything in it."""
  folder = str(tmp_path_factory.mktemp("clip") / "text_encoder")
  torch_model.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def ids(tokenizer):
  return text_lib.tokenize(tokenizer, PROMPTS, 77)


def torch_hidden(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64))
                 ).last_hidden_state.numpy()


def jax_hidden(module, params, ids):
  fn = jax.jit(lambda p, i: module.apply(
      {"params": p}, i, jnp.ones_like(i),
      jnp.broadcast_to(jnp.arange(i.shape[-1]), i.shape),
      deterministic=True)[0])
  return np.asarray(fn(params, jnp.asarray(ids)))


def state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same_params(a, b):
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert flat_a.keys() == flat_b.keys()
  for key, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[key]))


# --- Loading and numerics ---------------------------------------------------


def test_param_tree_is_flax_clip_text_models(saved):
  """The converted tree is exactly the one FlaxCLIPTextModel initialises."""
  _, params, config = clip_convert.load_text_encoder(saved)
  model = transformers.FlaxCLIPTextModel(config, _do_init=False)
  want = jax.eval_shape(lambda: model.init_weights(jax.random.key(0),
                                                   (1, 77)))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for got, spec in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.shape == spec.shape and got.dtype == jnp.float32


@pytest.mark.parametrize("safe_serialization", [True, False],
                         ids=["safetensors", "bin"])
def test_matches_pytorch(torch_model, ids, safe_serialization, tmp_path):
  folder = str(tmp_path / "text_encoder")
  torch_model.save_pretrained(folder, safe_serialization=safe_serialization)
  weights = ("model.safetensors" if safe_serialization else
             "pytorch_model.bin")
  assert set(os.listdir(folder)) == {"config.json", weights}
  module, params, config = clip_convert.load_text_encoder(folder)
  assert config.hidden_size == 32 and config.num_hidden_layers == 2
  ours = jax_hidden(module, params, ids)
  theirs = torch_hidden(torch_model, ids)
  assert ours.shape == (len(PROMPTS), 77, 32)
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  # Noise on the weights moves the output: the comparison is not vacuous.
  assert np.abs(theirs).max() > 0.5


def test_sharded_and_pipeline_folders(torch_model, saved, ids, tmp_path):
  """A sharded save (an index.json naming the shards) loads to the same
  params; so does a pipeline folder's text_encoder/."""
  _, want, _ = clip_convert.load_text_encoder(saved)
  sharded = str(tmp_path / "sharded")
  torch_model.save_pretrained(sharded, max_shard_size="1MB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  assert not os.path.isfile(os.path.join(sharded, "model.safetensors"))
  _, params, _ = clip_convert.load_text_encoder(sharded)
  assert_same_params(params, want)
  pipeline = tmp_path / "pipeline"
  shutil.copytree(saved, pipeline / "text_encoder")
  (pipeline / "model_index.json").write_text("{}")
  _, params, _ = clip_convert.load_text_encoder(str(pipeline))
  assert_same_params(params, want)


def test_with_projection_weights(ids, tmp_path):
  """CLIPTextModelWithProjection (SDXL's text_encoder_2): the projection is
  ignored, the last hidden states match."""
  model = perturbed(transformers.CLIPTextModelWithProjection(
      tiny_config(projection_dim=16, hidden_act="gelu")), seed=1)
  folder = str(tmp_path / "text_encoder_2")
  model.save_pretrained(folder)
  module, params, config = clip_convert.load_text_encoder(folder)
  assert config.hidden_act == "gelu"
  with torch.no_grad():
    theirs = model(torch.from_numpy(ids.astype(np.int64))
                   ).last_hidden_state.numpy()
  np.testing.assert_allclose(jax_hidden(module, params, ids), theirs,
                             atol=TOL, rtol=0)


def test_whole_clip_model_folder(ids, tmp_path):
  """A CLIPModel folder (model_type "clip", e.g. openai/clip-vit-*): its
  text tower is read, the vision tower and projections ignored."""
  config = transformers.CLIPConfig(
      text_config=tiny_config().to_dict(),
      vision_config=dict(hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=16),
      projection_dim=8)
  model = perturbed(transformers.CLIPModel(config), seed=2)
  folder = str(tmp_path / "clip")
  model.save_pretrained(folder)
  module, params, text_config = clip_convert.load_text_encoder(folder)
  assert text_config.hidden_size == 32
  with torch.no_grad():
    theirs = model.text_model(torch.from_numpy(ids.astype(np.int64))
                              ).last_hidden_state.numpy()
  np.testing.assert_allclose(jax_hidden(module, params, ids), theirs,
                             atol=TOL, rtol=0)


# --- Export -----------------------------------------------------------------


def test_round_trip_exact(torch_model, saved):
  config = tiny_config()
  sd = state_dict(torch_model)
  back = clip_convert.to_clip_text_weights(
      clip_convert.convert_clip_text_weights(sd, config))
  assert back.keys() == sd.keys()
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  fresh = transformers.CLIPTextModel(config)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                        strict=True)
  for key, value in fresh.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), sd[key], err_msg=key)


def test_save_text_encoder_loads_in_transformers(torch_model, saved, ids,
                                                 tmp_path):
  _, params, config = clip_convert.load_text_encoder(saved)
  out = str(tmp_path / "export")
  text_lib.save_text_encoder(config, params, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  loaded, info = transformers.CLIPTextModel.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info  # nothing missing, unexpected, ...
  sd = state_dict(torch_model)
  for key, value in loaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), sd[key], err_msg=key)
  np.testing.assert_array_equal(torch_hidden(loaded.eval(), ids),
                                torch_hidden(torch_model, ids))
  # And back into jaxsd, unchanged.
  _, again, _ = clip_convert.load_text_encoder(out)
  assert_same_params(again, params)


# --- TextEncoder ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["text_encoder", "pipeline"])
def test_text_encoder_reads_pytorch_folder(tiny_config, tokenizer, torch_model,
                                           saved, ids, layout, tmp_path):
  """text.pretrained naming a PyTorch folder (no flax_model.msgpack) loads
  through the conversion, and the run encodes with those weights."""
  path = saved
  if layout == "pipeline":
    path = str(tmp_path / "pipeline")
    shutil.copytree(saved, os.path.join(path, "text_encoder"))
  assert not os.path.exists(os.path.join(saved, "flax_model.msgpack"))
  text_config = tiny_config().text
  text_config.pretrained = path
  text_config.max_length = 77
  encoder = text_lib.TextEncoder(text_config, text_lib.vocab_size(tokenizer))
  assert encoder.hidden_size == 32 and encoder.config.num_hidden_layers == 2
  params = encoder.init(jax.random.key(0))
  _, want, _ = clip_convert.load_text_encoder(saved)
  assert_same_params(params, want)
  ours = np.asarray(jax.jit(encoder)(params, jnp.asarray(ids)))
  np.testing.assert_allclose(ours, torch_hidden(torch_model, ids), atol=TOL,
                             rtol=0)


def test_text_encoder_folder_without_weights(tiny_config, tokenizer, saved,
                                             tmp_path):
  folder = tmp_path / "text_encoder"
  folder.mkdir()
  shutil.copy(os.path.join(saved, "config.json"), folder)
  text_config = tiny_config().text
  text_config.pretrained = str(folder)
  with pytest.raises(FileNotFoundError, match="model.safetensors or "
                     "pytorch_model.bin"):
    text_lib.TextEncoder(text_config, text_lib.vocab_size(tokenizer))


# --- Refusals -----------------------------------------------------------------


def _config_only(saved, tmp_path, **changes):
  folder = tmp_path / "text_encoder"
  folder.mkdir()
  with open(os.path.join(saved, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))
  return folder


def test_missing_folder_config_and_weights(saved, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip_convert.load_text_encoder(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="No config.json in"):
    clip_convert.load_text_encoder(str(empty))
  folder = _config_only(saved, tmp_path)
  with pytest.raises(FileNotFoundError, match=f"No text encoder weights in "
                     f"{folder}"):
    clip_convert.load_text_encoder(str(folder))


@pytest.mark.parametrize("change,message", [
    (dict(model_type="t5"), r"model_type='t5'; jaxsd's text encoder is "
                            "CLIP's"),
    (dict(hidden_act="gelu_10"), r"hidden_act='gelu_10' has no Flax"),
])
def test_unsupported_config_refused(saved, tmp_path, change, message):
  folder = _config_only(saved, tmp_path, **change)
  shutil.copy(os.path.join(saved, "model.safetensors"), folder)
  with pytest.raises(ValueError, match=message):
    clip_convert.load_text_encoder(str(folder))


def test_weights_not_fitting_config_refused(torch_model):
  config = tiny_config()
  sd = state_dict(torch_model)
  sd["text_model.embeddings.position_ids"] = np.arange(77)[None]  # dropped
  clip_convert.convert_clip_text_weights(sd, config)
  missing = dict(sd)
  del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match=r"missing \['text_model\.encoder\."
                     r"layers\.1\.mlp\.fc2\.bias'\], unexpected \[\]"):
    clip_convert.convert_clip_text_weights(missing, config, "te/")
  extra = dict(sd, **{"text_model.encoder.layers.2.mlp.fc1.weight":
                      np.zeros((48, 32), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected \['text_model\.encoder\."
                     r"layers\.2\.mlp\.fc1\.weight'\]"):
    clip_convert.convert_clip_text_weights(extra, config)
  wrong = dict(sd, **{"text_model.encoder.layers.0.mlp.fc1.weight":
                      np.zeros((32, 48), np.float32)})
  with pytest.raises(ValueError, match=r"te/: text_model\.encoder\.layers\.0"
                     r"\.mlp\.fc1\.weight has shape \(32, 48\), the config "
                     r"needs \(48, 32\)"):
    clip_convert.convert_clip_text_weights(wrong, config, "te/")


class _RunsShell:
  """Pickles as a call of os.system: what a malicious .bin would hold.
  Pickling only records the call; loading it with pickle would run it (as
  in tests/test_autoencoder.py)."""

  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


def test_bin_naming_a_callable_refused(saved, tmp_path):
  """A pytorch_model.bin (torch's zip format) whose pickle calls os.system
  is refused, and the call never runs."""
  folder = _config_only(saved, tmp_path)
  sentinel = tmp_path / "ran"
  payload = pickle.dumps(
      {"text_model.final_layer_norm.weight": _RunsShell(sentinel)},
      protocol=2)
  with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as archive:
    archive.writestr("archive/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle "
                     r"(posix|os)\.system"):
    clip_convert.load_text_encoder(str(folder))
  assert not sentinel.exists()
