"""Stable Diffusion in and out, with PyTorch diffusers as the oracle.

The test builds a tiny random pipeline in PyTorch (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, the shared CLIP tokenizer, an SD-style
DDIMScheduler) and saves it with `save_pretrained`. jaxsd imports it
(model.pretrained_pipeline): the text embeddings, the UNet's output and
the VAE's decode match PyTorch's within 1e-4, and a 10-step DDIM sampling
with guidance from the same initial latents matches the pipeline's images.
Fine-tuned and exported back to PyTorch: tests/e2e/test_sd_export.py.
"""
import json
import os
import pickle
import shutil
import zipfile

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
import _interop_layouts as layouts  # pylint: disable=g-import-not-at-top,wrong-import-position

import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()

PROMPTS = helpers.SD_PROMPTS
# Pixels after 10 guided DDIM steps: see helpers.SD_IMAGE_TOL.
IMAGE_TOL = helpers.SD_IMAGE_TOL


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def saved_pipeline(request, tmp_path_factory):
  sd2 = request.param == "sd2"
  pipe = helpers.torch_sd_pipeline(os.environ["JAXSD_CLIP_TOKENIZER"],
                                   "v_prediction" if sd2 else "epsilon",
                                   linear_projection=sd2)
  folder = str(tmp_path_factory.mktemp(f"pipeline_{request.param}"))
  pipe.save_pretrained(folder)
  return pipe, folder


def _config(tiny_config, folder):
  config = tiny_config()
  config.model.pretrained_pipeline = folder
  config.data.image_size = 16  # latents 8x8x4
  config.eval.metrics = ()
  return config


def _torch_latents(n, seed=0):
  return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(
      seed))


def test_import_matches_pytorch(tiny_config, saved_pipeline):
  pipe, folder = saved_pipeline
  config = _config(tiny_config, folder)
  comps = build.build_components(config)
  # The config now describes the pipeline.
  sched = pipe.scheduler.config
  assert config.diffusion.schedule == "scaled_linear"
  assert config.diffusion.prediction_type == sched.prediction_type
  assert (config.sampling.timestep_spacing, config.sampling.steps_offset,
          config.sampling.final_alpha) == ("leading", 1, "first")
  assert config.text.max_length == 77 and config.model.in_channels == 4
  params = comps.init_params(jax.random.key(0))

  ids = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=77,
                       truncation=True, return_tensors="np").input_ids
  with torch.no_grad():
    want = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
  # Jitted: one compile each, where eager calls compiled every op (~400).
  got = np.asarray(jax.jit(comps.encode)(params, ids.astype(np.int32)))
  np.testing.assert_allclose(got, want, atol=1e-4)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  t = np.array([1, 500, 981], np.int32)
  with torch.no_grad():
    want = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                     torch.from_numpy(t), torch.from_numpy(want)).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(comps.unet.apply)(params["unet"], x, t, got))
  scale = max(1.0, np.abs(want).max())
  assert np.abs(got - want).max() / scale < 1e-4

  z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():  # SD decodes latents / scaling_factor
    want = pipe.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))
                           / pipe.vae.config.scaling_factor).sample
  want = np.clip(want.numpy().transpose(0, 2, 3, 1), -1, 1)
  got = np.asarray(jax.jit(comps.decode)(comps.autoencoder_params, z))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_ddim_sampling_matches_the_pytorch_pipeline(tiny_config,
                                                    saved_pipeline):
  pipe, folder = saved_pipeline
  config = _config(tiny_config, folder)
  comps = build.build_components(config)
  params = comps.init_params(jax.random.key(0))
  latents = _torch_latents(len(PROMPTS))
  want = pipe(PROMPTS, num_inference_steps=10, guidance_scale=3.0,
              latents=latents.clone(), output_type="np").images
  generator = generate.Generator.from_config(
      comps, parallel.make_mesh(), config.sampling, num_steps=10,
      guidance_scale=3.0)
  got = generator(params, PROMPTS, jax.random.key(0),
                  noise=latents.numpy().transpose(0, 2, 3, 1))
  got = (got + 1.0) / 2.0
  assert np.abs(got - want).max() < IMAGE_TOL
  # Not a vacuous match: other start latents give other images.
  other = generator(params, PROMPTS, jax.random.key(0),
                    noise=_torch_latents(2, seed=1).numpy().transpose(
                        0, 2, 3, 1))
  assert np.abs((other + 1) / 2 - want).max() > 10 * IMAGE_TOL


