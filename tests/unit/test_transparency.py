"""Images with transparency are composited onto data.background wherever
jaxsd decodes them; an image folder's held-out share (data.holdout_fraction).
"""
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import default
from jaxsd.data import checks
from jaxsd.data import pipeline
from jaxsd.data import source_imagefolder
from jaxsd.data import sources
from jaxsd.data import transforms
from jaxsd.errors import ConfigError, DataError


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _garbage_rgba(size=16, seed=0) -> np.ndarray:
  """RGBA whose transparent pixels hold random colours: a disc of opaque
  red in the middle, a half-transparent blue ring, clear corners."""
  rng = np.random.default_rng(seed)
  rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
  yy, xx = np.mgrid[:size, :size]
  r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
  rgba[..., 3] = 0
  ring = (r >= size / 4) & (r < size / 3)
  rgba[ring] = (0, 0, 255, 128)
  rgba[r < size / 4] = (255, 0, 0, 255)
  return rgba


def _expected(rgba: np.ndarray, background) -> np.ndarray:
  alpha = rgba[..., 3:].astype(np.float64) / 255
  out = rgba[..., :3] * alpha + np.asarray(background, np.float64) * (1 - alpha)
  return np.rint(out).astype(np.uint8)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0),
                                        (10, 200, 30)])
def test_rgba_png_is_composited_onto_the_background(background):
  rgba = _garbage_rgba()
  decoded = transforms.decode(_png(Image.fromarray(rgba, "RGBA")), "x.png",
                              background)
  np.testing.assert_array_equal(decoded, _expected(rgba, background))
  clear = rgba[..., 3] == 0
  assert clear.sum() > 50
  # Every transparent pixel is exactly the background, whatever it held.
  np.testing.assert_array_equal(decoded[clear],
                                np.broadcast_to(background, (clear.sum(), 3)))
  # An array with alpha (tfds / Hugging Face) goes the same way.
  np.testing.assert_array_equal(transforms.decode(rgba, "a", background),
                                decoded)


def test_other_transparent_modes():
  # Palette with a transparent index: index 0 is clear, holds pure green.
  p = Image.new("P", (4, 4), 0)
  p.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
  p.putpixel((1, 1), 1)
  p.info["transparency"] = 0
  out = transforms.decode(_png(p), "p.png", (255, 255, 255))
  assert out.shape == (4, 4, 3)
  assert (out[0, 0] == 255).all() and tuple(out[1, 1]) == (200, 0, 0)
  # Grey + alpha: clear pixels take the background's luma.
  la = np.zeros((4, 4, 2), np.uint8)
  la[..., 0] = 17
  la[2:, :, 1] = 255
  out = transforms.decode(_png(Image.fromarray(la, "LA")), "la.png",
                          (255, 255, 255))
  assert out.shape == (4, 4, 1)
  assert (out[:2] == 255).all() and (out[2:] == 17).all()
  # RGB with a transparent colour (tRNS): that colour becomes background.
  rgb = Image.new("RGB", (4, 4), (1, 2, 3))
  rgb.putpixel((0, 0), (9, 9, 9))
  rgb.info["transparency"] = (1, 2, 3)
  out = transforms.decode(_png(rgb), "t.png", (0, 0, 0))
  assert tuple(out[0, 0]) == (9, 9, 9) and (out[1:] == 0).all()
  # Opaque images are untouched.
  plain = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  np.testing.assert_array_equal(
      transforms.decode(_png(Image.fromarray(plain)), "o.png", (0, 0, 0)),
      plain)


def test_parse_color():
  assert transforms.parse_color("white") == (255, 255, 255)
  assert transforms.parse_color("#102030") == (16, 32, 48)
  assert transforms.parse_color(" 1, 2,3") == (1, 2, 3)
  for bad in ("nope", "1,2", "1,2,300", "#12"):
    with pytest.raises(ValueError, match="not a colour"):
      transforms.parse_color(bad)


def _folder(tmp_path, n=40):
  rows = []
  for i in range(n):
    name = f"images/{i:03d}.png"
    os.makedirs(tmp_path / "images", exist_ok=True)
    Image.fromarray(_garbage_rgba(8, seed=i), "RGBA").save(tmp_path / name)
    rows.append({"file_name": name, "text": f"emoji {i}"})
  with open(tmp_path / "metadata.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows))
  config = default.get_config()
  config.data.path = str(tmp_path)
  config.data.image_size = 8
  return config


def test_every_path_composites_with_the_configured_background(tmp_path):
  config = _folder(tmp_path, n=4)
  config.data.background = "#0a141e"
  rgba = _garbage_rgba(8, seed=0)
  expected = transforms.to_float(_expected(rgba, (10, 20, 30)))
  source = pipeline.make_source(config)
  images, _ = pipeline.preview(config, source, 1)  # grids, FID, held-out
  np.testing.assert_allclose(images[0], expected, atol=1e-6)
  transform = pipeline.image_transform(config.data)  # the latent cache's
  np.testing.assert_allclose(transform(source[0]["image"]), expected,
                             atol=1e-6)


def test_holdout_is_fixed_disjoint_and_complete(tmp_path):
  config = _folder(tmp_path)
  whole = pipeline.make_source(config)
  config.data.holdout_fraction = 0.25
  train = pipeline.make_source(config)
  test = pipeline.make_source(config, "test")
  assert not set(train.files) & set(test.files)
  assert sorted(train.files + test.files) == whole.files
  assert 2 <= len(test.files) <= 18
  assert test.files == [f for f in whole.files
                        if source_imagefolder.held_out(f, 0.25)]
  # The rule depends on the path only: the same names in another run.
  assert pipeline.make_source(config, "test").files == test.files
  config.data.holdout_fraction = 1e-7
  with pytest.raises(DataError, match="without images"):
    pipeline.make_source(config, "test")


def test_holdout_and_background_checks():
  config = default.get_config()
  config.data.background = "1,2"
  with pytest.raises(ConfigError, match="data.background"):
    checks.check_data(config)
  config = default.get_config()
  config.data.holdout_fraction = 0.9
  with pytest.raises(ConfigError, match="data.holdout_fraction"):
    checks.check_data(config)
  config.data.holdout_fraction = 0.05
  config.data.source = "tfds"
  with pytest.raises(ConfigError, match="own splits"):
    checks.check_data(config)
  # Runs saved before these fields resume with white and no hold-out.
  del config.data["background"]
  assert pipeline.background(config.data) == (255, 255, 255)
