"""Sampling from a real (tiny) checkpoint: samplers, determinism, CLI, errors."""
import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd import parallel
from jaxsd.diffusion import generate
from jaxsd.diffusion import sample_run as sample
from jaxsd.diffusion import setup as build

import helpers

pytestmark = pytest.mark.mnist

PROMPTS = ["a photograph of the number 3", ""]


def test_each_sampler_from_checkpoint(trained_run):
  """One restore, a Generator per sampler (generate_for_prompts, the
  command's path, samples with each in the tests below)."""
  workdir, _ = trained_run
  mesh = parallel.make_mesh()
  config, comps, params, step = build.restore_for_inference(workdir, mesh)
  assert step == 4
  prompts = [p for p in PROMPTS for _ in range(3)]
  for sampler in ("ddpm", "ddim", "dpmpp_2m"):
    images = generate.Generator.from_config(
        comps, mesh, config.sampling, sampler=sampler, num_steps=5,
        guidance_scale=2.0)(params, prompts, jax.random.key(0))
    assert images.shape == (6, 28, 28, 1), sampler
    assert np.all(np.isfinite(images)) and images.std() > 0.05, sampler
    # sampling.clip_x0: images stay in the data range.
    assert images.min() >= -1.0 - 1e-5 and images.max() <= 1.0 + 1e-5


def test_same_seed_same_images(trained_run):
  workdir, _ = trained_run
  kw = dict(num_samples=2, sampler="ddpm", steps=3)
  a, _ = sample.generate_for_prompts(workdir, PROMPTS, seed=1, **kw)
  b, _ = sample.generate_for_prompts(workdir, PROMPTS, seed=1, **kw)
  c, _ = sample.generate_for_prompts(workdir, PROMPTS, seed=2, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_chunks_cover_any_number_of_images(trained_run):
  workdir, _ = trained_run
  images, _ = sample.generate_for_prompts(
      workdir, ["a photograph of the number 1"], num_samples=5, steps=2,
      chunk_size=2)
  assert images.shape[0] == 5 and np.all(np.isfinite(images))


def test_raw_and_ema_parameters_differ(trained_run):
  workdir, _ = trained_run
  kw = dict(num_samples=1, sampler="ddim", steps=2, seed=0)
  ema, _ = sample.generate_for_prompts(workdir, PROMPTS, **kw)
  raw, _ = sample.generate_for_prompts(workdir, PROMPTS, use_ema=False, **kw)
  assert not np.allclose(ema, raw)


def test_bad_input_errors(trained_run, tmp_path):
  workdir, _ = trained_run
  with pytest.raises(ValueError, match="Unknown sampler"):
    sample.generate_for_prompts(workdir, PROMPTS, num_samples=1,
                                sampler="euler")
  with pytest.raises(ValueError, match="num_samples must be >= 1"):
    sample.generate_for_prompts(workdir, PROMPTS, num_samples=0)
  with pytest.raises(ValueError, match="steps must be >= 1"):
    sample.generate_for_prompts(workdir, PROMPTS, num_samples=1, steps=-2)
  with pytest.raises(FileNotFoundError, match="available steps: \\[2, 4\\]"):
    sample.generate_for_prompts(workdir, PROMPTS, num_samples=1, step=3)
  with pytest.raises(FileNotFoundError, match="not a jaxsd training workdir"):
    sample.generate_for_prompts(str(tmp_path), PROMPTS, num_samples=1)
  with pytest.raises(ValueError, match="No prompts"):
    sample.read_prompts([], None)


def _cli(*args):
  return helpers.jaxsd_command("jaxsd.commands.sample", *args)


def test_cli_writes_grid_and_individual_images(trained_run, tmp_path):
  workdir, _ = trained_run
  out = tmp_path / "grid.png"
  result = _cli(f"--workdir={workdir}", "--prompt=a photograph of the number 7",
                "--prompt=", "--num_samples=3", "--sampler=dpmpp_2m",
                "--steps=3", "--guidance_scale=3.0", "--seed=0",
                f"--out={out}", "--save_individual")
  assert result.returncode == 0, result.stderr[-2000:]
  grid = Image.open(out)
  assert grid.size[0] >= 3 * 84 and grid.size[1] >= 2 * 84
  singles = sorted(p.name for p in tmp_path.glob("grid_*.png"))
  assert len(singles) == 6 and "grid_empty_000.png" in singles
  assert Image.open(tmp_path / singles[0]).size == (28, 28)
  bad = _cli(f"--workdir={workdir}", "--prompt=x", "--sampler=nope",
             f"--out={tmp_path / 'bad.png'}")
  assert bad.returncode != 0 and "--sampler='nope'" in bad.stderr
  assert "Unknown sampler" in bad.stderr
  assert not (tmp_path / "bad.png").exists()
