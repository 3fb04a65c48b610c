"""Fine-tuning an imported Stable Diffusion pipeline, exported back to
PyTorch diffusers (`jaxsd.commands.export`): the full pipeline samples the
same images as jaxsd, and LoRA adapters load through `load_lora_weights`.
One pipeline shape (SD 1.x) here; the imports of both shapes are
tests/unit/test_sd_pipeline.py's.
"""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxsd import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd.diffusion import generate  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top,wrong-import-position

import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()

PROMPTS = helpers.SD_PROMPTS
IMAGE_TOL = helpers.SD_IMAGE_TOL


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
  """(PyTorch pipeline, its save_pretrained folder), SD 1.x-shaped."""
  pipe = helpers.torch_sd_pipeline(os.environ["JAXSD_CLIP_TOKENIZER"])
  folder = str(tmp_path_factory.mktemp("pipeline_sd1"))
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


def _images(path, count=16):
  return helpers.write_imagefolder(
      path, count,
      image=lambda i: np.random.default_rng(i).integers(0, 255, (16, 16, 3),
                                                       dtype=np.uint8),
      text=lambda i: PROMPTS[i % 2])


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


def test_finetuned_export_loads_in_pytorch_and_samples_the_same(
    tiny_config, saved_pipeline, tmp_path):
  from jaxsd.interop import export  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  _, folder = saved_pipeline
  workdir = str(tmp_path / "run")
  config = _finetune_config(tiny_config, folder,
                            _images(str(tmp_path / "images")))
  diffusion_task.train_and_evaluate(config, workdir)
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


def test_lora_export_loads_into_pytorch_with_load_lora_weights(
    tiny_config, saved_pipeline, tmp_path):
  from jaxsd.interop import export  # pylint: disable=g-import-not-at-top
  from jaxsd.interop import lora_format  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  _, folder = saved_pipeline
  workdir = str(tmp_path / "run")
  config = _finetune_config(tiny_config, folder,
                            _images(str(tmp_path / "images")))
  config.model.lora.rank = 4
  config.model.lora.alpha = 8.0
  config.optim.learning_rate = 1e-2  # adapters far from zero in 2 steps
  diffusion_task.train_and_evaluate(config, workdir)
  out = str(tmp_path / "lora")
  path = export.export(workdir, out)
  assert os.path.basename(path) == lora_format.WEIGHT_NAME
  assert os.path.getsize(path) < 0.2 * os.path.getsize(
      os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      folder, safety_checker=None, requires_safety_checker=False)
  before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
  pipe.load_lora_weights(out, weight_name=lora_format.WEIGHT_NAME)
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
  apply = jax.jit(comps.unet.apply)  # eagerly, each of ~400 ops compiles
  got = np.asarray(apply(merged["unet"], x, t, ctx))
  scale = max(1.0, np.abs(want).max())
  assert np.abs(got - want).max() / scale < 1e-4
  # ... and the adapters matter: the base alone differs.
  base = np.asarray(apply(comps.base_params()["unet"], x, t, ctx))
  assert np.abs(base - want).max() / scale > 1e-3
  pipe.unload_lora_weights()
  for k, v in pipe.unet.state_dict().items():
    torch.testing.assert_close(v, before[k])
