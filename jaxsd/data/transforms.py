"""Image transforms of the loader: decode, channels, resize, crop, flip, scale.

Pure numpy/PIL functions on one image (uint8 [H, W, C] unless said), so they
run the same in the main process and in loader workers. Randomness (random
crop offsets, flips) comes from a Generator the caller derives from
(seed, epoch, example index) with `example_rng`, so an example's transform is
reproducible and the same after a resume.
"""
import dataclasses
import io
from typing import Optional, Tuple, Union

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageColor
from PIL import ImageOps

CROPS = ("center", "random")

Color = Tuple[int, int, int]
WHITE: Color = (255, 255, 255)

# What PIL raises on truncated, corrupt or hostile (decompression bomb) files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombError)


def caption_of(example, key) -> str:
  """The example's caption, which must be a str."""
  caption = example.get("caption")
  if not isinstance(caption, str):
    raise TypeError(f"Example {key!r} has caption {caption!r}; every example "
                    "needs a str caption.")
  return caption


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The Generator of one example's random transforms."""
  return np.random.default_rng([seed, epoch, index])


def parse_color(value: str) -> Color:
  """data.background as (r, g, b) uint8: a colour name ("white", "black"),
  "#rrggbb", or "r,g,b" with each in 0..255. Raises ValueError naming the
  forms it takes."""
  text = str(value).strip()
  parts = text.split(",")
  try:
    if len(parts) == 3:
      rgb = tuple(int(p) for p in parts)
      if all(0 <= c <= 255 for c in rgb):
        return rgb
    else:
      rgb = ImageColor.getrgb(text)
      return tuple(int(c) for c in rgb[:3])
  except ValueError:
    pass
  raise ValueError(f"{value!r} is not a colour; use a name (\"white\"), "
                   "\"#rrggbb\" or \"r,g,b\" with each in 0..255.")


def composite(image: np.ndarray, background: Color = WHITE) -> np.ndarray:
  """uint8 [H, W, 4] (RGBA) or [H, W, 2] (grey + alpha) -> [H, W, 3] / [H, W,
  1] over `background` (alpha blending, rounded). Other shapes unchanged.

  Transparent pixels of PNGs carry arbitrary colour (often black, or the
  colour of the nearest edge): dropping alpha shows it as a fringed
  patchwork, so every image with alpha is put onto one background instead.
  Grey + alpha uses the background's luma (ITU-R 601-2, as PIL's "L").
  """
  c = image.shape[-1]
  if c not in (2, 4):
    return image
  colour = np.asarray(background, np.float32)
  if c == 2:
    r, g, b = colour
    colour = np.asarray([(r * 299 + g * 587 + b * 114) / 1000], np.float32)
  alpha = image[..., -1:].astype(np.float32) / 255.0
  blended = image[..., :-1].astype(np.float32) * alpha + colour * (1 - alpha)
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _pil_to_array(image: Image.Image, background: Color = WHITE
                  ) -> np.ndarray:
  """A decoded PIL image as uint8 [H, W, 1] (grey modes) or [H, W, 3]; an
  image with transparency (RGBA, LA, PA, P or L/RGB with a transparent
  colour) composited onto `background`."""
  if image.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits
    array = (np.asarray(image, np.uint16) >> 8).astype(np.uint8)
  elif image.mode in ("1", "I", "F") or (
      image.mode == "L" and "transparency" not in image.info):
    array = np.asarray(image.convert("L"))
  elif image.mode in ("LA", "La", "L"):  # grey with alpha / a clear value
    array = composite(np.asarray(image.convert("LA")), background)
  elif (image.mode in ("RGBA", "RGBa", "PA")
        or "transparency" in image.info):  # P or RGB with a clear colour
    array = composite(np.asarray(image.convert("RGBA")), background)
  else:  # RGB, P, CMYK, YCbCr ...
    array = np.asarray(image.convert("RGB"))
  return array.reshape(array.shape[0], array.shape[1], -1)


def decode(data: Union[bytes, np.ndarray], key: str = "",
           background: Color = WHITE) -> Optional[np.ndarray]:
  """Encoded bytes (jpg/png/webp/...) or a uint8 array -> uint8 [H, W, C].

  C is 1 for grey images and 3 for colour ones (bytes), or the array's own
  channels (1 or 3: an array with alpha, [H, W, 2] or [H, W, 4], is
  composited too). Images with transparency come out composited onto
  `background` (data.background). Returns None for an image that does not decode (truncated,
  corrupt, not an image), after one warning naming `key`, so the loader can
  skip it. A wrongly typed input is a programming error and raises.
  """
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise ValueError(f"Image {key!r}: expected uint8 [H, W] or [H, W, C], "
                       f"got {data.dtype} {data.shape}.")
    return data[:, :, None] if data.ndim == 2 else composite(data, background)
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"Image {key!r}: expected encoded bytes or a uint8 array, "
                    f"got {type(data).__name__}.")
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decodes now: a truncated file fails here, not later
      image = ImageOps.exif_transpose(image)  # camera JPEGs' orientation
      return _pil_to_array(image, background)
  except _DECODE_ERRORS as e:
    logging.warning("Skipping image %r: it does not decode (%s: %s).", key,
                    type(e).__name__, e)
    return None


