"""Stable Diffusion in and out, with PyTorch diffusers as the oracle.

The test builds a tiny random pipeline in PyTorch (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, the shared CLIP tokenizer, an SD-style
DDIMScheduler) and saves it with `save_pretrained`. jaxsd imports it
(model.pretrained_pipeline): the text embeddings, the UNet's output and
the VAE's decode match PyTorch's within 1e-4, and a 10-step DDIM sampling
with guidance from the same initial latents matches the pipeline's images.
Slow tests fine-tune a few steps, export with `jaxsd.commands.export` and load the
result into PyTorch: the full pipeline, and LoRA adapters through
`load_lora_weights`.
"""
import json
import os
import pickle
import shutil
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()

PROMPTS = ["a red square", "a blue circle"]
# Images in [0, 1] after 10 guided DDIM steps: each step's float32
# differences (~1e-6 of the UNet output) are amplified by guidance (x3) and
# by the DDIM update's 1/sqrt(alpha) (up to ~1.1x per step at SD's
# schedule), then by the VAE decoder; seen: ~1e-5. 1e-3 is 1/4 of one 8-bit
# grey level and still catches any wrong timestep, alpha or guidance (those
# move pixels by > 0.01; tests/test_scheduler_import.py checks the
# schedule alone to 1e-5).
IMAGE_TOL = 1e-3


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def torch_pipeline(tokenizer_dir, prediction_type="epsilon", seed=0,
                   linear_projection=False):
  """A tiny random StableDiffusionPipeline, SD 1.x-shaped (SD 2.x-shaped
  with v-prediction and linear projections)."""
  torch.manual_seed(seed)
  unet = _perturb(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4,
      block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=(2, 4) if linear_projection else 4,
      use_linear_projection=linear_projection,
      cross_attention_dim=32, norm_num_groups=8), seed)
  vae = _perturb(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
      norm_num_groups=4, sample_size=16), seed + 1)
  text_encoder = _perturb(transformers.CLIPTextModel(
      transformers.CLIPTextConfig(
          vocab_size=49408, hidden_size=32, intermediate_size=64,
          num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=77, bos_token_id=49406,
          eos_token_id=49407, pad_token_id=49407)), seed + 2)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
      prediction_type=prediction_type)
  return diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def saved_pipeline(request, tmp_path_factory):
  sd2 = request.param == "sd2"
  pipe = torch_pipeline(os.environ["JAXSD_CLIP_TOKENIZER"],
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
  got = np.asarray(comps.encode(params, ids.astype(np.int32)))
  np.testing.assert_allclose(got, want, atol=1e-4)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  t = np.array([1, 500, 981], np.int32)
  with torch.no_grad():
    want = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                     torch.from_numpy(t), torch.from_numpy(want)).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(comps.unet.apply(params["unet"], x, t, got))
  scale = max(1.0, np.abs(want).max())
  assert np.abs(got - want).max() / scale < 1e-4

  z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():  # SD decodes latents / scaling_factor
    want = pipe.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))
                           / pipe.vae.config.scaling_factor).sample
  want = np.clip(want.numpy().transpose(0, 2, 3, 1), -1, 1)
  got = np.asarray(comps.decode(comps.autoencoder_params, z))
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


def _images(path, count=16):
  os.makedirs(path)
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i in range(count):
      pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3),
                                                 dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(path, f"{i:03d}.png"))
      f.write(json.dumps({"file_name": f"{i:03d}.png",
                          "text": PROMPTS[i % 2]}) + "\n")
  return path


def _finetune_config(tiny_config, folder, images):
  config = _config(tiny_config, folder)
  config.data.source = "imagefolder"
  config.data.path = images
  config.data.random_flip = False
  config.training.num_steps = 2
  config.training.checkpoint_every = 2
  config.training.eval_every = 2
  config.sampling.prompts = ()
  config.text.trainable = False
  return config


@pytest.mark.slow
def test_finetuned_export_loads_in_pytorch_and_samples_the_same(
    tiny_config, saved_pipeline, tmp_path):
  if "sd2" in saved_pipeline[1]:
    pytest.skip("the round trip through PyTorch once (SD 1.x-shaped) keeps "
                "the suite short; imports of both shapes are tested above")
  from jaxsd.commands import export  # pylint: disable=g-import-not-at-top
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  _, folder = saved_pipeline
  workdir = str(tmp_path / "run")
  config = _finetune_config(tiny_config, folder,
                            _images(str(tmp_path / "images")))
  train.train_and_evaluate(config, workdir)
  out = str(tmp_path / "exported")
  export.export(workdir, out)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      out, safety_checker=None, requires_safety_checker=False)
  latents = _torch_latents(len(PROMPTS))
  want = pipe(PROMPTS, num_inference_steps=10, guidance_scale=3.0,
              latents=latents.clone(), output_type="np").images
  # jaxsd.commands.sample's path: the run's EMA params through a Generator.
  mesh = parallel.make_mesh()
  run_config, comps, params, _ = build.restore_for_inference(workdir, mesh)
  generator = generate.Generator.from_config(
      comps, mesh, run_config.sampling, num_steps=10, guidance_scale=3.0)
  got = (generator(params, PROMPTS, jax.random.key(0),
                   noise=latents.numpy().transpose(0, 2, 3, 1)) + 1) / 2
  assert np.abs(got - want).max() < IMAGE_TOL
  # The fine-tuned weights, not the base's, were exported.
  base = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
  assert any(not torch.equal(a, b) for a, b in zip(
      base.state_dict().values(), pipe.unet.state_dict().values()))
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export(workdir, out)


@pytest.mark.slow
def test_lora_export_loads_into_pytorch_with_load_lora_weights(
    tiny_config, saved_pipeline, tmp_path):
  if "sd2" in saved_pipeline[1]:
    pytest.skip("the round trip through PyTorch once (SD 1.x-shaped) keeps "
                "the suite short; imports of both shapes are tested above")
  from jaxsd.commands import export  # pylint: disable=g-import-not-at-top
  from jaxsd.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  _, folder = saved_pipeline
  workdir = str(tmp_path / "run")
  config = _finetune_config(tiny_config, folder,
                            _images(str(tmp_path / "images")))
  config.model.lora.rank = 4
  config.model.lora.alpha = 8.0
  config.optim.learning_rate = 1e-2  # adapters far from zero in 2 steps
  train.train_and_evaluate(config, workdir)
  out = str(tmp_path / "lora")
  path = export.export(workdir, out)
  assert os.path.basename(path) == lora_lib.WEIGHT_NAME
  assert os.path.getsize(path) < 0.2 * os.path.getsize(
      os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      folder, safety_checker=None, requires_safety_checker=False)
  before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
  pipe.load_lora_weights(out, weight_name=lora_lib.WEIGHT_NAME)
  # jaxsd's merged UNet against PyTorch's with the adapters loaded.
  mesh = parallel.make_mesh()
  _, comps, merged, _ = build.restore_for_inference(workdir, mesh)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 700], np.int32)
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  with torch.no_grad():
    want = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                     torch.from_numpy(t), torch.from_numpy(ctx)).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(comps.unet.apply(merged["unet"], x, t, ctx))
  scale = max(1.0, np.abs(want).max())
  assert np.abs(got - want).max() / scale < 1e-4
  # ... and the adapters matter: the base alone differs.
  base = np.asarray(comps.unet.apply(comps.base_params()["unet"], x, t, ctx))
  assert np.abs(base - want).max() / scale > 1e-3
  pipe.unload_lora_weights()
  for k, v in pipe.unet.state_dict().items():
    torch.testing.assert_close(v, before[k])


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
