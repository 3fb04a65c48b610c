"""What the tests share: paths, small configs, stopping a run at a step,
comparing states, reading a run's MLflow record, small image datasets.

Imported as `helpers` (tests/ is on sys.path: pyproject's pytest pythonpath,
and PYTHONPATH for the worker subprocesses).
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)  # the repository


# --- Compiling ----------------------------------------------------------------


@contextlib.contextmanager
def xla_optimised():
  """XLA's optimisations on inside (tests/conftest.py turns most of them off
  for the session): for programs that run far longer than they compile. A
  1000-step DDPM loop over [8000, 2] ran 4.6 s without them and 0.9 s with
  them (2026-12-06, 2-core AMD EPYC with AVX-512). Compile options are part
  of the persistent cache's key, so the two kinds of executable never mix."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


# --- Configs ------------------------------------------------------------------


def tiny_config(overrides=None):
  """configs/tiny.py resolved for this machine, with flattened overrides
  ({"training.num_steps": 2, ...})."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  config = environment.resolve(tiny.get_config())
  config.update_from_flattened_dict(dict(overrides or {}))
  return config


def small_autoencoder(config, image_size=32):
  """Shrinks config's autoencoder to two levels of 8 and 16 channels with a
  two-layer discriminator, trained on MNIST padded to image_size, batch 8,
  without the diffusion metrics."""
  a = config.autoencoder
  a.block_out_channels = (8, 16)
  a.norm_num_groups = 4
  a.latent_channels = 4
  a.layers_per_block = 1
  a.disc_channels = 8
  a.disc_layers = 2
  a.eval_images = 8
  a.scaling_factor = 0.0  # measured
  config.data.image_size = image_size  # MNIST's 28x28 padded
  config.training.batch_size = 8
  config.eval.metrics = ()
  return config


def rgb_data(config, source, path, image_size=16):
  """Points config at an RGB dataset of captioned pictures (see
  write_imagefolder) at image_size, with the data's own captions in the
  sample grid and no MNIST metrics."""
  config.data.source = source
  config.data.path = path
  config.data.image_size = image_size
  config.data.num_channels = 3
  config.model.in_channels = config.model.out_channels = 3
  config.text.max_length = 8
  config.eval.metrics = ()  # the MNIST metrics judge digits only
  config.sampling.prompts = ()  # the data's own captions
  return config


def val_loss_config(config, examples=12, bins=5):
  """config evaluating only eval/val_loss, on `examples` held-out examples
  (12: two chunks of 8, the second padded) at `bins` timesteps."""
  config.eval.metrics = ("val_loss",)
  config.eval.val_loss_examples = examples
  config.eval.val_loss_timesteps = bins
  config.eval.chunk_size = 8
  return config


def bucket_config(config, folder, buckets="auto"):
  """rgb_data on the image folder `folder` at 16 px, with data.buckets."""
  config = rgb_data(config, "imagefolder", folder, 16)
  config.data.buckets = buckets
  return config


def assert_step_traces(setup):
  """setup's (a TrainSetup's) real train step traces with a batch of its
  shapes: shapes, dtypes and shardings fit together (jax.eval_shape, no
  compile). Returns the traced new state."""
  k, b = setup.steps_per_call, setup.config.training.batch_size
  lead = (k, b) if k > 1 else (b,)
  comps = setup.components
  batch = {"image": jax.ShapeDtypeStruct(lead + comps.image_shape,
                                         np.float32),
           "input_ids": jax.ShapeDtypeStruct(
               lead + comps.uncond_ids.shape[1:], np.int32)}
  state, metrics = jax.eval_shape(setup.step_fn(), setup.abstract_state,
                                  batch, jax.random.key(0))
  assert state.step.shape == () and metrics["loss"].shape == lead[:-1]
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: x.shape, tree)
  assert shapes(state.params) == shapes(setup.abstract_state.params)
  return state


# --- Runs ---------------------------------------------------------------------


def sigterm_at_step(step: int, process=None):
  """A train-loop hook (train_and_evaluate(..., hooks=[...])) that sends
  this process SIGTERM, as SLURM does on preemption, after train step
  `step`; with `process`, only on that jax.process_index()."""
  def hook(current: int):
    if current == step and process in (None, jax.process_index()):
      os.kill(os.getpid(), signal.SIGTERM)
  return hook


def copy_run_until(workdir: str, copy: str, step: int) -> str:
  """A copy of a run's workdir without its checkpoints after `step`: the
  next start resumes from `step`, as a run stopped there would. Cheaper
  than a third run where stopping itself is not what a test checks
  (SIGTERM at a step: test_train_mnist.py, test_faults_runs.py)."""
  shutil.copytree(workdir, copy)
  checkpoints = os.path.join(copy, "checkpoints")
  for name in os.listdir(checkpoints):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(checkpoints, name))
  return copy


def leaves(tree):
  """Host copies of a tree's arrays, in tree order."""
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def model_leaves(state):
  """The parameters and EMA parameters of a TrainState, as leaves()."""
  return leaves((state.params, state.ema_params))