def to_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [H, W, num_channels]: 3 = RGB, 1 = grey.

  Grey to RGB repeats the channel; RGB to grey is PIL's "L" (ITU-R 601-2
  luma). An image with alpha ([H, W, 4] / [H, W, 2], which `decode` does
  not return) is composited onto white first.
  """
  if num_channels not in (1, 3):
    raise ValueError(f"num_channels={num_channels}; use 3 (RGB) or 1 (grey).")
  image = composite(image)
  c = image.shape[-1]
  if c == num_channels:
    return image
  if c == 1:  # grey -> RGB
    return np.repeat(image, 3, axis=-1)
  if c != 3:
    raise ValueError(f"Cannot convert an image of {c} channels.")
  grey = np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("L"))
  return grey[:, :, None]


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [H, W, C] so that min(H, W) == size (aspect kept; PIL
  bicubic, which antialiases when shrinking). Unchanged if already so: the
  square case of `resize_to_cover`."""
  return resize_to_cover(image, size, size)


def crop(image: np.ndarray, size: int, mode: str = "center",
         rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """A size x size window of uint8 [H, W, C] (H, W >= size): the square case
  of `crop_window` ("center" or offsets drawn by `rng`, top then left)."""
  return crop_window(image, size, size, mode, rng)[0]


def resize_to_cover(image: np.ndarray, height: int, width: int
                    ) -> np.ndarray:
  """Resizes uint8 [H, W, C] (aspect kept; PIL bicubic) to the smallest size
  that covers height x width: one side equal, the other >= its target.
  Unchanged if already so."""
  h, w, c = image.shape
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  if (new_h, new_w) == (h, w):
    return image
  pil = Image.fromarray(image[:, :, 0] if c == 1 else image)
  out = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC))
  return out.reshape(new_h, new_w, c)


def crop_window(image: np.ndarray, height: int, width: int,
                mode: str = "center",
                rng: Optional[np.random.Generator] = None):
  """(the height x width window of uint8 [H, W, C], top, left): offsets
  centred ((H - height) // 2, (W - width) // 2) or drawn by `rng.integers`,
  top then left."""
  h, w = image.shape[:2]
  if h < height or w < width:
    raise ValueError(f"Cannot crop {height}x{width} from a {h}x{w} image.")
  if mode == "center":
    top, left = (h - height) // 2, (w - width) // 2
  elif mode == "random":
    top = int(rng.integers(0, h - height + 1))
    left = int(rng.integers(0, w - width + 1))
  else:
    raise ValueError(f"crop={mode!r}; use one of {CROPS}.")
  return image[top:top + height, left:left + width], top, left


def pad(image: np.ndarray, size: int) -> np.ndarray:
  """Centres uint8 [h, w, C] (h, w <= size) on a size x size black canvas
  (0, i.e. -1 once scaled; MNIST's background), the extra pixel of an odd
  margin below/right, as input_pipeline.preprocess_images does."""
  h, w = image.shape[:2]
  ph, pw = size - h, size - w
  if ph < 0 or pw < 0:
    raise ValueError(f"Cannot pad a {h}x{w} image to {size}x{size}.")
  return np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                        (0, 0)))


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [..., C] -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return image.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Encoded image or uint8 array -> float32 [S, S, C] in [-1, 1].

  Steps: decode (images with transparency composited onto `background`);
  to num_channels; if pad_small and the image fits in
  S x S, pad it with the background (no upscaling: MNIST 28 -> 32); else
  resize the shorter side to S and crop S x S (centre or random); then, with
  random_flip, flip left-right with probability 1/2; scale. The random draws
  come from `rng` in this order: crop top, crop left, flip.
  """
  image_size: int
  num_channels: int = 3
  crop: str = "center"
  random_flip: bool = False
  pad_small: bool = False
  background: Color = WHITE

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"crop={self.crop!r}; use one of {CROPS}.")
    if self.num_channels not in (1, 3):
      raise ValueError(f"num_channels={self.num_channels}; use 3 or 1.")
    if self.image_size < 1:
      raise ValueError(f"image_size={self.image_size} must be positive.")

  @property
  def needs_rng(self) -> bool:
    return self.crop == "random" or self.random_flip

  def __call__(self, data, key: str = "",
               rng: Optional[np.random.Generator] = None
               ) -> Optional[np.ndarray]:
    """float32 [S, S, num_channels], or None if the image does not decode."""
    image = decode(data, key, self.background)
    if image is None:
      return None
    image = to_channels(image, self.num_channels)
    size = self.image_size
    h, w = image.shape[:2]
    if self.pad_small and h <= size and w <= size:
      image = pad(image, size)
    else:
      image = crop(resize_shorter_side(image, size), size, self.crop, rng)
    if self.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return to_float(image)

  def to_bucket(self, data, shape, key: str = "",
                rng: Optional[np.random.Generator] = None):
    """(float32 [h, w, num_channels], crop top, crop left) for bucket
    shape (h, w), or None if the image does not decode.

    Resized to cover the bucket and cropped (data.crop); the offsets are
    in the resized image, before any flip (SDXL's crop coordinates). The
    random draws come from `rng` as in __call__: crop top, crop left, flip.
    """
    image = decode(data, key, self.background)
    if image is None:
      return None
    image = to_channels(image, self.num_channels)
    height, width = shape
    image = resize_to_cover(image, height, width)
    image, top, left = crop_window(image, height, width, self.crop, rng)
    if self.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return to_float(image), top, left
