"""Sampling at any size: the UNet follows its input's shape, the Generator
makes [N, H, W, C] at non-square sizes in pixel and latent space,
sampling.height / sampling.width and --height / --width are refused with
one line unless multiples of the model's downsampling, and grids keep
non-square cells' aspect ratio."""
import json
import os
from unittest import mock

import jax
import numpy as np
import pytest

from jaxsd import config_checks
from jaxsd import parallel
from jaxsd.diffusion import generate
from jaxsd.diffusion import sample_run
from jaxsd.diffusion import setup as build
from jaxsd.errors import ConfigError
from jaxsd.models import autoencoder as ae_lib
from jaxsd.tracking import images as images_lib

import helpers

PROMPTS = ["a photograph of the number 3", ""]

# Downsamples 2x: with the tiny UNet's 2 levels, sides are multiples of 4.
AE = ae_lib.AutoencoderConfig(
    in_channels=1, out_channels=1, block_out_channels=(8, 16),
    latent_channels=4, norm_num_groups=4)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  """A random AutoencoderKL folder as diffusers saves one."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp("vae"))
  params = ae_lib.init_params(ae_lib.AutoencoderKL(AE), jax.random.key(0), 16)
  save_file(ae_lib.to_diffusers_weights(params),
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(AE.to_diffusers(), f)
  return folder


def _latent_config(tiny_config, vae):
  config = tiny_config()
  config.model.autoencoder = vae
  config.model.in_channels = config.model.out_channels = AE.latent_channels
  config.data.image_size = 28  # latents 14x14x4
  config.data.num_channels = 1
  config.eval.metrics = ()
  return config


def _sample(comps, height, width, prompts=PROMPTS):
  params = comps.init_params(jax.random.key(0))
  generator = generate.Generator(
      comps, parallel.make_mesh(), sampler="ddim", num_steps=2,
      guidance_scale=2.0, height=height, width=width)
  return generator, generator(params, prompts, jax.random.key(1))


def test_unet_output_follows_a_non_square_input(tiny_config):
  config = tiny_config()
  # Three levels: the upsampled maps must meet their skips at 8x24 and 4x12.
  config.model.block_out_channels = (32, 32, 32)
  config.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D")
  config.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D",
                                 "UpBlock2D")
  comps = build.build_components(config)
  params = comps.init_params(jax.random.key(0))
  context = np.zeros((2, config.text.max_length, config.text.hidden_size),
                     np.float32)
  x = np.random.default_rng(0).standard_normal((2, 16, 48, 1))
  out = jax.jit(comps.denoise_fn(params))(x.astype(np.float32),
                                          np.array([5, 50]), context)
  assert out.shape == (2, 16, 48, 1) and np.all(np.isfinite(out))


def test_generator_samples_non_square_pixel_images(tiny_config):
  comps = build.build_components(tiny_config())
  generator, images = _sample(comps, 12, 20)
  assert generator.image_shape == (12, 20, 1)
  assert images.shape == (2, 12, 20, 1) and np.all(np.isfinite(images))
  assert images.std() > 0  # not a constant


def test_generator_samples_non_square_latent_images(tiny_config, vae):
  comps = build.build_components(_latent_config(tiny_config, vae))
  assert comps.size_multiple == 4
  generator, images = _sample(comps, 16, 24)
  assert generator.image_shape == (8, 12, 4)  # the latents the UNet denoises
  assert images.shape == (2, 16, 24, 1)
  assert np.all(np.isfinite(images)) and np.abs(images).max() <= 1.0


def test_generator_from_config_takes_the_configured_size(tiny_config):
  config = tiny_config()
  config.sampling.height, config.sampling.width = 8, 16
  comps = build.build_components(config)
  mesh = parallel.make_mesh()
  generator = generate.Generator.from_config(comps, mesh, config.sampling)
  assert (generator.height, generator.width) == (8, 16)
  # Evaluation's copy keeps it; an override (a flag) replaces it.
  assert generator.with_chunk_size(4).pixel_shape == (8, 16, 1)
  assert generate.Generator.from_config(
      comps, mesh, config.sampling, height=12).pixel_shape == (12, 16, 1)
  config.sampling.height = config.sampling.width = 0  # data.image_size
  assert generate.Generator.from_config(
      comps, mesh, config.sampling).image_shape == (28, 28, 1)


def test_generator_refuses_a_side_the_unet_cannot_halve(tiny_config, vae):
  comps = build.build_components(_latent_config(tiny_config, vae))
  with pytest.raises(ConfigError, match=r"^width=18 must be a multiple of 4 "):
    generate.Generator(comps, parallel.make_mesh(), sampler="ddim",
                       num_steps=2, guidance_scale=1.0, height=16, width=18)


def test_non_square_sampling_matches_a_diffusers_pipeline(tiny_config,
                                                          tmp_path):
  """A pipeline folder sampled at 16x32 pixels (8x16 latents, not its
  unet's sample_size) by diffusers and by the Generator: the same images.
  The export writes the same folder layout, whose sample_size is only
  diffusers' default size."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                                            "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
      norm_num_groups=4, sample_size=16)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
  with torch.no_grad():  # away from the initialisation's zeros
    for model in (unet, vae, text_encoder):
      for param in model.parameters():
        param.add_(0.05 * torch.randn_like(param))
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae.eval(), text_encoder=text_encoder.eval(),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(
          os.environ["JAXSD_CLIP_TOKENIZER"]),
      unet=unet.eval(), scheduler=diffusers.DDIMScheduler(
          beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          clip_sample=False, set_alpha_to_one=False, steps_offset=1),
      safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.save_pretrained(str(tmp_path))
  config = tiny_config()
  config.model.pretrained_pipeline = str(tmp_path)
  config.data.image_size = 16  # the square default: 8x8 latents
  config.eval.metrics = ()
  comps = build.build_components(config)
  latents = torch.randn((2, 4, 8, 16),
                        generator=torch.Generator().manual_seed(0))
  want = pipe(["a red square", ""], height=16, width=32,
              num_inference_steps=4, guidance_scale=3.0,
              latents=latents.clone(), output_type="np").images
  generator = generate.Generator.from_config(
      comps, parallel.make_mesh(), config.sampling, num_steps=4,
      guidance_scale=3.0, height=16, width=32)
  got = generator(comps.init_params(jax.random.key(0)), ["a red square", ""],
                  jax.random.key(0), noise=latents.numpy().transpose(
                      0, 2, 3, 1))
  assert want.shape == got.shape == (2, 16, 32, 3)
  assert np.abs((got + 1) / 2 - want).max() < 1e-3


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_config_sizes_are_multiples_of_the_downsampling(tiny_config):
  config = tiny_config()
  config.eval.metrics = ()
  config.sampling.height, config.sampling.width = 12, 20
  config_checks.validate(config)
  config.sampling.height = 13
  assert _one_line_error(config_checks.validate, config) == (
      "sampling.height=13 must be a multiple of 2 (the UNet halves it at "
      "each of its 2 levels but the last: model.block_out_channels=(32, "
      "32)); e.g. sampling.height=12.")
  config.sampling.height = -4
  assert "sampling.height=-4 must be >= 0" in _one_line_error(
      config_checks.validate, config)