def assert_leaves_close(actual, expected, rtol=1e-6, atol=1e-7):
  """Two lists of leaves (or two trees) agree elementwise; the defaults are
  for a resumed run against an uninterrupted one (same programs, so equal up
  to the order of a few reductions)."""
  if not isinstance(actual, list):
    actual, expected = leaves(actual), leaves(expected)
  assert len(actual) == len(expected)
  for i, (a, b) in enumerate(zip(actual, expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                               err_msg=f"array {i}")


def same_leaves(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))


def mlflow_runs(workdir):
  """(MlflowClient, runs of the workdir's "jaxsd" experiment)."""
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  exp = client.get_experiment_by_name("jaxsd")
  return client, client.search_runs([exp.experiment_id])


def mlflow_run(workdir):
  """(MlflowClient, the workdir's one MLflow run)."""
  client, runs = mlflow_runs(workdir)
  (run,) = runs
  return client, run


def mlflow_statuses(workdir):
  return [r.info.status for r in mlflow_runs(workdir)[1]]


def metric_steps(workdir, key):
  """The steps at which the workdir's one run logged `key`."""
  client, run = mlflow_run(workdir)
  return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def jaxsd_command(module, *args, timeout=600, env=None):
  """`python -m MODULE ARGS` from the repository, as a user runs it."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=None if env is None else env)


def truncate_array_data(step_dir):
  """Halves the array data files of a checkpoint's state (what a crash of
  the file system, not of jaxsd, leaves)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(
      os.path.join(step_dir, "state")) for f in fs]
  for data in (f for f in files if os.sep + "d" + os.sep in f):
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)


# --- Data ---------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def picture(i: int):
  """A 20x24 RGB picture: a red, green or blue square on noise."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  name = list(COLOURS)[i % 3]
  rng = np.random.default_rng(i)
  pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
  pixels[4:14, 6:16] = COLOURS[name]
  return Image.fromarray(pixels)


def caption(i: int) -> str:
  return f"a {list(COLOURS)[i % 3]} square"


def write_imagefolder(path, count=24, image=picture, text=caption) -> str:
  """An image folder (data.source="imagefolder") of `count` PNGs,
  image(i) (a PIL image or a uint8 array), captioned text(i) in
  metadata.jsonl."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(path)
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i in range(count):
      pixels = image(i)
      if isinstance(pixels, np.ndarray):
        pixels = Image.fromarray(pixels)
      pixels.save(os.path.join(path, f"{i:03d}.png"))
      f.write(json.dumps({"file_name": f"{i:03d}.png", "text": text(i)})
              + "\n")
  return path


# Aspect-ratio buckets: 60% 4:3 landscapes, 30% 3:4 portraits, 10% squares
# (width, height), and the shapes data.buckets="auto" makes of them at 16 px.
BUCKET_SIZES = [(40, 30)] * 6 + [(30, 40)] * 3 + [(32, 32)]
BUCKET_SHAPES_16 = [(12, 22), (14, 18), (16, 16), (18, 14), (22, 12)]


def write_mixed_folder(path, count=30) -> str:
  """An image folder of `count` RGB PNGs cycling through BUCKET_SIZES, each
  its own noise, captioned "picture i"."""
  def noise(i):
    w, h = BUCKET_SIZES[i % len(BUCKET_SIZES)]
    return np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8)
  return write_imagefolder(path, count, noise, lambda i: f"picture {i}")


# --- Latent diffusion -----------------------------------------------------------


def small_vae_config():
  """A two-level, 4-latent-channel AutoencoderKL for 1-channel images, with
  a scaling factor and a shift."""
  from jaxsd.models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  return ae_lib.AutoencoderConfig(
      in_channels=1, out_channels=1, block_out_channels=(8, 16),
      latent_channels=4, norm_num_groups=4, scaling_factor=0.7,
      shift_factor=0.1)