def test_pipeline_saved_by_transformers_5_imports(tiny_config, saved_pipeline,
                                                  tmp_path):
  """diffusers 0.42 + transformers 5 write tokenizer/ as tokenizer.json +
  tokenizer_config.json only and the text encoder's keys without
  `text_model.`: the folder imports, tokenizes as the pipeline's tokenizer
  and encodes as its text encoder."""
  pipe, folder = saved_pipeline
  if "sd2" in folder:
    pytest.skip("the layout is the text side's; one pipeline shape is enough")
  new = tmp_path / "pipeline"
  shutil.copytree(folder, new)
  shutil.rmtree(new / "tokenizer")
  layouts.fast_only_tokenizer(os.path.join(folder, "tokenizer"),
                              str(new / "tokenizer"))
  layouts.drop_text_prefix(str(new / "text_encoder"))
  config = _config(tiny_config, str(new))
  comps = build.build_components(config)
  assert isinstance(comps.tokenizer, transformers.CLIPTokenizerFast)
  assert config.text.max_length == 77
  ids = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=77,
                       truncation=True, return_tensors="np").input_ids
  np.testing.assert_array_equal(
      comps.tokenizer(PROMPTS + [""], padding="max_length", max_length=77,
                      truncation=True, return_tensors="np").input_ids, ids)
  with torch.no_grad():
    want = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
  params = comps.init_params(jax.random.key(0))
  got = np.asarray(comps.encode(params, ids.astype(np.int32)))
  np.testing.assert_allclose(got, want, atol=1e-4)
  # A tokenizer folder neither layout reads: one line naming what it needs.
  os.remove(new / "tokenizer" / "tokenizer.json")
  with pytest.raises(errors.TokenizerError,
                     match=f"Cannot read the CLIP tokenizer in {new}/tokenizer"
                     ": it holds tokenizer_config.json; expected "
                     "tokenizer.json"):
    build.build_components(_config(tiny_config, str(new)))


def test_bad_pipeline_folders_are_clear_errors(tiny_config, saved_pipeline,
                                               tmp_path):
  _, folder = saved_pipeline
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    build.build_components(_config(tiny_config, str(tmp_path)))
  partial = tmp_path / "partial"
  shutil.copytree(folder, partial)
  shutil.rmtree(partial / "tokenizer")
  with pytest.raises(FileNotFoundError, match="tokenizer/"):
    build.build_components(_config(tiny_config, str(partial)))
  # A scheduler jaxsd cannot reproduce: named.
  bad = tmp_path / "bad_scheduler"
  shutil.copytree(folder, bad)
  path = bad / "scheduler" / "scheduler_config.json"
  cfg = json.loads(path.read_text())
  path.write_text(json.dumps({**cfg, "thresholding": True}))
  with pytest.raises(ValueError, match="thresholding"):
    build.build_components(_config(tiny_config, str(bad)))


class _RunsShell:
  """Pickles as a call of os.system, as a malicious .bin would."""

  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


def test_a_unet_bin_naming_a_callable_is_refused(tiny_config, saved_pipeline,
                                                 tmp_path):
  _, folder = saved_pipeline
  evil = tmp_path / "evil"
  shutil.copytree(folder, evil)
  for f in (evil / "unet").iterdir():
    if f.name.startswith("diffusion_pytorch_model"):
      f.unlink()
  sentinel = tmp_path / "ran"
  payload = pickle.dumps({"conv_in.weight": _RunsShell(sentinel)}, protocol=2)
  with zipfile.ZipFile(evil / "unet" / "diffusion_pytorch_model.bin",
                       "w") as archive:
    archive.writestr("archive/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
    build.build_components(_config(tiny_config, str(evil)))
  assert not sentinel.exists()


# --- Fine-tune, export, load in PyTorch (slow) --------------------------


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sd_finetune_config_builds_on_a_pipeline_and_steps(
    saved_pipeline, kind, tmp_path):
  """configs/sd_finetune.py as shipped (bf16 compute, remat, LoRA with a
  bf16 base), on the tiny pipeline at 16 px: validates, builds, one step."""
  from configs import sd_finetune  # pylint: disable=g-import-not-at-top
  from jaxsd import config_checks  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  _, folder = saved_pipeline
  if "sd2" in folder:
    pytest.skip("one pipeline is enough for the config")
  config = environment.resolve(sd_finetune.get_config(kind))
  config_checks.validate(config)
  config.model.pretrained_pipeline = folder
  config.data.image_size = 16
  config.training.batch_size = 2
  config.data.workers = 0
  setup = build.TrainSetup(config)
  assert setup.components.unet.module.remat == "blocks"
  assert (setup.components.lora is not None) == (kind == "lora")
  rng = np.random.default_rng(0)
  batch = setup.global_batch({
      "image": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
      "input_ids": np.tile(setup.components.uncond_ids[0], (2, 1))})
  if kind == "full":
    # Traced, not compiled: the full fine-tune also trains (and exports)
    # in test_finetuned_export_loads_in_pytorch_and_samples_the_same.
    _, metrics = jax.eval_shape(setup.step_fn(), setup.abstract_state, batch,
                                jax.random.key(1), None)
    assert metrics["loss"].shape == ()
    return
  state = setup.create_train_state(jax.random.key(0))
  _, metrics = setup.make_train_step(donate=False)(state, batch,
                                                   jax.random.key(1))
  assert np.isfinite(metrics["loss"])
  with pytest.raises(ValueError, match="sd_finetune.py:lora"):
    sd_finetune.get_config("other")
