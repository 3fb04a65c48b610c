"""Image grids with captions, written as PNG."""
import os
import textwrap
from typing import Optional, Sequence

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


def captioned_grid(images: np.ndarray, captions: Sequence[str],
                   ncols: Optional[int] = None, cell_size: int = 112,
                   pad: int = 4) -> Image.Image:
  """One cell per image, its caption written underneath.

  images: [N, H, W, C] in [-1, 1]; captions: N strings ("" is shown as
  "(empty prompt)"). Small images are scaled up (nearest) to cell_size.
  """
  images = to_uint8(images)
  n = len(images)
  if len(captions) != n:
    raise ValueError(f"{n} images but {len(captions)} captions.")
  ncols = ncols or min(n, 10)
  nrows = -(-n // ncols)
  font = _font(11)
  wrapped = [textwrap.wrap(c or "(empty prompt)", width=18) or [""]
             for c in captions]
  line_h = 13
  text_h = line_h * max(len(w) for w in wrapped) + pad
  cell_w, cell_h = cell_size + 2 * pad, cell_size + text_h + 2 * pad
  canvas = Image.new("RGB", (ncols * cell_w, nrows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (img, lines) in enumerate(zip(images, wrapped)):
    r, c = divmod(i, ncols)
    x0, y0 = c * cell_w + pad, r * cell_h + pad
    mode = "L" if img.shape[-1] == 1 else "RGB"
    tile = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
    canvas.paste(tile.resize((cell_size, cell_size), Image.NEAREST).convert(
        "RGB"), (x0, y0))
    for j, line in enumerate(lines):
      draw.text((x0, y0 + cell_size + 2 + j * line_h), line, fill="black",
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

  images: [P * N, H, W, C] in [-1, 1], prompt-major (N images per prompt).
  """
  images = to_uint8(images)
  p = len(prompts)
  if p == 0 or len(images) % p:
    raise ValueError(f"{len(images)} images do not split into {p} prompt rows.")
  n = len(images) // p
  font = _font(12)
  text_h = 16
  row_h = cell_size + text_h + 2 * pad
  width = max(n * (cell_size + pad) + pad, 200)
  canvas = Image.new("RGB", (width, p * row_h), "white")
  draw = ImageDraw.Draw(canvas)
  for r, prompt in enumerate(prompts):
    y0 = r * row_h + pad
    for c in range(n):
      img = images[r * n + c]
      mode = "L" if img.shape[-1] == 1 else "RGB"
      tile = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
      canvas.paste(tile.resize((cell_size, cell_size), Image.NEAREST).convert(
          "RGB"), (pad + c * (cell_size + pad), y0))
    draw.text((pad, y0 + cell_size + 2), prompt or "(empty prompt)",
              fill="black", font=font)
  return canvas
