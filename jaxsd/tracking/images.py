"""Image grids with captions, written as PNG."""
import os
import textwrap
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> uint8 [N, H, W, C]."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType sizes
    return ImageFont.load_default()


def tile_size(height: int, width: int, cell_size: int) -> Tuple[int, int]:
  """(width, height) in pixels of an image's tile in a grid: its longer side
  cell_size, its aspect ratio kept (a 32x64 image: a 112x56 tile)."""
  scale = cell_size / max(height, width)
  return max(1, round(width * scale)), max(1, round(height * scale))


def _tile(img: np.ndarray, size: Tuple[int, int]) -> Image.Image:
  """uint8 [H, W, C] -> an RGB tile of size (width, height), nearest."""
  mode = "L" if img.shape[-1] == 1 else "RGB"
  tile = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
  return tile.resize(size, Image.NEAREST).convert("RGB")


def captioned_grid(images: np.ndarray, captions: Sequence[str],
                   ncols: Optional[int] = None, cell_size: int = 112,
                   pad: int = 4) -> Image.Image:
  """One cell per image, its caption written underneath.

  images: [N, H, W, C] in [-1, 1] (H and W may differ); captions: N strings
  ("" is shown as "(empty prompt)"). Each image is scaled (nearest) to a
  tile whose longer side is cell_size, keeping its aspect ratio.
  """
  images = to_uint8(images)
  n = len(images)
  if len(captions) != n:
    raise ValueError(f"{n} images but {len(captions)} captions.")
  ncols = ncols or min(n, 10)
  nrows = -(-n // ncols)
  tile_w, tile_h = tile_size(images.shape[1], images.shape[2], cell_size)
  font = _font(11)
  # About 6 px a character: a caption wraps within its tile's width.
  wrapped = [textwrap.wrap(c or "(empty prompt)", width=max(8, tile_w // 6))
             or [""] for c in captions]
  line_h = 13
  text_h = line_h * max(len(w) for w in wrapped) + pad
  cell_w, cell_h = tile_w + 2 * pad, tile_h + text_h + 2 * pad
  canvas = Image.new("RGB", (ncols * cell_w, nrows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (img, lines) in enumerate(zip(images, wrapped)):
    r, c = divmod(i, ncols)
    x0, y0 = c * cell_w + pad, r * cell_h + pad
    canvas.paste(_tile(img, (tile_w, tile_h)), (x0, y0))
    for j, line in enumerate(lines):
      draw.text((x0, y0 + tile_h + 2 + j * line_h), line, fill="black",
                font=font)
  return canvas


def save_png_atomic(image: Image.Image, path: str):
  """Writes via a temporary file and a rename: no partial PNG on failure."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  image.save(tmp, format="PNG")
  os.replace(tmp, path)


def prompt_rows_grid(images: np.ndarray, prompts: Sequence[str],
                     cell_size: int = 84, pad: int = 4) -> Image.Image:
  """One row per prompt, the prompt written once under its row.

  images: [P * N, H, W, C] in [-1, 1], prompt-major (N images per prompt);
  each a tile whose longer side is cell_size (aspect ratio kept).
  """
  images = to_uint8(images)
  p = len(prompts)
  if p == 0 or len(images) % p:
    raise ValueError(f"{len(images)} images do not split into {p} prompt rows.")
  n = len(images) // p
  tile_w, tile_h = tile_size(images.shape[1], images.shape[2], cell_size)
  font = _font(12)
  text_h = 16
  row_h = tile_h + text_h + 2 * pad
  width = max(n * (tile_w + pad) + pad, 200)
  canvas = Image.new("RGB", (width, p * row_h), "white")
  draw = ImageDraw.Draw(canvas)
  for r, prompt in enumerate(prompts):
    y0 = r * row_h + pad
    for c in range(n):
      canvas.paste(_tile(images[r * n + c], (tile_w, tile_h)),
                   (pad + c * (tile_w + pad), y0))
    draw.text((pad, y0 + tile_h + 2), prompt or "(empty prompt)",
              fill="black", font=font)
  return canvas
