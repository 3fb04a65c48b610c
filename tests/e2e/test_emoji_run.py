"""configs/emoji.py on the shared emoji folder (../shared/assets/emoji_noto):
the batch the step sees has the RGBA images' transparent area on white, and
a few training steps of the recipe (shrunk) run, log the held-out validation
loss and write the grid. Skipped with one line where the folder is absent.
"""
import os

import numpy as np
from PIL import Image
import pytest

import helpers

EMOJI = os.path.join(os.path.dirname(helpers.ROOT), "shared", "assets",
                     "emoji_noto")
pytestmark = pytest.mark.skipif(
    not os.path.isdir(EMOJI),
    reason=f"emoji_noto unavailable: {EMOJI} is not a folder (the shared "
           "offline assets)")


def _emoji_config(kind="pixel"):
  """configs/emoji.py:kind on the shared folder, its model and text encoder
  shrunk to tiny sizes (the data, transparency and held-out share stay)."""
  from configs import emoji  # pylint: disable=g-import-not-at-top
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  config = environment.resolve(emoji.get_config(kind))
  config.data.path = EMOJI
  config.data.workers = 0
  config.data.image_size = 32
  config.text.update(hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64)
  config.model.update(block_out_channels=(32, 32), attention_head_dim=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
  config.diffusion.num_timesteps = 100
  config.training.update(batch_size=8, num_steps=2, log_every=1,
                         eval_every=2, checkpoint_every=2)
  config.sampling.update(num_steps=2, prompts=("flag of Japan", "banana"))
  config.eval.update(val_loss_examples=8, val_loss_timesteps=2, chunk_size=8)
  return config


def test_batches_see_transparent_pixels_as_the_background(tokenizer):
  """The first training batch (no shuffle), image by image against its PNG:
  every pixel whose alpha is 0 (their stored colour is arbitrary) is white,
  +1 after scaling; with data.background=black, -1."""
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  for background, value in (("white", 1.0), ("black", -1.0)):
    config = _emoji_config()
    config.data.update(image_size=64, shuffle=False, background=background)
    source = pipeline.make_source(config)
    batch = pipeline.make_loader(config, tokenizer, source).next_batch()
    checked = 0
    for i, image in enumerate(batch["image"]):
      with Image.open(os.path.join(EMOJI, source.files[i])) as png:
        rgba = np.asarray(png.convert("RGBA"))
      clear = rgba[..., 3] == 0
      stored = rgba[..., :3][clear]
      # The files' clear pixels are not all the background colour: what
      # dropping alpha used to show.
      checked += int((stored != (255 if value > 0 else 0)).any())
      np.testing.assert_array_equal(image[clear],
                                    np.full_like(image[clear], value))
      opaque = rgba[..., 3] == 255
      np.testing.assert_allclose(
          image[opaque], rgba[..., :3][opaque] / 127.5 - 1, atol=1e-6)
    assert checked, "no image had coloured transparent pixels"


def test_emoji_recipe_trains_and_validates_on_the_held_out_share(tmp_path):
  """A few steps of configs/emoji.py:pixel (shrunk): trains on the 95%,
  logs eval/val_loss on the held-out 5% and writes the grid."""
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _emoji_config()
  train = pipeline.make_source(config)
  held_out = pipeline.make_source(config, "test")
  assert len(train) + len(held_out) == 3786
  assert 150 < len(held_out) < 230  # about 5%
  workdir = str(tmp_path / "emoji")
  diffusion_task.train_and_evaluate(config, workdir)
  assert helpers.metric_steps(workdir, "eval/val_loss") == [2]
  assert os.listdir(os.path.join(workdir, "samples"))
