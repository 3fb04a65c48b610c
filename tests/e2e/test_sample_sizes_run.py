"""jaxsd-sample at a non-square size on a trained run. The rest:
tests/unit/test_sample_sizes.py."""
import os

import pytest

from jaxsd.diffusion import sample_run
from jaxsd.models import autoencoder as ae_lib

import helpers

ROOT = helpers.ROOT  # the repository
PROMPTS = ["a photograph of the number 3", ""]

# Downsamples 2x: with the tiny UNet's 2 levels, sides are multiples of 4.
AE = ae_lib.AutoencoderConfig(
    in_channels=1, out_channels=1, block_out_channels=(8, 16),
    latent_channels=4, norm_num_groups=4)


@pytest.mark.mnist
def test_sample_command_writes_a_non_square_grid(trained_run, tmp_path):
  workdir, _ = trained_run
  out = str(tmp_path / "wide.png")
  prompts, step = sample_run.sample_run(
      workdir, PROMPTS, out, num_samples=2, steps=2, height=16, width=40,
      save_individual=True)
  assert step == 4 and prompts == PROMPTS
  from PIL import Image  # pylint: disable=g-import-not-at-top
  singles = sorted(p for p in os.listdir(tmp_path) if p != "wide.png")
  assert len(singles) == 4
  assert Image.open(tmp_path / singles[0]).size == (40, 16)
  # The run's square default still samples 28x28.
  images, _ = sample_run.generate_for_prompts(workdir, PROMPTS[:1],
                                              num_samples=1, steps=2)
  assert images.shape == (1, 28, 28, 1)