def write_vae(folder, config=None, seed=0):
  """A random AutoencoderKL (default small_vae_config()) saved as diffusers
  does (config.json and diffusion_pytorch_model.safetensors)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxsd.models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  config = config or small_vae_config()
  module = ae_lib.AutoencoderKL(config)
  params = ae_lib.init_params(module, jax.random.key(seed), 16)
  # Away from the initialisation (unit scales, zero biases) so every
  # parameter matters.
  arrays, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  arrays = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(
      np.float32) for x in arrays]
  params = jax.tree_util.tree_unflatten(tree, arrays)
  os.makedirs(folder, exist_ok=True)
  save_file(ae_lib.to_diffusers_weights(params),
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_diffusers(), f)
  return folder


def latent_config(config, vae):
  """config diffusing in the latent space of the autoencoder folder `vae`
  (4 channels; MNIST's 28x28 as 14x14x4 latents)."""
  config.model.autoencoder = vae
  config.model.in_channels = config.model.out_channels = 4
  config.data.image_size = 28  # latents 14x14x4
  config.data.num_channels = 1
  return config


def grey_noise(i: int):
  return np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8)


def latent_folder_config(config, vae, folder):
  """latent_config on the image folder `folder` of grey pictures at 16 px
  (latents 8x8x4), without MNIST's metrics and prompts."""
  config = latent_config(config, vae)
  config.data.source = "imagefolder"
  config.data.path = folder
  config.data.image_size = 16  # latents 8x8x4
  config.eval.metrics = ()
  config.sampling.prompts = ()
  return config


def frozen_text_encoder(config, folder, seed=0):
  """A random FlaxCLIPTextModel of config.text's size, saved as a
  pretrained one; config.text then names it, frozen."""
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
  model = transformers.FlaxCLIPTextModel(text_lib.text_encoder_config(
      config.text, text_lib.vocab_size(tokenizer)), seed=seed)
  model.save_pretrained(folder)
  config.text.pretrained, config.text.trainable = folder, False
  return config


# --- Stable Diffusion pipelines (PyTorch diffusers) ----------------------------

SD_PROMPTS = ["a red square", "a blue circle"]
# Images in [0, 1] after 10 guided DDIM steps: each step's float32
# differences (~1e-6 of the UNet output) are amplified by guidance (x3) and
# by the DDIM update's 1/sqrt(alpha) (up to ~1.1x per step at SD's
# schedule), then by the VAE decoder; seen: ~1e-5. 1e-3 is 1/4 of one 8-bit
# grey level and still catches any wrong timestep, alpha or guidance (those
# move pixels by > 0.01; tests/unit/test_scheduler_import.py checks the
# schedule alone to 1e-5).
SD_IMAGE_TOL = 1e-3


def _perturb_torch(model, seed):
  """model's parameters, moved off their initialisation; in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def torch_sd_pipeline(tokenizer_dir, prediction_type="epsilon", seed=0,
                   linear_projection=False):
  """A tiny random PyTorch StableDiffusionPipeline, SD 1.x-shaped (SD
  2.x-shaped with v-prediction and linear projections), for 16 px images
  (8x8x4 latents)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  unet = _perturb_torch(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4,
      block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=(2, 4) if linear_projection else 4,
      use_linear_projection=linear_projection,
      cross_attention_dim=32, norm_num_groups=8), seed)
  vae = _perturb_torch(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
      norm_num_groups=4, sample_size=16), seed + 1)
  text_encoder = _perturb_torch(transformers.CLIPTextModel(
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


# --- Commands run in-process -------------------------------------------------


def run_command(module_name, args, monkeypatch, capsys):
  """(exit code, stdout, stderr) of a jaxsd command run in-process (with the
  `fresh_flags` fixture, so the next command can define its flags)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(module_name)
  monkeypatch.setattr(sys, "argv", [module_name, *args])
  # A command turns transformers' PyTorch off for its process (cli.run);
  # this test process keeps it for the tests that compare with PyTorch.
  monkeypatch.setenv("USE_TORCH", os.environ.get("USE_TORCH", "AUTO"))
  with pytest.raises(SystemExit) as exit_info:
    module.run()
  out = capsys.readouterr()
  return exit_info.value.code or 0, out.out, out.err  # absl: None on success


def one_line(err: str) -> str:
  """The error line, checked to be the last line and to follow no stack."""
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert lines[-1].startswith("jaxsd: error: "), err
  return lines[-1]