def test_latent_config_sizes_are_checked_once_the_autoencoder_loads(
    tiny_config, vae):
  config = _latent_config(tiny_config, vae)
  config.sampling.width = 30  # even, but the latents (15) do not halve
  config_checks.validate(config)  # the autoencoder's factor is not known yet
  message = _one_line_error(build.build_components, config)
  assert message.startswith("sampling.width=30 must be a multiple of 4 (the "
                            "autoencoder downsamples 2x")
  assert message.endswith("e.g. sampling.width=32.")


def test_classifier_metrics_refuse_other_sampled_sizes_at_start(tiny_config):
  config = tiny_config()  # prompt_accuracy, fid_mnist, diversity
  config.sampling.width = 56
  message = _one_line_error(config_checks.validate, config)
  assert "28x56 images" in message and "judge 28x28 or 32x32" in message
  config.sampling.width = 28
  config_checks.validate(config)


def _workdir(tmp_path, config):
  """A workdir with a run's config.json and no checkpoint yet."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  return str(workdir)


def test_size_flags_are_refused_before_any_checkpoint_is_read(
    tiny_config, vae, tmp_path):
  workdir = _workdir(tmp_path, _latent_config(tiny_config, vae))
  kw = dict(num_samples=1, steps=2)
  assert _one_line_error(
      sample_run.generate_for_prompts, workdir, PROMPTS, height=0, **kw
  ) == "--height=0: height must be >= 1 (an integer); pixels."
  message = _one_line_error(sample_run.generate_for_prompts, workdir,
                            PROMPTS, height=16, width=30, **kw)
  assert message.startswith("--width=30 must be a multiple of 4 (the "
                            "autoencoder downsamples 2x")
  assert message.endswith("e.g. --width=32.")
  # Multiples of 4 pass the checks: the missing checkpoint is what fails.
  with pytest.raises(FileNotFoundError):
    sample_run.generate_for_prompts(workdir, PROMPTS, height=16, width=32,
                                    **kw)


def test_size_flag_against_a_pixel_run(tiny_config):
  config = tiny_config()
  config_checks.check_flags_against_run(config, height=6, width=30)
  assert _one_line_error(config_checks.check_flags_against_run, config,
                         height=7) == (
      "--height=7 must be a multiple of 2 (the UNet halves it at each of "
      "its 2 levels but the last: model.block_out_channels=(32, 32)); e.g. "
      "--height=8.")


def test_sample_command_refuses_a_bad_height_in_one_line(
    tiny_config, tmp_path, fresh_flags, monkeypatch, capsys):
  del fresh_flags
  workdir = _workdir(tmp_path, tiny_config())
  code, _, err = helpers.run_command(
      "jaxsd.commands.sample", [f"--workdir={workdir}", "--prompt=a 3",
                                "--height=9", "--width=16"],
      monkeypatch, capsys)
  assert code == 1, err
  assert err.strip().splitlines()[-1] == (
      "jaxsd: error: --height=9 must be a multiple of 2 (the UNet halves it "
      "at each of its 2 levels but the last: model.block_out_channels=(32, "
      "32)); e.g. --height=8.")


def test_captioned_grid_keeps_non_square_cells_aspect():
  images = -np.ones((3, 32, 64, 3), np.float32)  # black, landscape 1:2
  images[:, :, 32:] = 1.0  # white right half
  grid = np.asarray(images_lib.captioned_grid(images, ["a", "b", ""],
                                              cell_size=112, pad=4))
  cell = grid[4:4 + 56, 4:4 + 112]  # the first tile: 112 wide, 56 high
  assert (cell[:, :56] == 0).all() and (cell[:, 56:] == 255).all()
  assert grid.shape[1] == 3 * (112 + 8)
  assert (grid[4 + 56, 4:116] == 255).all()  # caption space under the tile
  portrait = images_lib.captioned_grid(np.zeros((2, 64, 32, 1)), ["a", "b"])
  assert portrait.size[0] == 2 * (56 + 8)  # 56-wide tiles
  assert images_lib.tile_size(28, 28, 112) == (112, 112)


def test_prompt_rows_grid_keeps_non_square_cells_aspect():
  images = -np.ones((6, 16, 48, 1), np.float32)  # 3 a prompt, 1:3
  grid = images_lib.prompt_rows_grid(images, ["a", "b"], cell_size=84, pad=4)
  assert grid.size == (3 * (84 + 4) + 4, 2 * (28 + 16 + 8))
  tile = np.asarray(grid)[4:4 + 28, 4:4 + 84]
  assert (tile == 0).all()


@pytest.mark.parametrize("clip, want", [(True, None), (False, None),
                                        (3.0, 3.0)])
def test_latent_runs_clip_only_with_a_numeric_bound(tiny_config, vae, clip,
                                                    want):
  """[-1, 1] is the images' range, not the latents': clip_x0=True clips
  pixel runs only; a number c bounds latent runs' x0 estimates to [-c, c]."""
  comps = build.build_components(_latent_config(tiny_config, vae))
  seen = []
  real = generate.samplers.sample

  def spy(*args, **kwargs):
    seen.append(kwargs["clip_x0"])
    return real(*args, **kwargs)
  with mock.patch.object(generate.samplers, "sample", spy):
    generator = generate.Generator(comps, parallel.make_mesh(),
                                   sampler="ddim", num_steps=1,
                                   guidance_scale=1.0, clip_x0=clip)
    generator(comps.init_params(jax.random.key(0)), PROMPTS[:1],
              jax.random.key(1))
  assert seen == [want]
